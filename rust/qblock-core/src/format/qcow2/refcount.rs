//! Refcount table and refcount blocks, every `refcount_bits` from 1 to 64,
//! and cluster allocation (docs/interop/qcow2.txt: "Host cluster management").
//!
//! All of this lives behind the driver's allocation mutex. Refcount blocks
//! are written through (the on-disk copy is always current), so nothing is
//! dirty at flush time. Crash order: a refcount is raised before anything
//! points at the cluster it counts (the new refcount block's own refcount
//! first, then its content, then the table entry), and lowered only after
//! the last reference is gone, so a crash leaves at worst leaked clusters.
//!
//! Durability: writes reach the disk in any order unless flushed, so the
//! places where order matters to QEMU's own rules are flush barriers too:
//! clusters are reserved in pools whose raised refcounts are flushed before
//! any of them is handed out (one flush per pool, not per write; the pool
//! doubles per refill between two flushes), new
//! refcount blocks are flushed before the table points at them, and a moved
//! table before the header does. The unused rest of a pool is given back at
//! every flush and at close, so a cleanly closed image has no leaks.
//! Refcounts go down only after a flush that made the dropped reference
//! durable (`release`).
//!
//! New clusters are appended at the end of the file. We never reuse a freed
//! cluster, so a cluster whose refcount we did not raise is never handed out
//! while something (a snapshot, a bitmap) may still use it.

use super::header::OFF_REFTABLE;
use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Error, Result};

/// Refcount blocks kept in memory: a small LRU; they are clean, so evicting
/// costs nothing but a re-read.
const BLOCK_CACHE: usize = 16;
/// How far allocation skips over clusters that already have a refcount
/// beyond the end of the file before calling the image corrupt.
const MAX_SKIP: u64 = 1 << 20;
/// Clusters are first reserved this many bytes at a time (at least one
/// cluster); each refill before the next flush doubles the reservation, so
/// a long run of allocating writes pays one flush barrier per doubling
/// rather than one per 4 MiB.
const POOL_BYTES: u64 = 4 << 20;
/// The reservation stops doubling at this size, or at `MAX_POOL_CLUSTERS`:
/// what a crash can leak (refcounts without references, no file space)
/// and what one refill's refcount update writes stay bounded.
const MAX_POOL_BYTES: u64 = 256 << 20;
const MAX_POOL_CLUSTERS: u64 = 8192;

pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// log2 of the refcount entries per block.
    epb_bits: u32,
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    cache: Vec<(u64, Vec<u8>)>,
    /// Where the next appended cluster goes.
    pub next_free: u64,
    /// During a table relocation entries go to the new table only.
    relocating: bool,
    /// Metadata ranges allocated since the caller last took them.
    pub fresh_meta: Vec<(u64, u64)>,
    /// An operation failed half-way (an I/O error): the in-memory state may
    /// be ahead of the disk, so the owner must reload it from disk.
    pub broken: bool,
    /// Reserved clusters: refcount 1 on disk, not yet referenced.
    pool: (u64, u64),
    /// New refcount blocks whose table entries are still to be written.
    pending: Vec<u64>,
    /// Clusters the next pool refill reserves (doubles per refill, reset
    /// when a flush gives the pool back).
    pool_clusters: u64,
    /// The file was grown to cover a reservation: giving it back trims the
    /// unused tail again.
    grown: bool,
    /// Clusters of the reservation from here on lay past the end of the
    /// file when it was taken: never written, they read as zeroes.
    pub zero_from: u64,
}

