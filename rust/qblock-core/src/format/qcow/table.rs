//! A bounded cache of second-level table entries, shared by qcow and qed
//! (both map guest clusters through L1 -> L2 tables of 64-bit entries).
//!
//! Tables are cached in chunks of at most [`CHUNK_ENTRIES`] entries, keyed by
//! their host offset and length, so a table of any size (qed allows 1 GiB
//! tables) costs at most one chunk of memory per lookup. A hit takes a read
//! lock and clones an `Arc`: no allocation and no exclusive lock on the read
//! path. The whole cache is dropped when it reaches [`MAX_CHUNKS`], which
//! bounds its memory whatever the image says.

use crate::backend::Storage;
use crate::error::{try_zeroed, Result};
use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Entries per cached chunk: 32 KiB, the size of QEMU's qcow L2 tables at
/// most (and one read of a typical qed L2 table in 8 reads).
pub const CHUNK_ENTRIES: u64 = 4096;
/// Chunks kept at once: 512 x 32 KiB = 16 MiB, enough to map 64 GiB of
/// 4 KiB qcow clusters or 16 TiB of 64 KiB qed clusters.
pub const MAX_CHUNKS: usize = 512;

/// One run of cached entries: `entries[index..]` continue the table from
/// the entry asked for.
pub struct Chunk {
    pub entries: Arc<Vec<u64>>,
    pub index: usize,
}

/// Cached chunks by (host offset, entry count).
type Chunks = HashMap<(u64, u64), Arc<Vec<u64>>>;

pub struct TableCache {
    big_endian: bool,
    chunks: RwLock<Chunks>,
}

impl TableCache {
    pub fn new(big_endian: bool) -> Self {
        TableCache {
            big_endian,
            chunks: RwLock::new(HashMap::new()),
        }
    }

    fn chunk_of(table: u64, entries: u64, index: u64) -> (u64, u64, usize) {
        let first = index / CHUNK_ENTRIES * CHUNK_ENTRIES;
        let n = (entries - first).min(CHUNK_ENTRIES);
        (table + first * 8, n, (index - first) as usize)
    }

    /// The entries of the table at host offset `table` (of `entries`
    /// entries) from `index` on, as far as one chunk goes. The caller has
    /// checked that the table lies inside the file and `index < entries`.
    pub fn get(&self, storage: &dyn Storage, table: u64, entries: u64, index: u64) -> Result<Chunk> {
        let (off, n, at) = Self::chunk_of(table, entries, index);
        if let Some(c) = self.chunks.read().get(&(off, n)) {
            return Ok(Chunk {
                entries: c.clone(),
                index: at,
            });
        }
        let mut raw = try_zeroed(n as usize * 8, "a table chunk")?;
        storage.read_at(&mut raw, off)?;
        let v: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| {
                let a: [u8; 8] = b.try_into().expect("8-byte chunk");
                if self.big_endian {
                    u64::from_be_bytes(a)
                } else {
                    u64::from_le_bytes(a)
                }
            })
            .collect();
        let v = Arc::new(v);
        let mut w = self.chunks.write();
        if w.len() >= MAX_CHUNKS {
            w.clear();
        }
        w.insert((off, n), v.clone());
        Ok(Chunk { entries: v, index: at })
    }

    /// One entry of a table.
    pub fn entry(&self, storage: &dyn Storage, table: u64, entries: u64, index: u64) -> Result<u64> {
        let c = self.get(storage, table, entries, index)?;
        Ok(c.entries[c.index])
    }

    /// Write one entry to the file, then to the cache (the file is the
    /// truth; a failed write leaves the cache as it was).
    pub fn set(&self, storage: &dyn Storage, table: u64, entries: u64, index: u64, value: u64) -> Result<()> {
        let bytes = if self.big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        };
        storage.write_at(&bytes, table + index * 8)?;
        let (off, n, at) = Self::chunk_of(table, entries, index);
        let mut w = self.chunks.write();
        if let Some(c) = w.get_mut(&(off, n)) {
            Arc::make_mut(c)[at] = value;
        }
        Ok(())
    }

    /// Write consecutive entries from `index` on in one write, then to
    /// the cache.
    pub fn set_many(&self, storage: &dyn Storage, table: u64, entries: u64, index: u64, values: &[u64]) -> Result<()> {
        let mut bytes = Vec::with_capacity(values.len() * 8);
        for v in values {
            bytes.extend_from_slice(&if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }
        storage.write_at(&bytes, table + index * 8)?;
        let mut w = self.chunks.write();
        for (k, &v) in values.iter().enumerate() {
            let (off, n, at) = Self::chunk_of(table, entries, index + k as u64);
            if let Some(c) = w.get_mut(&(off, n)) {
                Arc::make_mut(c)[at] = v;
            }
        }
        Ok(())
    }

    /// Forget everything (after a repair rewrote tables behind our back).
    pub fn clear(&self) {
        self.chunks.write().clear();
    }
}

