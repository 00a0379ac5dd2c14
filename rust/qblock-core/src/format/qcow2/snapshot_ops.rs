//! Internal snapshots: create, apply (QEMU's "goto") and delete
//! (docs/interop/qcow2.txt: "Snapshots", "Host cluster management",
//! "Cluster mapping"). The table's format is in `snapshot`.
//!
//! A snapshot is a copy of the active L1 table; L2 tables and data
//! clusters are shared, and every L1 table through which a cluster is
//! reached holds one reference to it (as `qemu-img check` counts them).
//! The copied flag is set exactly where a cluster is ours alone; the write
//! path copies a cluster without it before writing (`write`), so writes
//! after a snapshot never reach the snapshot's clusters.
//!
//! Every operation holds the write gate (no write runs meanwhile) and the
//! allocation lock, and leaves the image durable. Reads may run meanwhile:
//! a read sees each cluster before or after the change, and clusters freed
//! here are never handed out again (`refcount`), so it never sees garbage.
//!
//! Crash order, each step durable before the next (a crash anywhere leaves
//! at worst leaked clusters, never a reference to a cluster whose refcount
//! does not count it, nor a copied flag on a shared cluster):
//! - create: the L1 copy; the tree's refcounts raised and the active
//!   copied flags cleared; the new table; the header; the old table freed.
//! - apply: the snapshot tree's refcounts raised; the active L1 (and the
//!   size) overwritten; the old tree's refcounts lowered; copied flags set.
//! - delete: the new table and the header without the entry; the snapshot
//!   tree's refcounts lowered and its L1 freed; copied flags set where a
//!   cluster became ours alone.

use super::cluster::{check_l1_entry, load_l1};
use super::header::{OFF_NB_SNAPSHOTS, OFF_SIZE};
use super::refcount::Refcounts;
use super::snapshot::{self, Snapshot, Table};
use super::types::*;
use super::Qcow2;
use crate::driver::SnapshotInfo;
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Error, Result};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// Sorted cluster numbers as runs of consecutive clusters referenced the
/// same number of times: (first, count, references).
fn runs(sorted: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let c = sorted[i];
        let k = sorted[i..].iter().take_while(|&&x| x == c).count();
        match out.last_mut() {
            Some((first, n, refs)) if *first + *n == c && *refs == k as u64 => *n += 1,
            _ => out.push((c, 1, k as u64)),
        }
        i += k;
    }
    out
}

/// Table words as big-endian bytes.
fn be_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

fn not_found(key: &str) -> Error {
    invalid(format!("the image has no snapshot with the id or name '{key}'"))
}

impl Qcow2 {
    /// Run a snapshot operation with no write in flight and the allocation
    /// state in hand.
    fn with_snapshot_locks<R>(&self, op: impl FnOnce(&mut Refcounts) -> Result<R>) -> Result<R> {
        if self.has_data_file() {
            // QEMU refuses them too: the data file would have to be shared.
            return Err(unsupported(
                "internal snapshots are not supported in a qcow2 image with an external data file",
            ));
        }
        let _gate = self.gate.write();
        let mut guard = self.lock_alloc()?;
        let rc = guard
            .as_mut()
            .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
        op(rc)
    }

    pub(super) fn snapshot_create_impl(&self, name: &str) -> Result<SnapshotInfo> {
        snapshot::check_name(name)?;
        self.with_snapshot_locks(|rc| {
            if rc.max_refcount() < 2 {
                return Err(unsupported(
                    "a qcow2 image with refcount_bits=1 cannot share a cluster with a snapshot",
                ));
            }
            let table = self.snaps.read().clone();
            if table.list.len() >= MAX_SNAPSHOTS as usize {
                return Err(unsupported(format!(
                    "a qcow2 image holds at most {MAX_SNAPSHOTS} snapshots"
                )));
            }
            if table.list.iter().any(|s| s.name == name.as_bytes()) {
                return Err(invalid(format!("the image already has a snapshot named '{name}'")));
            }
            let id = table.next_id()?;
            let file = self.file.as_ref();
            let entries = self.l1.read().entries.clone();
            let copy: Vec<u64> = entries.iter().map(|e| e & !COPIED).collect();
            let l1_off = if entries.is_empty() {
                0
            } else {
                self.write_fresh(rc, &be_bytes(&copy), "snapshot L1 table")?
            };
            if let Err(e) = self.adjust_tree(rc, &entries, 1) {
                if l1_off != 0 {
                    let n = (entries.len() as u64 * 8).div_ceil(self.g.cluster_size);
                    let _ = rc.release(file, l1_off >> self.g.cluster_bits, n);
                }
                return Err(e);
            }
            self.fix_copied(rc)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let sn = Snapshot {
                l1_table_offset: l1_off,
                l1_size: entries.len() as u32,
                id: id.into_bytes(),
                name: name.as_bytes().to_vec(),
                // 32-bit seconds, microseconds in the nanosecond field:
                // what qemu-img records.
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size: self.size.load(Ordering::Relaxed),
                // qemu-img records 0 (not "none"): ours list as its own do.
                icount: 0,
                extra_rest: Vec::new(),
            };
            let info = sn.info();
            let mut list = table.list;
            list.push(sn);
            self.write_table(rc, list)?;
            Ok(info)
        })
    }