impl Refcounts {
    pub fn load(
        file: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cs; // capped at 8 MiB by the header check
        let mut raw = try_zeroed(bytes as usize, "refcount table")?;
        file.read_at(&mut raw, table_offset)?;
        let aligned_len = align_up(file_len, cs)?;
        let mut table = Vec::new();
        table
            .try_reserve_exact(raw.len() / 8)
            .map_err(|_| Error::NoMemory("refcount table".into()))?;
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            let off = e & REFT_OFFSET_MASK;
            if !off.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "refcount block {i} at {off:#x} is not cluster aligned"
                )));
            }
            if off != 0 && off.checked_add(cs).is_none_or(|end| end > aligned_len) {
                return Err(corrupt(format!(
                    "refcount block {i} at {off:#x} is past the end of the file"
                )));
            }
            if off != 0 && off < cs {
                return Err(corrupt(format!("refcount block {i} overlaps the header")));
            }
            table.push(off);
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            epb_bits: cluster_bits + 3 - order,
            table,
            table_offset,
            table_clusters: u64::from(table_clusters),
            cache: Vec::new(),
            next_free: aligned_len,
            relocating: false,
            fresh_meta: Vec::new(),
            broken: false,
            pool: (0, 0),
            pending: Vec::new(),
            pool_clusters: Self::first_pool(cluster_bits),
            grown: false,
            zero_from: u64::MAX,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn first_pool(cluster_bits: u32) -> u64 {
        (POOL_BYTES >> cluster_bits).max(1)
    }

    fn max_pool(&self) -> u64 {
        (MAX_POOL_BYTES >> self.cluster_bits)
            .min(MAX_POOL_CLUSTERS)
            .max(Self::first_pool(self.cluster_bits))
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// The cached block at `off`, loading it on a miss.
    fn block(&mut self, file: &dyn Storage, off: u64) -> Result<&mut Vec<u8>> {
        if let Some(i) = self.cache.iter().position(|(o, _)| *o == off) {
            let e = self.cache.remove(i);
            self.cache.push(e);
        } else {
            let mut b = try_zeroed(self.cs() as usize, "refcount block")?;
            file.read_at(&mut b, off)?;
            if self.cache.len() >= BLOCK_CACHE {
                self.cache.remove(0);
            }
            self.cache.push((off, b));
        }
        let last = self.cache.len() - 1;
        Ok(&mut self.cache[last].1)
    }

    /// Refcount of the host cluster `cluster`.
    pub fn get(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let bi = (cluster >> self.epb_bits) as usize;
        let off = match self.table.get(bi) {
            Some(&o) if o != 0 => o,
            _ => return Ok(0),
        };
        let idx = (cluster & ((1 << self.epb_bits) - 1)) as usize;
        let order = self.order;
        Ok(get_entry(self.block(file, off)?, idx, order))
    }

    /// Where the next `alloc` of `n` clusters starts when the pool holds
    /// them, so that a caller can tell whether they will follow its own.
    pub fn next_alloc(&self, n: u64) -> Option<u64> {
        let bytes = n.checked_mul(self.cs())?;
        (self.pool.1 - self.pool.0 >= bytes).then_some(self.pool.0)
    }

    /// Whether host cluster `cluster` can take one more reference (a
    /// 1-bit refcount cannot: packed compressed clusters then start afresh).
    pub fn can_add_reference(&mut self, file: &dyn Storage, cluster: u64) -> Result<bool> {
        Ok(self.get(file, cluster)? < self.max_refcount())
    }

    /// Add `delta` to the refcounts of `count` clusters from `first`.
    pub fn update(&mut self, file: &dyn Storage, first: u64, count: u64, delta: i64) -> Result<()> {
        let r = self.update_inner(file, first, count, delta);
        self.broken |= r.is_err();
        r
    }

    /// Drop one reference from each of `count` clusters from `first`, after
    /// a flush barrier: whatever stopped pointing at them (an L2 entry, an
    /// L1 entry, the header) is on disk before their refcounts go down.
    pub fn release(&mut self, file: &dyn Storage, first: u64, count: u64) -> Result<()> {
        let r = file.flush().and_then(|_| self.update_inner(file, first, count, -1));
        self.broken |= r.is_err();
        r
    }

    /// `n` contiguous clusters whose refcount 1 is already durable, from
    /// the pool (refilled at the end of the file when it runs short).
    pub fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let r = self.alloc_pooled(file, n);
        self.broken |= r.is_err();
        r
    }

    fn alloc_pooled(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let cs = self.cs();
        let bytes = n.checked_mul(cs).ok_or_else(|| corrupt("allocation size overflows"))?;
        if self.pool.1 - self.pool.0 >= bytes {
            let start = self.pool.0;
            self.pool.0 += bytes;
            return Ok(start);
        }
        self.give_back_pool(file)?;
        let want = n.max(self.pool_clusters);
        self.pool_clusters = (self.pool_clusters * 2).min(self.max_pool());
        let (start, got) = self.alloc_inner(file, n, want)?;
        self.write_pending_entries(file)?;
        // The file covers the reservation before anything is handed out,
        // and the barrier below makes that durable too: a disk that keeps
        // an L2 entry but not the write that would have extended the file
        // leaves a reference inside the file (reading stale zeroes), never
        // one past its end (which QEMU's check calls corruption).
        let end = start + got * cs;
        let len = file.len()?;
        self.zero_from = len;
        if len < end {
            file.set_len(end)?;
            self.grown = true;
        }
        // Barrier: the raised refcounts are on disk before anything that
        // points at these clusters can be.
        file.flush()?;
        self.pool = (start + bytes, start + got * cs);
        Ok(start)
    }

    /// Point the table at the refcount blocks created since the last call.
    /// Their content and their own refcounts are flushed first; and a block
    /// whose refcount is kept in another new block is entered only once
    /// that block's entry is durable, so that at no point may the table
    /// name a block whose own refcount cannot be found.
    fn write_pending_entries(&mut self, file: &dyn Storage) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        while !pending.is_empty() {
            file.flush()?;
            let holder = |s: &Self, bi: u64| (s.table[bi as usize] >> s.cluster_bits) >> s.epb_bits;
            let (ready, wait): (Vec<u64>, Vec<u64>) = pending.iter().partition(|&&bi| {
                let h = holder(self, bi);
                h == bi || !pending.contains(&h)
            });
            if ready.is_empty() {
                return Err(Error::Internal("refcount blocks count each other in a cycle".into()));
            }
            for bi in ready {
                file.write_at(&self.table[bi as usize].to_be_bytes(), self.table_offset + bi * 8)?;
            }
            pending = wait;
        }
        Ok(())
    }

    /// Give back the clusters reserved but not used (at flush and close);
    /// the next reservation starts small again.
    pub fn release_pool(&mut self, file: &dyn Storage) -> Result<()> {
        self.pool_clusters = Self::first_pool(self.cluster_bits);
        self.give_back_pool(file)
    }

    fn give_back_pool(&mut self, file: &dyn Storage) -> Result<()> {
        let (s, e) = self.pool;
        if s < e {
            let r = self.update_inner(file, s >> self.cluster_bits, (e - s) >> self.cluster_bits, -1);
            self.broken |= r.is_err();
            r?;
            // They were never written: allocation may start there again
            // (it skips any cluster that has a refcount).
            self.next_free = self.next_free.min(s);
        }
        self.pool = (0, 0);
        if std::mem::take(&mut self.grown) {
            self.trim_tail(file)?;
        }
        Ok(())
    }

    /// Cut the file after its last cluster with a refcount, when the end
    /// of the file holds only clusters given back (a reservation grew the
    /// file to cover it). Nothing points at those: they count zero.
    fn trim_tail(&mut self, file: &dyn Storage) -> Result<()> {
        let cs = self.cs();
        let len = file.len()?;
        let mut end = len.div_ceil(cs);
        let floor = end.saturating_sub(MAX_POOL_CLUSTERS + (MAX_POOL_CLUSTERS >> self.epb_bits) + 2);
        while end > floor && end > 1 && self.get(file, end - 1)? == 0 {
            end -= 1;
        }
        if end * cs < len {
            file.set_len(end * cs)?;
        }
        Ok(())
    }

    fn update_inner(&mut self, file: &dyn Storage, first: u64, count: u64, delta: i64) -> Result<()> {
        let mut c = first;
        let end = first
            .checked_add(count)
            .ok_or_else(|| corrupt("cluster range overflows"))?;
        let max = self.max_refcount();
        while c < end {
            let bi = c >> self.epb_bits;
            let block_end = ((bi + 1) << self.epb_bits).min(end);
            let off = if delta > 0 {
                self.ensure_block(file, bi)?
            } else {
                match self.table.get(bi as usize) {
                    Some(&o) if o != 0 => o,
                    _ => return Err(corrupt(format!("cluster {c} is in use but has no refcount block"))),
                }
            };
            let order = self.order;
            let epb_bits = self.epb_bits;
            let mask = (1u64 << epb_bits) - 1;
            let (i0, i1) = ((c & mask) as usize, ((block_end - 1) & mask) as usize);
            let blk = self.block(file, off)?;
            for i in i0..=i1 {
                let v = get_entry(blk, i, order);
                let nv = if delta >= 0 {
                    v.checked_add(delta as u64).filter(|&n| n <= max)
                } else {
                    v.checked_sub(delta.unsigned_abs())
                };
                let nv = nv.ok_or_else(|| {
                    corrupt(format!(
                        "refcount of cluster {} would leave its range (is {v})",
                        (bi << epb_bits) + i as u64
                    ))
                })?;
                set_entry(blk, i, order, nv);
            }
            let (b0, b1) = byte_range(i0, i1, order);
            let bytes = blk[b0..b1].to_vec();
            file.write_at(&bytes, off + b0 as u64)?;
            c = block_end;
        }
        Ok(())
    }

    /// Reserve the first run of at least `n` and at most `want` free
    /// clusters from `next_free`: its start and length. A shorter run is
    /// taken rather than skipped, so the gap a given-back reservation leaves
    /// before the refcount blocks created for it is filled again (with
    /// small clusters those blocks follow every reservation).
    fn alloc_inner(&mut self, file: &dyn Storage, n: u64, want: u64) -> Result<(u64, u64)> {
        let cs = self.cs();
        // Look at each cluster once. A cluster past the end of the file may
        // still carry a refcount (a truncated image, or a reservation given
        // back at a flush with metadata after it); never hand such a
        // cluster out.
        let mut first = self.next_free >> self.cluster_bits;
        let mut run = 0u64;
        let mut skipped = 0u64;
        while run < want {
            let c = first + run;
            // Nor does a reservation cross into clusters whose refcount
            // block does not exist yet once it has `n`: that block would be
            // created past the reservation, and the file would end there.
            if run >= n && c & ((1 << self.epb_bits) - 1) == 0 && !self.has_block(c >> self.epb_bits) {
                break;
            }
            if self.get(file, c)? != 0 {
                if run >= n {
                    break;
                }
                skipped += run + 1;
                if skipped > MAX_SKIP {
                    return Err(corrupt("refcounts claim clusters far beyond the end of the file"));
                }
                first = c + 1;
                run = 0;
            } else {
                run += 1;
            }
        }
        let start = first << self.cluster_bits;
        self.next_free = run
            .checked_mul(cs)
            .and_then(|b| start.checked_add(b))
            .ok_or_else(|| corrupt("image file would exceed 2^64 bytes"))?;
        self.update(file, first, run, 1)?;
        Ok((start, run))
    }

    fn has_block(&self, bi: u64) -> bool {
        self.table.get(bi as usize).is_some_and(|&o| o != 0)
    }

    /// Take the next cluster for metadata of the refcount structure itself
    /// (its refcount is set by the caller).
    fn take_cluster(&mut self) -> Result<u64> {
        let off = self.next_free;
        self.next_free = off
            .checked_add(self.cs())
            .ok_or_else(|| corrupt("image file would exceed 2^64 bytes"))?;
        Ok(off)
    }

    /// The offset of refcount block `bi`, creating it when missing.
    fn ensure_block(&mut self, file: &dyn Storage, bi: u64) -> Result<u64> {
        if bi >= self.table.len() as u64 {
            if self.relocating {
                return Err(Error::Internal("refcount table grew during its own relocation".into()));
            }
            self.grow_table(file, bi + 1)?;
        }
        let cur = self.table[bi as usize];
        if cur != 0 {
            return Ok(cur);
        }
        let off = self.take_cluster()?;
        self.fresh_meta.push((off, off + self.cs()));
        let cluster = off >> self.cluster_bits;
        let mut blk = try_zeroed(self.cs() as usize, "refcount block")?;
        if cluster >> self.epb_bits == bi {
            // The block describes itself: its own refcount goes in with it.
            set_entry(&mut blk, (cluster & ((1 << self.epb_bits) - 1)) as usize, self.order, 1);
        } else {
            // Crash order: the block's own refcount first (elsewhere).
            self.update(file, cluster, 1, 1)?;
        }
        // Then its content; the table entry that points at it is written
        // after a flush (`alloc_pooled`), so a table never points at a block
        // whose content or own refcount could still be lost.
        file.write_at(&blk, off)?;
        self.cache.retain(|(o, _)| *o != off);
        if self.cache.len() >= BLOCK_CACHE {
            self.cache.remove(0);
        }
        self.cache.push((off, blk));
        self.table[bi as usize] = off;
        if !self.relocating {
            self.pending.push(bi);
        }
        Ok(off)
    }

    /// Move the refcount table to a bigger place at the end of the file.
    /// Crash order: new blocks and the new table are complete before the
    /// header points at the table; the old table is released last.
    fn grow_table(&mut self, file: &dyn Storage, need: u64) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let mut entries = need.max(self.table.len() as u64 * 2).max(per_cluster);
        let start = self.next_free;
        let clusters = loop {
            entries = entries.div_ceil(per_cluster) * per_cluster;
            let clusters = entries / per_cluster;
            // The table's own clusters and the blocks that will count them
            // (at most one per `1 << epb_bits` clusters, plus one) must be
            // described by the new table too.
            let extra_blocks = (clusters >> self.epb_bits) + 2;
            let last = start + (clusters + extra_blocks) * cs;
            let needed = (last >> self.cluster_bits >> self.epb_bits) + 1;
            if needed <= entries {
                break clusters;
            }
            entries = needed;
        };
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::OutOfRange(
                "the refcount table would exceed its 8 MiB cap".into(),
            ));
        }
        let new_off = start;
        self.next_free = start + clusters * cs;
        self.fresh_meta.push((new_off, self.next_free));
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        let mut table = std::mem::take(&mut self.table);
        table
            .try_reserve_exact(entries as usize - table.len())
            .map_err(|_| Error::NoMemory("refcount table".into()))?;
        table.resize(entries as usize, 0);
        self.table = table;
        self.relocating = true;
        let r = self.update(file, new_off >> self.cluster_bits, clusters, 1);
        self.relocating = false;
        r?;
        let mut raw = try_zeroed((clusters * cs) as usize, "refcount table")?;
        for (i, e) in self.table.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        file.write_at(&raw, new_off)?;
        file.flush()?;
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&new_off.to_be_bytes());
        h[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        file.write_at(&h, OFF_REFTABLE)?;
        self.table_offset = new_off;
        self.table_clusters = clusters;
        self.release(file, old_off >> self.cluster_bits, old_clusters)
    }
}

