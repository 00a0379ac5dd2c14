//! Rebuilding the refcounts of a dirty image (docs/interop/qcow2.txt:
//! "lazy refcounts", incompatible bit 0). An image with lazy refcounts may
//! have stale refcounts after a crash, and QEMU repairs it when opening it
//! for writing; so do we before writing to it.
//!
//! Every reference is counted from the metadata itself: header, active
//! L1/L2 tables and the clusters they map, the snapshot table and every
//! snapshot's L1/L2 tables, the bitmap directory, bitmap tables and bitmap
//! data. A fresh refcount table and blocks are written at the end of the
//! file; then the header points at them; then the dirty bit is cleared.
//! Crash order: a crash before the header update leaves the old (stale)
//! structures in place with the dirty bit still set, so the next writable
//! open repairs again; the old structures become unreferenced clusters.

use super::bitmap;
use super::header::{BitmapsExt, Header, OFF_INCOMPAT, OFF_REFCOUNT_ORDER, OFF_REFTABLE};
use super::refcount::set_entry;
use super::snapshot;
use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, unsupported, Error, Result};

/// Largest file (in clusters) we repair or check: the counting array is 4
/// bytes per cluster, so this bounds it at 64 MiB (1 TiB of 64 KiB clusters).
pub const MAX_REPAIR_CLUSTERS: u64 = 1 << 24;

/// Metadata the recount may read: every snapshot walks its L2 tables again,
/// so a hostile table of snapshots could otherwise make it read without end.
pub const MAX_REPAIR_READ: u64 = 2 << 30;

/// Where a walk over the metadata sends what it finds: the recount here,
/// and the consistency check (`check.rs`), which also classifies damage.
pub trait RefSink {
    /// One reference to every cluster touched by `[off, off+len)`.
    fn add(&mut self, off: u64, len: u64, what: &str) -> Result<()>;
    /// `bytes` of tables are about to be read (bounded by the caller).
    fn charge(&mut self, bytes: u64) -> Result<()>;
}

struct Counter {
    cs: u64,
    cluster_bits: u32,
    counts: Vec<u32>,
    /// Bytes of tables read so far.
    read: u64,
}