    pub(super) fn snapshot_apply_impl(&self, key: &str) -> Result<()> {
        self.with_snapshot_locks(|rc| {
            let sn = {
                let t = self.snaps.read();
                t.list[t.find(key).ok_or_else(|| not_found(key))?].clone()
            };
            if self.hdr.bitmaps.is_some() && self.hdr.autoclear & AUTOCLEAR_BITMAPS != 0 {
                // The bitmaps would describe writes the snapshot never saw.
                return Err(unsupported(
                    "a snapshot cannot be applied to an image with persistent dirty bitmaps (QEMU refuses it too)",
                ));
            }
            let sn_l1 = self.snapshot_l1(&sn)?;
            let cur = self.size.load(Ordering::Relaxed);
            let size = sn.disk_size;
            if size > i64::MAX as u64 {
                return Err(corrupt(format!("snapshot '{key}' records a disk size of {size} bytes")));
            }
            if size != cur && self.hdr.version < 3 {
                return Err(unsupported(
                    "a compat=0.10 qcow2 image cannot be resized to the size of its snapshot",
                ));
            }
            let need = self
                .g
                .l1_entries_for(size)
                .ok_or_else(|| corrupt("the snapshot's disk size overflows the L1 range"))?
                .max(sn_l1.len() as u64);
            // Everything that can refuse before the first change.
            let active = self.l1.read().entries.clone();
            self.check_tree(rc, &active, -1)?;
            self.adjust_tree(rc, &sn_l1, 1)?;
            if let Err(e) = self.grow_l1(rc, need) {
                let _ = self.adjust_tree(rc, &sn_l1, -1);
                return Err(e);
            }
            let (l1_off, old) = {
                let l1 = self.l1.read();
                (l1.offset, l1.entries.clone())
            };
            // Padded with zeroes when the snapshot's table is shorter; no
            // entry is ours alone until the flags are recomputed.
            let mut new = vec![0u64; old.len()];
            for (n, e) in new.iter_mut().zip(&sn_l1) {
                *n = e & !COPIED;
            }
            let file = self.file.as_ref();
            file.flush()?; // the raised refcounts before the references they count
            file.write_at(&be_bytes(&new), l1_off)?;
            if size != cur {
                // QEMU resizes the image to the snapshot's size.
                file.write_at(&size.to_be_bytes(), OFF_SIZE)?;
            }
            self.l1.write().entries = new;
            self.size.store(size, Ordering::Relaxed);
            file.flush()?; // nothing points at the old tree before it loses its references
            self.adjust_tree(rc, &old, -1)?;
            self.fix_copied(rc)?;
            // The overlap check now knows the L2 tables of the new tree.
            self.build_meta(rc)?;
            file.flush()
        })
    }

    pub(super) fn snapshot_delete_impl(&self, key: &str) -> Result<()> {
        self.with_snapshot_locks(|rc| {
            let (idx, mut list) = {
                let t = self.snaps.read();
                (t.find(key).ok_or_else(|| not_found(key))?, t.list.clone())
            };
            let sn = list.remove(idx);
            let sn_l1 = self.snapshot_l1(&sn)?;
            self.check_tree(rc, &sn_l1, -1)?;
            self.write_table(rc, list)?;
            let file = self.file.as_ref();
            self.adjust_tree(rc, &sn_l1, -1)?;
            if sn.l1_size > 0 {
                let n = (u64::from(sn.l1_size) * 8).div_ceil(self.g.cluster_size);
                rc.update(file, sn.l1_table_offset >> self.g.cluster_bits, n, -1)?;
            }
            self.fix_copied(rc)?;
            file.flush()
        })
    }

