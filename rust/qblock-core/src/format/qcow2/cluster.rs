//! L1 and L2 tables: guest offset -> host offset, with a bounded L2 cache
//! (docs/interop/qcow2.txt: "Cluster mapping", "Extended L2 Entries").
//!
//! Readers take only read locks: the L1 lock to copy one entry, the cache
//! lock to look at one table. A miss reads the table outside any lock and
//! inserts it under the write lock, unless a writer changed L2 tables in
//! between (generation counter), in which case it reads again: a stale
//! table must never enter the cache.

use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Error, Result};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Memory for cached L2 tables (QEMU's default maximum l2-cache-size is
/// 32 MiB); at least a few tables whatever the cluster size.
const L2_CACHE_BYTES: u64 = 16 << 20;
const L2_CACHE_MIN_TABLES: usize = 4;

pub struct L1 {
    pub offset: u64,
    pub entries: Vec<u64>,
}

struct Slot {
    /// Entries in host byte order (two words per entry with extended L2).
    words: Box<[u64]>,
    /// Approximate recency: the miss counter when last used.
    stamp: AtomicU64,
}

struct CacheInner {
    tables: HashMap<u64, Slot>,
    /// Bumped by every writer of an L2 table.
    generation: u64,
    misses: AtomicU64,
}

pub struct L2Cache {
    inner: RwLock<CacheInner>,
    capacity: usize,
    words: usize,
}

impl L2Cache {
    pub fn new(g: &Geometry) -> L2Cache {
        let capacity = ((L2_CACHE_BYTES >> g.cluster_bits) as usize).max(L2_CACHE_MIN_TABLES);
        Self::with_capacity(g, capacity)
    }

    pub fn with_capacity(g: &Geometry, capacity: usize) -> L2Cache {
        L2Cache {
            inner: RwLock::new(CacheInner {
                tables: HashMap::new(),
                generation: 0,
                misses: AtomicU64::new(0),
            }),
            capacity,
            words: (g.cluster_size / 8) as usize,
        }
    }

    /// Run `f` on the table at `off` (loading it on a miss).
    pub fn with<R>(&self, file: &dyn Storage, off: u64, f: impl FnOnce(&[u64]) -> R) -> Result<R> {
        let mut f = Some(f);
        for _ in 0..8 {
            let generation = {
                let c = self.inner.read();
                if let Some(s) = c.tables.get(&off) {
                    let now = c.misses.load(Ordering::Relaxed);
                    if s.stamp.load(Ordering::Relaxed) != now {
                        s.stamp.store(now, Ordering::Relaxed);
                    }
                    let f = f
                        .take()
                        .ok_or_else(|| Error::Internal("L2 cache callback reused".into()))?;
                    return Ok(f(&s.words));
                }
                c.generation
            };
            let words = self.read_table(file, off)?;
            let mut c = self.inner.write();
            if c.generation != generation {
                continue;
            }
            self.insert_locked(&mut c, off, words);
        }
        Err(Error::Internal("L2 table kept changing while being loaded".into()))
    }

    fn read_table(&self, file: &dyn Storage, off: u64) -> Result<Box<[u64]>> {
        let mut raw = try_zeroed(self.words * 8, "L2 table")?;
        file.read_at(&mut raw, off)?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(self.words)
            .map_err(|_| Error::NoMemory("L2 table".into()))?;
        words.extend(
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))),
        );
        Ok(words.into_boxed_slice())
    }

    fn insert_locked(&self, c: &mut CacheInner, off: u64, words: Box<[u64]>) {
        let now = c.misses.fetch_add(1, Ordering::Relaxed) + 1;
        if !c.tables.contains_key(&off) && c.tables.len() >= self.capacity {
            if let Some(victim) = c
                .tables
                .iter()
                .min_by_key(|(_, s)| s.stamp.load(Ordering::Relaxed))
                .map(|(k, _)| *k)
            {
                c.tables.remove(&victim);
            }
        }
        c.tables.insert(
            off,
            Slot {
                words,
                stamp: AtomicU64::new(now),
            },
        );
    }

    /// A copy of the table's words (for COW of a whole table).
    pub fn copy(&self, file: &dyn Storage, off: u64) -> Result<Vec<u64>> {
        self.with(file, off, |w| w.to_vec())
    }

    /// Install a table we just wrote at `off` (a new or copied L2 table).
    pub fn install(&self, off: u64, words: Vec<u64>) {
        let mut c = self.inner.write();
        c.generation += 1;
        self.insert_locked(&mut c, off, words.into_boxed_slice());
    }

    /// Record words `[at, at+new.len())` of the table at `off`, already on disk.
    pub fn update(&self, off: u64, at: usize, new: &[u64]) {
        let mut c = self.inner.write();
        c.generation += 1;
        if let Some(s) = c.tables.get_mut(&off) {
            s.words[at..at + new.len()].copy_from_slice(new);
        }
    }

    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.inner.read().tables.len()
    }

    pub fn forget(&self, off: u64) {
        let mut c = self.inner.write();
        c.generation += 1;
        c.tables.remove(&off);
    }
}