impl RefSink for Counter {
    fn add(&mut self, off: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off
            .checked_add(len)
            .ok_or_else(|| corrupt(format!("{what} range overflows")))?;
        let (first, last) = (off >> self.cluster_bits, (end - 1) >> self.cluster_bits);
        if last >= self.counts.len() as u64 {
            return Err(corrupt(format!("{what} at {off:#x} is past the end of the file")));
        }
        for c in first..=last {
            let v = &mut self.counts[c as usize];
            *v = v.checked_add(1).ok_or_else(|| corrupt("refcount overflow"))?;
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.read += bytes;
        if self.read > MAX_REPAIR_READ {
            return Err(unsupported(
                "recounting this image's refcounts needs more than 2 GiB of table reads; \
                 repair it with 'qemu-img check -r all'",
            ));
        }
        Ok(())
    }
}

impl Counter {
    /// An L1 table and everything below it.
    fn l1(&mut self, file: &dyn Storage, g: &Geometry, off: u64, size: u64, data_file: bool) -> Result<()> {
        if size * 8 > MAX_L1_BYTES || !off.is_multiple_of(self.cs) {
            return Err(corrupt(format!("L1 table at {off:#x} of {size} entries is invalid")));
        }
        self.add(off, size * 8, "L1 table")?;
        self.charge(size * 8)?;
        let mut raw = try_zeroed((size * 8) as usize, "L1 table")?;
        file.read_at(&mut raw, off)?;
        let mut l2 = try_zeroed(self.cs as usize, "L2 table")?;
        for c in raw.chunks_exact(8) {
            let l2_off = be64(c, 0) & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(self.cs) {
                return Err(corrupt(format!("L2 table at {l2_off:#x} is not cluster aligned")));
            }
            self.add(l2_off, self.cs, "L2 table")?;
            self.charge(self.cs)?;
            file.read_at(&mut l2, l2_off)?;
            for e in l2.chunks_exact(8 * g.words()) {
                let e = be64(e, 0);
                if e & COMPRESSED != 0 {
                    let (o, n) = g.compressed(e);
                    self.add(o & !511, n + (o & 511), "compressed cluster")?;
                } else if !data_file && e & OFFSET_MASK != 0 {
                    self.add(e & OFFSET_MASK, self.cs, "data cluster")?;
                }
            }
        }
        Ok(())
    }
}

/// How many references each cluster of the image file has, from the
/// metadata (the refcount structure itself excluded).
pub fn count_references(file: &dyn Storage, h: &Header, l1_offset: u64, l1_size: u64) -> Result<Vec<u32>> {
    let cs = h.cluster_size();
    let g = Geometry::new(h.cluster_bits, h.extended_l2());
    let file_len = align_up(file.len()?, cs)?;
    let nclusters = file_len / cs;
    if nclusters > MAX_REPAIR_CLUSTERS {
        return Err(unsupported(
            "image too large to rebuild its refcounts; run 'qemu-img check -r all'",
        ));
    }
    let mut counts = Vec::new();
    counts
        .try_reserve_exact(nclusters as usize)
        .map_err(|_| Error::NoMemory("refcount rebuild".into()))?;
    counts.resize(nclusters as usize, 0u32);
    let mut c = Counter {
        cs,
        cluster_bits: h.cluster_bits,
        counts,
        read: 0,
    };
    let data_file = h.data_file.is_some();
    c.add(0, cs, "header")?;
    c.l1(file, &g, l1_offset, l1_size, data_file)?;
    // Snapshots: the table, then each snapshot's L1 and L2 tables.
    if h.nb_snapshots > 0 {
        let (snaps, table_len) = snapshot::read_table(file, h, file.len()?)?;
        for sn in snaps {
            c.l1(file, &g, sn.l1_table_offset, u64::from(sn.l1_size), data_file)?;
        }
        c.add(h.snapshots_offset, table_len, "snapshot table")?;
    }
    if let Some(b) = &h.bitmaps {
        bitmap_refs(file, b, cs, &mut c)?;
    }
    Ok(c.counts)
}

/// The bitmap directory, every bitmap table and the data clusters they
/// name, as references.
pub fn bitmap_refs(file: &dyn Storage, b: &BitmapsExt, cs: u64, sink: &mut dyn RefSink) -> Result<()> {
    if b.directory_size > MAX_BITMAP_DIR {
        return Err(corrupt("bitmap directory too large"));
    }
    sink.add(b.directory_offset, b.directory_size, "bitmap directory")?;
    let mut dir = try_zeroed(b.directory_size as usize, "bitmap directory")?;
    file.read_at(&mut dir, b.directory_offset)?;
    for (at, _) in bitmap::entries(&dir, b.nb_bitmaps)? {
        let entry = at - 12;
        let t_off = be64(&dir, entry);
        let t_size = u64::from(be32(&dir, entry + 8));
        if !t_off.is_multiple_of(cs) || t_size * 8 > MAX_L1_BYTES {
            return Err(corrupt("bitmap table is invalid"));
        }
        sink.add(t_off, t_size * 8, "bitmap table")?;
        sink.charge(t_size * 8)?;
        let mut t = try_zeroed((t_size * 8) as usize, "bitmap table")?;
        file.read_at(&mut t, t_off)?;
        for e in t.chunks_exact(8) {
            let o = be64(e, 0) & OFFSET_MASK;
            if o != 0 {
                sink.add(o, cs, "bitmap data")?;
            }
        }
    }
    Ok(())
}

/// Whether every count fits entries of `order`: QEMU's refusal to narrow
/// the width below a cluster's refcount, or corruption at the same width.
fn check_counts(counts: &[u32], h: &Header, order: u32) -> Result<()> {
    let cs = h.cluster_size();
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    if let Some((cl, &v)) = counts.iter().enumerate().find(|(_, &v)| u64::from(v) > max) {
        return Err(if order == h.refcount_order {
            corrupt(format!(
                "cluster {cl} has {v} references, more than refcount_bits allow"
            ))
        } else {
            // QEMU's wording (qcow2_change_refcount_order).
            crate::error::invalid(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                1u32 << order,
                cl as u64 * cs
            ))
        });
    }
    Ok(())
}

/// Whether the references of the image fit refcount entries of `order`
/// (checked before an amend touches anything).
pub fn check_width(file: &dyn Storage, h: &Header, order: u32) -> Result<()> {
    let counts = count_references(file, h, h.l1_table_offset, u64::from(h.l1_size))?;
    check_counts(&counts, h, order)
}

/// Recount every reference and write a fresh refcount structure.
pub fn rebuild(file: &dyn Storage, h: &mut Header, l1_offset: u64, l1_size: u64) -> Result<()> {
    rebuild_with_order(file, h, l1_offset, l1_size, h.refcount_order)
}