    /// A snapshot's L1 table, every entry checked.
    fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        if sn.l1_size == 0 {
            return Ok(Vec::new());
        }
        // `read_table` checked its size and place.
        let end = self.file_end.load(Ordering::Relaxed);
        Ok(
            load_l1(self.file.as_ref(), &self.g, sn.l1_table_offset, sn.l1_size, end, false)?
                .0
                .entries,
        )
    }

    /// Place `bytes` in fresh clusters at the end of the file, zero-padded
    /// to whole clusters; returns their offset. Their refcount is durable
    /// before they are written (`Refcounts::alloc`).
    fn write_fresh(&self, rc: &mut Refcounts, bytes: &[u8], what: &str) -> Result<u64> {
        let cs = self.g.cluster_size;
        let clusters = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = rc.alloc(self.file.as_ref(), clusters)?;
        let end = off + clusters * cs;
        self.add_meta(rc, Some((off, end)));
        self.note_end(end);
        let mut raw = try_zeroed((clusters * cs) as usize, what)?;
        raw[..bytes.len()].copy_from_slice(bytes);
        self.file.write_at(&raw, off)?;
        Ok(off)
    }

    /// Replace the snapshot table by `list`: the new table in fresh
    /// clusters, then the header (count and offset in one 12-byte write
    /// inside the first sector), then the old table freed.
    fn write_table(&self, rc: &mut Refcounts, list: Vec<Snapshot>) -> Result<()> {
        let file = self.file.as_ref();
        let bits = self.g.cluster_bits;
        let (old_off, old_len) = {
            let t = self.snaps.read();
            (t.offset, t.len)
        };
        let old_clusters = old_len.div_ceil(self.g.cluster_size);
        for c in (old_off >> bits)..(old_off >> bits) + old_clusters {
            // Checked before anything changes: freeing it must not fail later.
            if rc.get(file, c)? == 0 {
                return Err(corrupt(format!("the snapshot table's cluster {c} has no refcount")));
            }
        }
        let raw = snapshot::serialize(&list)?;
        let off = if list.is_empty() {
            0
        } else {
            self.write_fresh(rc, &raw, "snapshot table")?
        };
        file.flush()?; // the table, the L1 tables it names and their refcounts
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(list.len() as u32).to_be_bytes());
        h[4..].copy_from_slice(&off.to_be_bytes());
        file.write_at(&h, OFF_NB_SNAPSHOTS)?;
        file.flush()?;
        *self.snaps.write() = Table {
            offset: off,
            len: raw.len() as u64,
            list,
        };
        if old_clusters > 0 {
            rc.release(file, old_off >> bits, old_clusters)?;
        }
        Ok(())
    }

    /// The ranges (sorted by start) of the metadata that is not an L2
    /// table: header, refcount table and blocks, the active and every
    /// snapshot's L1 table, the snapshot table.
    fn structure(&self, rc: &Refcounts) -> Vec<(u64, u64)> {
        let cs = self.g.cluster_size;
        let tables = |off: u64, bytes: u64| (off, off + bytes.div_ceil(cs) * cs);
        let mut m = vec![(0, cs), tables(rc.table_offset, rc.table_clusters * cs)];
        m.extend(rc.table.iter().filter(|&&o| o != 0).map(|&o| (o, o + cs)));
        {
            let l1 = self.l1.read();
            m.push(tables(l1.offset, l1.entries.len() as u64 * 8));
        }
        let t = self.snaps.read();
        m.push(tables(t.offset, t.len));
        m.extend(
            t.list
                .iter()
                .map(|s| tables(s.l1_table_offset, u64::from(s.l1_size) * 8)),
        );
        m.retain(|r| r.0 < r.1);
        m.sort_unstable();
        // Merged, so the last range starting at or before an offset is the
        // only one that can hold it.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(m.len());
        for r in m {
            match merged.last_mut() {
                Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
                _ => merged.push(r),
            }
        }
        merged
    }

    /// Every host cluster the L2 table at `l2_off` references (data,
    /// preallocated zero and compressed clusters), once per reference,
    /// and the table itself; sorted. None of its data may lie on metadata
    /// (a hostile tree would make us free it).
    fn references_of(&self, l2_off: u64) -> Result<Vec<u64>> {
        let g = self.g;
        let words = self.l2.copy(self.file.as_ref(), l2_off)?;
        let mut out = Vec::with_capacity(words.len() / g.words() + 1);
        out.push(l2_off >> g.cluster_bits);
        for &e in words.iter().step_by(g.words()) {
            if e & COMPRESSED != 0 {
                let (first, n) = self.compressed_clusters(e)?;
                self.check_not_meta(first << g.cluster_bits, n << g.cluster_bits)?;
                out.extend(first..first + n);
            } else if e & OFFSET_MASK != 0 {
                self.check_host(e & OFFSET_MASK)?;
                self.check_not_meta(e & OFFSET_MASK, g.cluster_size)?;
                out.push((e & OFFSET_MASK) >> g.cluster_bits);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Add `delta` to the refcount of every cluster the L1 table `l1`
    /// reaches, once per reference. Each L2 table's clusters are checked
    /// before any of them changes; when raising fails, the tables already
    /// raised are lowered again, so a refused operation changes nothing.
    /// An L2 table lying on the header, the refcount structure, an L1
    /// table or the snapshot table is refused (a hostile tree would make
    /// us free it).
    fn adjust_tree(&self, rc: &mut Refcounts, l1: &[u64], delta: i64) -> Result<()> {
        self.tree_pass(rc, l1, delta, true)
    }

    /// What `adjust_tree` checks, changing nothing: run before an
    /// operation's first change when the tree's refcounts drop later.
    fn check_tree(&self, rc: &mut Refcounts, l1: &[u64], delta: i64) -> Result<()> {
        self.tree_pass(rc, l1, delta, false)
    }

    fn tree_pass(&self, rc: &mut Refcounts, l1: &[u64], delta: i64, change: bool) -> Result<()> {
        let end = self.file_end.load(Ordering::Relaxed);
        let structure = self.structure(rc);
        for (i, &e) in l1.iter().enumerate() {
            let off = check_l1_entry(&self.g, i, e, end)?;
            if off == 0 {
                continue;
            }
            let at = structure.partition_point(|r| r.0 <= off);
            if at > 0 && structure[at - 1].1 > off {
                return Err(corrupt(format!("L2 table {off:#x} lies on other metadata")));
            }
            let r = self
                .references_of(off)
                .and_then(|refs| self.adjust_refs(rc, &refs, delta, change));
            if let Err(err) = r {
                if delta > 0 && change {
                    let _ = self.tree_pass(rc, &l1[..i], -delta, true);
                }
                return Err(err);
            }
        }
        Ok(())
    }

    fn adjust_refs(&self, rc: &mut Refcounts, refs: &[u64], delta: i64, change: bool) -> Result<()> {
        let file = self.file.as_ref();
        let runs = runs(refs);
        let max = rc.max_refcount();
        // Refcounts of 32 bits and more cannot overflow with 65536 snapshots.
        if delta < 0 || max < u64::from(u32::MAX) {
            for &(first, n, k) in &runs {
                let want = k * delta.unsigned_abs();
                for c in first..first + n {
                    let v = rc.get(file, c)?;
                    if delta > 0 && v.checked_add(want).is_none_or(|x| x > max) {
                        return Err(unsupported(format!(
                            "cluster {c} has {v} references, the most refcount_bits={} can count",
                            1u32 << self.hdr.refcount_order
                        )));
                    }
                    if delta < 0 && v < want {
                        return Err(corrupt(format!(
                            "cluster {c} has {v} references, fewer than the {want} being dropped"
                        )));
                    }
                }
            }
        }
        for (first, n, k) in runs.into_iter().filter(|_| change) {
            rc.update(file, first, n, delta * k as i64)?;
        }
        Ok(())
    }

    /// Set the copied flag on every active L1 and L2 entry whose cluster
    /// has exactly one reference, and clear it everywhere else (QEMU
    /// recomputes them so). An entry of a shared L2 table is never ours
    /// alone. Refcounts are flushed first: a flag claiming sole ownership
    /// must not reach the disk before the refcount that makes it true.
    fn fix_copied(&self, rc: &mut Refcounts) -> Result<()> {
        let file = self.file.as_ref();
        file.flush()?;
        let g = self.g;
        let (l1_off, old) = {
            let l1 = self.l1.read();
            (l1.offset, l1.entries.clone())
        };
        let mut new = old.clone();
        for (i, &l1e) in old.iter().enumerate() {
            let off = l1e & OFFSET_MASK;
            if off == 0 {
                new[i] = l1e & !COPIED;
                continue;
            }
            let own = rc.get(file, off >> g.cluster_bits)? == 1;
            new[i] = if own { l1e | COPIED } else { l1e & !COPIED };
            let words = self.l2.copy(file, off)?;
            let mut fixed = words.clone();
            for k in (0..words.len()).step_by(g.words()) {
                let e = words[k];
                let host = e & OFFSET_MASK;
                let sole = own && e & COMPRESSED == 0 && host != 0 && rc.get(file, host >> g.cluster_bits)? == 1;
                fixed[k] = if sole { e | COPIED } else { e & !COPIED };
            }
            if fixed != words {
                file.write_at(&be_bytes(&fixed), off)?;
                self.l2.update(off, 0, &fixed);
            }
        }
        if new != old {
            file.write_at(&be_bytes(&new), l1_off)?;
            self.l1.write().entries = new;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_group_consecutive_clusters_by_reference_count() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3, 4, 5, 9]), vec![(3, 3, 1), (9, 1, 1)]);
        // Two compressed clusters sharing host cluster 5.
        assert_eq!(runs(&[4, 5, 5, 6, 7]), vec![(4, 1, 1), (5, 1, 2), (6, 2, 1)]);
    }
}