/// Check an L1 entry: the L2 table must be cluster aligned and inside the file.
pub fn check_l1_entry(g: &Geometry, idx: usize, e: u64, file_end: u64) -> Result<u64> {
    let off = e & OFFSET_MASK;
    if e & L1E_RESERVED != 0 {
        return Err(corrupt(format!("L1 entry {idx} ({e:#x}) has reserved bits set")));
    }
    if off == 0 {
        return Ok(0);
    }
    if off & (g.cluster_size - 1) != 0 {
        return Err(corrupt(format!("L2 table {idx} at {off:#x} is not cluster aligned")));
    }
    if off < g.cluster_size {
        return Err(corrupt(format!("L2 table {idx} overlaps the header")));
    }
    if off.checked_add(g.cluster_size).is_none_or(|end| end > file_end) {
        return Err(corrupt(format!(
            "L2 table {idx} at {off:#x} is past the end of the file"
        )));
    }
    Ok(off)
}

/// In memory only, in an image opened for checking: an L1 entry that
/// failed `check_l1_entry` (it has reserved bits set, so no real entry is
/// ever equal to it). Mapping through it is an error; the check reads the
/// entry from disk.
pub const DAMAGED_L1: u64 = u64::MAX;

/// Load and check the L1 table; with `lenient` (an image opened for checking, which
/// QEMU opens without looking at L1 entries) a bad entry becomes
/// [`DAMAGED_L1`] instead of failing the open. Also says whether any was bad.
pub fn load_l1(
    file: &dyn Storage,
    g: &Geometry,
    offset: u64,
    size: u32,
    file_end: u64,
    lenient: bool,
) -> Result<(L1, bool)> {
    // Capped at 32 MiB by the header check; read in 1 MiB pieces so it is
    // held once.
    let mut entries = Vec::new();
    entries
        .try_reserve_exact(size as usize)
        .map_err(|_| Error::NoMemory("L1 table".into()))?;
    let mut damaged = false;
    let mut raw = try_zeroed((size as usize * 8).min(1 << 20), "L1 table")?;
    while entries.len() < size as usize {
        let k = (size as usize - entries.len()).min(raw.len() / 8);
        file.read_at(&mut raw[..8 * k], offset + 8 * entries.len() as u64)?;
        for c in raw[..8 * k].chunks_exact(8) {
            let i = entries.len();
            let e = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            match check_l1_entry(g, i, e, file_end) {
                Ok(_) => entries.push(e),
                Err(_) if lenient => {
                    damaged = true;
                    entries.push(DAMAGED_L1);
                }
                Err(err) => return Err(err),
            }
        }
    }
    Ok((L1 { offset, entries }, damaged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    #[test]
    fn cache_stays_bounded_and_correct() {
        let g = Geometry::new(9, false);
        // 40 tables whose first entry names the table.
        let f = MemoryStorage::new(vec![0; 41 * 512], false);
        for t in 1..=40u64 {
            f.write_at(&(t * 1000).to_be_bytes(), t * 512).unwrap();
        }
        let c = L2Cache::with_capacity(&g, 4);
        for round in 0..3 {
            for t in 1..=40u64 {
                let v = c.with(&f, t * 512, |w| w[0]).unwrap();
                assert_eq!(v, t * 1000, "round {round}");
                assert!(c.cached() <= 4);
            }
        }
        // A hot table survives a stream of misses.
        for t in 1..=40u64 {
            c.with(&f, 512, |_| ()).unwrap();
            c.with(&f, t * 512, |_| ()).unwrap();
        }
        assert!(c.inner.read().tables.contains_key(&512));
        // Updates reach cached tables.
        c.update(512, 0, &[7]);
        assert_eq!(c.with(&f, 512, |w| w[0]).unwrap(), 7);
    }
}