/// [`rebuild`] with entries of `order` (refcount_bits = 1 << order) in the
/// new structure. Every count is checked against the new width before
/// anything is written.
pub fn rebuild_with_order(file: &dyn Storage, h: &mut Header, l1_offset: u64, l1_size: u64, order: u32) -> Result<()> {
    if order > MAX_REFCOUNT_ORDER || (order != 4 && h.version < 3) {
        return Err(Error::Internal(format!(
            "refcount order {order} for a version {} image",
            h.version
        )));
    }
    let counts = count_references(file, h, l1_offset, l1_size)?;
    check_counts(&counts, h, order)?;
    write_refcounts_with_order(file, h, &counts, order)
}

/// Write a fresh refcount structure giving cluster `i` the refcount
/// `counts[i]` (`counts` covers at least the whole file; the structure goes
/// right after the clusters it covers and counts itself), switch the header
/// to it and clear the dirty bit. The old structure is left unreferenced.
pub fn write_refcounts(file: &dyn Storage, h: &mut Header, counts: &[u32]) -> Result<()> {
    write_refcounts_with_order(file, h, counts, h.refcount_order)
}

/// [`write_refcounts`] with entries of `order`. The header's table offset,
/// table size and (when it changes) refcount order are switched by one
/// write of bytes 48..100, inside the first sector, so the image names
/// either the old structure with the old width or the new one with the new
/// width, never a mix.
fn write_refcounts_with_order(file: &dyn Storage, h: &mut Header, counts: &[u32], order: u32) -> Result<()> {
    let cs = h.cluster_size();
    let file_len = counts.len() as u64 * cs;
    if file_len < file.len()? {
        return Err(Error::Internal("refcount rebuild: counts do not cover the file".into()));
    }
    let nclusters = counts.len() as u64;
    // The new refcount structure at the end of the file counts itself.
    let epb = (cs * 8) >> order;
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = nclusters + blocks + table;
        let (nb, nt) = (total.div_ceil(epb), (total.div_ceil(epb) * 8).div_ceil(cs));
        if nb <= blocks && nt <= table {
            break;
        }
        blocks = blocks.max(nb);
        table = table.max(nt);
    }
    if table * cs > MAX_REFTABLE_BYTES {
        return Err(unsupported("rebuilt refcount table would exceed 8 MiB"));
    }
    let table_off = file_len;
    let blocks_off = table_off + table * cs;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    let mut tbl = try_zeroed((table * cs) as usize, "refcount table")?;
    let mut blk = try_zeroed(cs as usize, "refcount block")?;
    let total = nclusters + blocks + table;
    for b in 0..blocks {
        blk.fill(0);
        for i in 0..epb {
            let cl = b * epb + i;
            if cl >= total {
                break;
            }
            let v = if cl < nclusters {
                u64::from(counts[cl as usize])
            } else {
                1
            };
            if v > max {
                return Err(corrupt(format!(
                    "cluster {cl} has {v} references, more than refcount_bits allow"
                )));
            }
            set_entry(&mut blk, i as usize, order, v);
        }
        let o = blocks_off + b * cs;
        file.write_at(&blk, o)?;
        tbl[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&o.to_be_bytes());
    }
    file.write_at(&tbl, table_off)?;
    file.flush()?;
    // Switch the header to the new table, then clear the dirty bit.
    if order == h.refcount_order {
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table as u32).to_be_bytes());
        file.write_at(&hdr, OFF_REFTABLE)?;
    } else {
        // Bytes 48..100 as they are on disk now (the dirty bit included).
        let mut hdr = [0u8; (OFF_REFCOUNT_ORDER + 4 - OFF_REFTABLE) as usize];
        file.read_at(&mut hdr, OFF_REFTABLE)?;
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..12].copy_from_slice(&(table as u32).to_be_bytes());
        let at = (OFF_REFCOUNT_ORDER - OFF_REFTABLE) as usize;
        hdr[at..].copy_from_slice(&order.to_be_bytes());
        file.write_at(&hdr, OFF_REFTABLE)?;
    }
    file.flush()?;
    if h.version >= 3 && h.incompatible & INCOMPAT_DIRTY != 0 {
        // (Version 2 has no feature fields: offset 72 starts its extensions.)
        h.incompatible &= !INCOMPAT_DIRTY;
        file.write_at(&h.incompatible.to_be_bytes(), OFF_INCOMPAT)?;
        file.flush()?;
    }
    h.refcount_order = order;
    h.refcount_table_offset = table_off;
    h.refcount_table_clusters = table as u32;
    Ok(())
}