/// The host places of a format's tables of one fixed size (qcow and qed
/// L2 tables), so that a data cluster an image places on top of one is
/// refused before we write into it: a write there would rewrite metadata.
pub struct TableSet {
    len: u64,
    starts: RwLock<BTreeSet<u64>>,
}

impl TableSet {
    pub fn new(len: u64) -> Self {
        TableSet {
            len: len.max(1),
            starts: RwLock::new(BTreeSet::new()),
        }
    }
    pub fn insert(&self, start: u64) {
        self.starts.write().insert(start);
    }
    pub fn clear(&self) {
        self.starts.write().clear();
    }
    /// Whether `[start, end)` meets any table.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // A table at `s` meets the range when s < end and s + len > start.
        let from = start.saturating_sub(self.len - 1);
        from < end && self.starts.read().range(from..end).next().is_some()
    }
}

/// Whether two half-open ranges meet.
pub fn ranges_meet(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    #[test]
    fn chunks_and_updates() {
        let mut data = vec![0u8; 8 * 10000];
        for i in 0..10000u64 {
            data[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&(i * 3).to_be_bytes());
        }
        let s = MemoryStorage::new(data, false);
        let c = TableCache::new(true);
        assert_eq!(c.entry(&s, 0, 10000, 9999).unwrap(), 9999 * 3);
        let ch = c.get(&s, 0, 10000, 4100).unwrap();
        assert_eq!(ch.index, 4);
        assert_eq!(ch.entries.len(), 4096);
        c.set(&s, 0, 10000, 4100, 7).unwrap();
        assert_eq!(c.entry(&s, 0, 10000, 4100).unwrap(), 7);
        c.clear();
        assert_eq!(c.entry(&s, 0, 10000, 4100).unwrap(), 7);
        // Many at once, across a chunk boundary, cached or not.
        c.entry(&s, 0, 10000, 4000).unwrap();
        c.set_many(&s, 0, 10000, 4090, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(c.entry(&s, 0, 10000, 4095).unwrap(), 6);
        assert_eq!(c.entry(&s, 0, 10000, 4097).unwrap(), 8);
        c.clear();
        assert_eq!(c.entry(&s, 0, 10000, 4090).unwrap(), 1);
        assert_eq!(c.entry(&s, 0, 10000, 4097).unwrap(), 8);
        // The last chunk is short.
        assert_eq!(c.get(&s, 0, 10000, 8192).unwrap().entries.len(), 10000 - 8192);
    }

    #[test]
    fn table_set_overlaps() {
        let t = TableSet::new(4096);
        t.insert(8192);
        assert!(!t.overlaps(0, 8192));
        assert!(t.overlaps(0, 8193));
        assert!(t.overlaps(12287, 12288));
        assert!(!t.overlaps(12288, 20000));
        assert!(t.overlaps(9000, 9001));
        assert!(ranges_meet((0, 10), (9, 20)));
        assert!(!ranges_meet((0, 10), (10, 20)));
    }
}