/// Entry `i` of a refcount block with entries of `1 << order` bits. Sub-byte
/// entries are packed from the least significant bit; wider ones are big-endian.
pub fn get_entry(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            u64::from(b[bit / 8] >> (bit % 8)) & ((1u64 << bits) - 1)
        }
        3 => u64::from(b[i]),
        4 => u64::from(be16(b, i * 2)),
        5 => u64::from(be32(b, i * 4)),
        _ => be64(b, i * 8),
    }
}

pub fn set_entry(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            b[bit / 8] = (b[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => b[i] = v as u8,
        4 => b[i * 2..i * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[i * 4..i * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Bytes of a block holding entries `i0..=i1`.
pub fn byte_range(i0: usize, i1: usize, order: u32) -> (usize, usize) {
    let bits = 1usize << order;
    ((i0 * bits) / 8, ((i1 + 1) * bits).div_ceil(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..20 {
                set_entry(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..20 {
                assert_eq!(get_entry(&b, i, order), (i as u64 * 7) & max, "order {order} entry {i}");
            }
        }
        // QEMU's packing for 1-bit refcounts: entry 0 is the lowest bit.
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 0, 1);
        set_entry(&mut b, 3, 0, 1);
        assert_eq!(b[0], 0b1001);
    }

    /// A bare refcount structure: header cluster, table at cluster 1, one
    /// block at cluster 2 counting clusters 0..3.
    fn image(order: u32) -> (MemoryStorage, Refcounts) {
        let cs = 512u64;
        let f = MemoryStorage::new(vec![0; 3 * cs as usize], false);
        f.write_at(&(2 * cs).to_be_bytes(), cs).unwrap();
        let mut blk = vec![0u8; cs as usize];
        for i in 0..3 {
            set_entry(&mut blk, i, order, 1);
        }
        f.write_at(&blk, 2 * cs).unwrap();
        let r = Refcounts::load(&f, 9, order, cs, 1, 3 * cs).unwrap();
        (f, r)
    }

    #[test]
    fn allocation_grows_blocks_and_table() {
        for order in [0u32, 1, 4, 6] {
            let (f, mut r) = image(order);
            let mut offs = Vec::new();
            // 64-bit refcounts in 512-byte blocks: 64 clusters per block, 64
            // blocks per table cluster: this forces several relocations.
            for _ in 0..3000 {
                offs.push(r.alloc(&f, 3).unwrap());
            }
            for o in &offs {
                for k in 0..3 {
                    assert_eq!(r.get(&f, (o >> 9) + k).unwrap(), 1, "order {order}");
                }
            }
            // Every cluster in use is counted exactly once: re-read from disk.
            let len = r.next_free;
            f.set_len(len).unwrap();
            let h = f.snapshot();
            let toff = be64(&h, 48).max(r.table_offset);
            let mut fresh = Refcounts::load(&f, 9, order, toff, r.table_clusters as u32, len).unwrap();
            let mut total = 0;
            for c in 0..(len >> 9) {
                total += fresh.get(&f, c).unwrap();
            }
            // header + data + table + blocks: every cluster below next_free
            // is in use except the released old tables.
            let released: u64 = (0..(len >> 9)).filter(|&c| fresh.get(&f, c).unwrap() == 0).count() as u64;
            assert!(total > 3 * 3000, "order {order}: {total}");
            assert_eq!(total + released, len >> 9, "order {order}");
            assert!(released <= 64, "order {order}: {released} clusters free");
        }
    }
}
