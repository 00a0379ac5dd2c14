//! The write path: writes into allocated clusters in place, allocation of
//! new clusters with copy-on-write of the bytes a write does not cover
//! (from the backing chain, zero units, shared or compressed clusters),
//! zero clusters, growing the image (docs/interop/qcow2.txt: "Cluster
//! mapping", "Copied flag", "Extended L2 Entries").
//!
//! Locking: a write into clusters whose copied flag is set (refcount 1,
//! ours alone) needs only the L2 lookup's read lock; everything that
//! changes metadata serializes on the allocation mutex.
//!
//! Crash order, for every metadata update here: refcounts are raised first
//! (`Refcounts::alloc`), then the data is written, then the L2 entry, then
//! (for a new L2 table) the L1 entry, then the header; references are
//! dropped (refcount lowered) only after nothing points at the cluster.
//! A crash at any point leaves at worst leaked clusters, never a reference
//! to a cluster with a wrong refcount or to unwritten data.

use super::bitmap;
use super::header::{OFF_AUTOCLEAR, OFF_L1_SIZE, OFF_SIZE};
use super::refcount::Refcounts;
use super::types::*;
use super::Qcow2;
use crate::backend::Storage;
use crate::driver::Below;
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Error, Result};
use parking_lot::MutexGuard;
use std::sync::atomic::Ordering;

/// Largest run of new clusters one allocation writes at once: bounds the
/// buffer a single write assembles (at least one cluster).
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Buffer for writing zero bytes.
const ZERO_CHUNK: usize = 1 << 20;

impl Qcow2 {
    fn data_storage(&self) -> &dyn Storage {
        match &self.data {
            Some(d) => d.as_ref(),
            None => self.file.as_ref(),
        }
    }

    /// The allocation state, loaded (and the image prepared for writing)
    /// on first use.
    pub(super) fn lock_alloc(&self) -> Result<MutexGuard<'_, Option<Refcounts>>> {
        if self.read_only {
            return Err(invalid("the image is open read-only"));
        }
        if self.damaged_l1 {
            return Err(corrupt(
                "the image has damaged L1 entries (opened for checking): writes are refused",
            ));
        }
        if self.stale.load(Ordering::Acquire) {
            return Err(corrupt(
                "the image is dirty or marked corrupt and was opened for checking: \
                 its refcounts are stale until a repair (check -r all) rebuilds them",
            ));
        }
        let mut g = self.alloc.lock();
        if g.as_ref().is_some_and(|rc| rc.broken) {
            // A previous operation failed half-way: start again from the disk.
            *g = None;
        }
        if g.is_none() {
            let len = self.file.len()?;
            // From the header on disk: a table moved since the open (grown,
            // or rebuilt by a repair) is where it is now.
            let h = self.disk_header()?;
            let mut rc = Refcounts::load(
                self.file.as_ref(),
                self.g.cluster_bits,
                self.hdr.refcount_order,
                h.refcount_table_offset,
                h.refcount_table_clusters,
                len,
            )?;
            rc.next_free = rc.next_free.max(self.file_end.load(Ordering::Relaxed));
            self.build_meta(&rc)?;
            *g = Some(rc);
        }
        if !self.prepared.load(Ordering::Acquire) {
            self.prepare_locked()?;
            self.prepared.store(true, Ordering::Release);
        }
        Ok(g)
    }

    /// The metadata ranges of the image as opened (see `Qcow2::meta`).
    /// Two pieces of metadata sharing a cluster (a refcount block on the
    /// L1 table, an L2 table on a refcount block...) make the image corrupt:
    /// writing one would destroy the other.
    pub(super) fn build_meta(&self, rc: &Refcounts) -> Result<()> {
        let cs = self.g.cluster_size;
        let h = &self.hdr;
        let mut m = vec![(0, cs), (rc.table_offset, rc.table_offset + rc.table_clusters * cs)];
        {
            let l1 = self.l1.read();
            let bytes = (l1.entries.len() as u64 * 8).div_ceil(cs) * cs;
            m.push((l1.offset, l1.offset + bytes));
            m.extend(
                l1.entries
                    .iter()
                    .map(|e| e & OFFSET_MASK)
                    .filter(|&o| o != 0)
                    .map(|o| (o, o + cs)),
            );
        }
        m.extend(rc.table.iter().filter(|&&o| o != 0).map(|&o| (o, o + cs)));
        {
            // The live table: snapshot operations move it after open.
            let t = self.snaps.read();
            if t.len > 0 {
                m.push((t.offset, t.offset + t.len.div_ceil(cs) * cs));
            }
            for sn in t.list.iter().filter(|s| s.l1_size > 0) {
                let bytes = (u64::from(sn.l1_size) * 8).div_ceil(cs) * cs;
                m.push((sn.l1_table_offset, sn.l1_table_offset + bytes));
            }
        }
        if let Some(b) = &h.bitmaps {
            let end = b.directory_offset.saturating_add(b.directory_size);
            m.push((b.directory_offset, end.div_ceil(cs).saturating_mul(cs)));
        }
        m.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(m.len());
        for (a, b) in m {
            match merged.last_mut() {
                Some(last) if a < last.1 => {
                    return Err(corrupt(format!(
                        "metadata at {a:#x} overlaps metadata at {:#x}",
                        last.0
                    )));
                }
                Some(last) if a == last.1 => last.1 = b,
                _ => merged.push((a, b)),
            }
        }
        *self.meta.write() = merged;
        Ok(())
    }

    /// Record metadata we just placed (always at the end of the file, so
    /// the list stays sorted).
    pub(super) fn add_meta(&self, rc: &mut Refcounts, extra: Option<(u64, u64)>) {
        let mut m = self.meta.write();
        for r in rc.fresh_meta.drain(..).chain(extra) {
            match m.last_mut() {
                Some(last) if r.0 <= last.1 && r.0 >= last.0 => last.1 = last.1.max(r.1),
                _ => m.push(r),
            }
        }
        if m.windows(2).any(|w| w[0].0 > w[1].0) {
            m.sort_unstable();
        }
    }

    /// The host clusters whose refcounts an L2 entry holds (a data
    /// cluster, or the clusters a compressed cluster's bytes touch),
    /// checked: releasing them must not touch metadata or leave the file.
    fn release_range(&self, e: u64) -> Result<(u64, u64)> {
        let g = &self.g;
        if e & COMPRESSED != 0 {
            let (first, count) = self.compressed_clusters(e)?;
            self.check_not_meta(first << g.cluster_bits, count << g.cluster_bits)?;
            return Ok((first, count));
        }
        let host = e & OFFSET_MASK;
        self.check_host(host)?;
        self.check_not_meta(host, g.cluster_size)?;
        Ok((host >> g.cluster_bits, 1))
    }

    /// The host clusters (first, count) the bytes of the compressed
    /// cluster `e` touch, each of which holds a reference for it.
    pub(super) fn compressed_clusters(&self, e: u64) -> Result<(u64, u64)> {
        let g = &self.g;
        let (off, len) = g.compressed(e);
        let end = off
            .checked_add(len)
            .ok_or_else(|| corrupt("compressed cluster range overflows"))?;
        if off < g.cluster_size || off >= self.file_end.load(Ordering::Relaxed) {
            return Err(corrupt(format!(
                "compressed cluster at {off:#x} is outside the image file"
            )));
        }
        let first = (off & !511) >> g.cluster_bits;
        let last = (end - 1) >> g.cluster_bits;
        Ok((first, last - first + 1))
    }

    /// Refuse a data write onto metadata (a hostile or damaged L2 entry).
    pub(super) fn check_not_meta(&self, host: u64, len: u64) -> Result<()> {
        if self.has_data_file() {
            return Ok(());
        }
        let end = host.saturating_add(len);
        let m = self.meta.read();
        // The last range starting before `end`.
        let i = m.partition_point(|r| r.0 < end);
        if i > 0 && m[i - 1].1 > host {
            return Err(corrupt(format!(
                "a data write at host offset {host:#x} would overwrite metadata at {:#x}",
                m[i - 1].0
            )));
        }
        Ok(())
    }

    /// Before the first write: mark enabled bitmaps in use (we do not
    /// update them) and clear autoclear bits we do not know, as the spec
    /// asks of a program that modifies the image without knowing them.
    fn prepare_locked(&self) -> Result<()> {
        let h = &self.hdr;
        if h.version < 3 {
            return Ok(());
        }
        if let Some(b) = &h.bitmaps {
            if h.autoclear & AUTOCLEAR_BITMAPS != 0 {
                bitmap::mark_in_use(
                    self.file.as_ref(),
                    b,
                    self.g.cluster_size,
                    self.file_end.load(Ordering::Relaxed),
                )?;
            }
        }
        if h.autoclear & !AUTOCLEAR_KNOWN != 0 {
            self.file
                .write_at(&(h.autoclear & AUTOCLEAR_KNOWN).to_be_bytes(), OFF_AUTOCLEAR)?;
        }
        Ok(())
    }

    fn ensure_prepared(&self) -> Result<()> {
        if !self.prepared.load(Ordering::Acquire) {
            drop(self.lock_alloc()?);
        }
        Ok(())
    }

    /// We wrote up to `end` in the image file.
    pub(super) fn note_end(&self, end: u64) {
        self.file_end.fetch_max(end, Ordering::Relaxed);
    }

    /// Allocate `n` clusters for data: at the end of the image file, or at
    /// the guest offset in an external data file (as QEMU does; such
    /// clusters have no refcounts).
    fn alloc_data(&self, rc: &mut Refcounts, guest: u64, n: u64) -> Result<u64> {
        if self.has_data_file() {
            return Ok(guest);
        }
        let host = rc.alloc(self.file.as_ref(), n)?;
        self.add_meta(rc, None);
        self.note_end(host + n * self.g.cluster_size);
        Ok(host)
    }

    /// Write L2 words at entry `ci` of the table at `l2_off`: disk first,
    /// then the cache.
    fn set_l2(&self, l2_off: u64, ci: usize, words: &[u64]) -> Result<()> {
        let mut raw = Vec::with_capacity(words.len() * 8);
        for w in words {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        let at = ci * self.g.words();
        self.file.write_at(&raw, l2_off + at as u64 * 8)?;
        self.l2.update(l2_off, at, words);
        Ok(())
    }

    /// Entries `ci..ci+n` of a table, as words.
    fn l2_words(&self, l2_off: u64, ci: usize, n: usize) -> Result<Vec<u64>> {
        let w = self.g.words();
        self.l2
            .with(self.file.as_ref(), l2_off, |t| t[ci * w..(ci + n) * w].to_vec())
    }

    /// An L2 table for L1 entry `idx` that we may modify: allocated if
    /// missing, copied if shared with a snapshot (copied flag clear).
    fn writable_l2(&self, rc: &mut Refcounts, idx: usize) -> Result<u64> {
        let (l1e, l1_off) = {
            let l1 = self.l1.read();
            (l1.entries[idx], l1.offset)
        };
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let cs = self.g.cluster_size;
        let words = if old == 0 {
            vec![0u64; (cs / 8) as usize]
        } else {
            self.l2.copy(self.file.as_ref(), old)?
        };
        // Refcount first, then the table's content, then the L1 entry.
        let new = rc.alloc(self.file.as_ref(), 1)?;
        self.add_meta(rc, Some((new, new + cs)));
        self.note_end(new + cs);
        let mut raw = try_zeroed(cs as usize, "L2 table")?;
        for (i, w) in words.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&w.to_be_bytes());
        }
        self.file.write_at(&raw, new)?;
        // Barrier, as QEMU's: the table is on disk before the L1 entry
        // points at it. A copied table would otherwise lose mappings that
        // were durable; a new one, written past the end of the file, would
        // leave the L1 pointing past the end (which QEMU's check calls
        // corruption) when the disk keeps the L1 write but not the table.
        self.file.flush()?;
        self.l2.install(new, words);
        let ne = new | COPIED;
        self.file.write_at(&ne.to_be_bytes(), l1_off + idx as u64 * 8)?;
        self.l1.write().entries[idx] = ne;
        if old != 0 {
            // The active L1 no longer uses the shared table.
            rc.release(self.file.as_ref(), old >> self.g.cluster_bits, 1)?;
            self.l2.forget(old);
        }
        Ok(new)
    }

    /// Barrier before an L2 entry makes a host cluster visible whose bytes
    /// around the guest's write were filled in by us (from the backing
    /// file, the old cluster, or zeroes): as QEMU orders its copy-on-write,
    /// those bytes are durable first. Else a disk that kept the L2 write
    /// and lost the data would show stale bytes where the guest's disk
    /// held durable ones. A write covering whole clusters needs none.
    fn cow_barrier(&self, filled: bool) -> Result<()> {
        if filled {
            self.data_storage().flush()?;
        }
        Ok(())
    }

    /// True for an entry with no host cluster (unallocated or plain zero).
    fn is_fresh(&self, e: u64) -> bool {
        e & COMPRESSED == 0 && e & OFFSET_MASK == 0 && !(self.has_data_file() && e & COPIED != 0)
    }

    /// Whether bytes `from..to` of the cluster described by `(e, bm)` read
    /// as zeroes by its L2 entry alone (zero units, or unallocated units
    /// with nothing below), without reading any data.
    fn reads_zero(&self, e: u64, bm: u64, from: u64, to: u64, below: &dyn Below) -> Result<bool> {
        if from >= to {
            return Ok(true);
        }
        if e & COMPRESSED != 0 {
            return Ok(false);
        }
        let g = &self.g;
        for u in (from >> g.unit_bits)..=((to - 1) >> g.unit_bits) {
            match decode(g, e, bm, u as u32, self.has_data_file())? {
                Unit::ZeroPlain | Unit::ZeroAlloc { .. } => {}
                Unit::Unallocated if !below.has_backing() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Fill `dst` with the current guest content of bytes `from..from+len`
    /// of the cluster at guest offset `cl_guest`, described by `(e, bm)`.
    fn fill_old(&self, e: u64, bm: u64, cl_guest: u64, from: u64, dst: &mut [u8], below: &dyn Below) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let g = &self.g;
        if e & COMPRESSED != 0 {
            let mut tmp = try_zeroed(g.cluster_size as usize, "decompressed cluster")?;
            self.decompress_entry(e, &mut tmp)?;
            dst.copy_from_slice(&tmp[from as usize..from as usize + dst.len()]);
            return Ok(());
        }
        let us = g.unit_size();
        let to = from + dst.len() as u64;
        let mut p = from;
        while p < to {
            let u = p >> g.unit_bits;
            let unit_end = ((u + 1) * us).min(to);
            let d = &mut dst[(p - from) as usize..(unit_end - from) as usize];
            match decode(g, e, bm, u as u32, self.has_data_file())? {
                Unit::Data { host, .. } => {
                    self.check_host(e & OFFSET_MASK)?;
                    self.data_storage().read_at(d, host + (p - u * us))?;
                }
                Unit::ZeroAlloc { .. } | Unit::ZeroPlain => d.fill(0),
                Unit::Unallocated => below.read_below(d, cl_guest + p)?,
                Unit::Compressed => return Err(Error::Internal("compressed unit in a plain cluster".into())),
            }
            p = unit_end;
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.ensure_prepared()?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &buf[done..];
            let (u, n) = self.scan(pos, rest.len() as u64)?;
            if let Unit::Data { host, copied: true } = u {
                // Our own cluster: write in place, no metadata lock.
                self.check_not_meta(host, n)?;
                let n = n as usize;
                self.data_storage().write_at(&rest[..n], host)?;
                done += n;
                continue;
            }
            let mut g = self.lock_alloc()?;
            let rc = g
                .as_mut()
                .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
            done += self.write_slow(rc, rest, pos, below)?;
        }
        Ok(())
    }

    /// Write the start of `data` at `pos` where metadata must change;
    /// returns how many bytes were written (at least one).
    fn write_slow(&self, rc: &mut Refcounts, data: &[u8], pos: u64, below: &dyn Below) -> Result<usize> {
        let g = self.g;
        let cs = g.cluster_size;
        let (l1_idx, _) = self.l2_for(pos)?;
        let l2_off = self.writable_l2(rc, l1_idx)?;
        let ci = ((pos >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
        let in_cl = pos & (cs - 1);
        let cl_guest = pos - in_cl;
        let w = g.words();
        let first = self.l2_words(l2_off, ci, 1)?;
        let (e0, bm0) = (first[0], if g.extended { first[1] } else { 0 });

        if self.is_fresh(e0) {
            // A run of clusters without host clusters: allocate them together.
            let touched = (in_cl + data.len() as u64).div_ceil(cs);
            let max = touched.min(g.l2_entries() - ci as u64).min((MAX_RUN_BYTES / cs).max(1)) as usize;
            let words = self.l2_words(l2_off, ci, max)?;
            let mut n = 1usize;
            while n < max && self.is_fresh(words[n * w]) {
                n += 1;
            }
            let run = n as u64 * cs;
            let wlen = (data.len() as u64).min(run - in_cl) as usize;
            let end = in_cl as usize + wlen;
            let last = n - 1;
            let (el, bml) = (words[last * w], if g.extended { words[last * w + 1] } else { 0 });
            let lstart = last as u64 * cs;
            // Only in the image file: a data file's clusters sit at their
            // guest offsets, where old bytes may lie.
            let zero_cow = !self.has_data_file()
                && self.reads_zero(e0, bm0, 0, in_cl, below)?
                && self.reads_zero(el, bml, end as u64 - lstart, cs, below)?;
            // Refcounts (alloc), then data, then L2.
            let host = self.alloc_data(rc, cl_guest, n as u64)?;
            if zero_cow && (host >= rc.zero_from || self.file.len()? <= host) {
                // Nothing was ever written at or beyond `host` (fresh
                // clusters past the file's old end), so the bytes around the
                // write read as zeroes without being written: write the
                // caller's bytes alone (no copy, no zero padding, and no
                // barrier: lost, they still read as zeroes). The file may
                // end inside the run until a later write or `flush` extends
                // it; reads past the end are zeroes either way.
                self.file.write_at(&data[..wlen], host + in_cl)?;
                self.short_tail.store(true, Ordering::Relaxed);
            } else {
                let mut buf = try_zeroed(run as usize, "cluster run")?;
                self.fill_old(e0, bm0, cl_guest, 0, &mut buf[..in_cl as usize], below)?;
                if (end as u64) < run {
                    self.fill_old(el, bml, cl_guest + lstart, end as u64 - lstart, &mut buf[end..], below)?;
                }
                buf[in_cl as usize..end].copy_from_slice(&data[..wlen]);
                self.data_storage().write_at(&buf, host)?;
                self.cow_barrier(in_cl > 0 || (end as u64) < run)?;
            }
            let mut new = Vec::with_capacity(n * w);
            for k in 0..n as u64 {
                new.push((host + k * cs) | COPIED);
                if g.extended {
                    new.push(0xffff_ffff);
                }
            }
            self.set_l2(l2_off, ci, &new)?;
            return Ok(wlen);
        }

        // One cluster that has (or had) a host cluster.
        let wlen = (data.len() as u64).min(cs - in_cl) as usize;
        let compressed = e0 & COMPRESSED != 0;
        let old_host = e0 & OFFSET_MASK;
        let in_place = !compressed && (e0 & COPIED != 0 || self.has_data_file());
        let mut buf = try_zeroed(cs as usize, "cluster")?;
        self.fill_old(e0, bm0, cl_guest, 0, &mut buf[..in_cl as usize], below)?;
        let end = in_cl as usize + wlen;
        self.fill_old(e0, bm0, cl_guest, end as u64, &mut buf[end..], below)?;
        buf[in_cl as usize..end].copy_from_slice(&data[..wlen]);
        // What the new cluster replaces, checked before anything is written.
        let release = if !in_place && !self.has_data_file() && (compressed || old_host != 0) {
            Some(self.release_range(e0)?)
        } else {
            None
        };
        let host = if in_place {
            self.check_host(old_host)?;
            self.check_not_meta(old_host, cs)?;
            old_host
        } else {
            self.alloc_data(rc, cl_guest, 1)?
        };
        self.data_storage().write_at(&buf, host)?;
        let mut new = vec![host | COPIED];
        if g.extended {
            new.push(0xffff_ffff);
        }
        if new[..] != [e0, bm0][..w] {
            self.cow_barrier(wlen as u64 != cs)?;
            self.set_l2(l2_off, ci, &new)?;
        }
        if let Some((first, count)) = release {
            // Nothing points at the old cluster from the active table now.
            rc.release(self.file.as_ref(), first, count)?;
        }
        Ok(wlen)
    }

    /// Store compressed clusters (`units`: guest offset, encoding from
    /// `compress_cluster`). Their bytes are packed after one another in
    /// clusters allocated for them; a cluster holding the bytes of several
    /// counts one reference for each. Order: refcounts (fresh clusters come
    /// with a durable refcount of 1; the extra references of shared ones
    /// are written, then one flush for the batch), then the bytes, then the
    /// L2 entries, then the refcounts of what they replace.
    pub(super) fn write_compressed_impl(&self, units: &[(u64, &[u8])]) -> Result<()> {
        if self.has_data_file() {
            return Err(unsupported("compressed clusters cannot go to an external data file"));
        }
        self.ensure_prepared()?;
        let g = self.g;
        let cs = g.cluster_size;
        let mut guard = self.lock_alloc()?;
        let rc = guard
            .as_mut()
            .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
        let mut packed = self.packed.lock();
        let mut placed = Vec::with_capacity(units.len());
        for &(guest, blob) in units {
            let n = blob.len() as u64;
            if n == 0 || n >= cs || !guest.is_multiple_of(cs) {
                return Err(invalid(
                    "a compressed cluster must be 1 byte to a cluster less one byte, at a cluster start",
                ));
            }
            let (mut pos, mut end) = *packed;
            // Bytes may go on in the last cluster if it can count one more
            // reference, and cross into more clusters if those follow it.
            let shared_ok = pos != 0
                && (pos.is_multiple_of(cs) || rc.can_add_reference(self.file.as_ref(), pos >> g.cluster_bits)?);
            let free = if shared_ok { end - pos } else { 0 };
            if free < n {
                let extra = (n - free).div_ceil(cs);
                if free > 0 && rc.next_alloc(extra) == Some(end) {
                    self.alloc_data(rc, guest, extra)?;
                    end += extra * cs;
                } else {
                    let k = n.div_ceil(cs);
                    pos = self.alloc_data(rc, guest, k)?;
                    end = pos + k * cs;
                }
            }
            // A cluster already holding earlier bytes gains a reference.
            if !pos.is_multiple_of(cs) {
                rc.update(self.file.as_ref(), pos >> g.cluster_bits, 1, 1)?;
            }
            self.file.write_at(blob, pos)?;
            placed.push((guest, pos, n));
            *packed = (pos + n, end);
        }
        drop(packed);
        // Barrier: the bytes and the extra references are durable before an
        // L2 entry can name them.
        self.file.flush()?;
        for (guest, host, n) in placed {
            let (l1_idx, _) = self.l2_for(guest)?;
            let l2_off = self.writable_l2(rc, l1_idx)?;
            let ci = ((guest >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
            let old = self.l2_words(l2_off, ci, 1)?[0];
            let release = if old & COMPRESSED != 0 || old & OFFSET_MASK != 0 {
                Some(self.release_range(old)?)
            } else {
                None
            };
            let extra_sectors = (host + n - 1) / 512 - host / 512;
            let mut new = vec![COMPRESSED | (extra_sectors << g.csize_shift) | host];
            if g.extended {
                new.push(0);
            }
            self.set_l2(l2_off, ci, &new)?;
            if let Some((first, count)) = release {
                rc.release(self.file.as_ref(), first, count)?;
            }
        }
        Ok(())
    }

    /// Give back reserved clusters (before a flush, and at close), and let
    /// the file reach the end of the last cluster we allocated (a write
    /// into a fresh cluster may have left its zero tail unwritten, past the
    /// file's end). Under the allocation lock, so nothing is written beyond
    /// `file_end` meanwhile and growing the file cannot cut a write short.
    pub(super) fn release_reserved(&self) -> Result<()> {
        self.release_locked(&mut self.alloc.lock())
    }

    /// `release_reserved` with the allocation lock held.
    pub(super) fn release_locked(&self, g: &mut Option<Refcounts>) -> Result<()> {
        if let Some(rc) = g.as_mut() {
            rc.release_pool(self.file.as_ref())?;
        }
        if self.short_tail.swap(false, Ordering::Relaxed) {
            let end = self.file_end.load(Ordering::Relaxed);
            if self.file.len()? < end {
                self.file.set_len(end)?;
            }
        }
        Ok(())
    }

    /// Write zero bytes through the normal write path.
    fn write_zero_bytes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK as u64) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_impl(&zeros[..n], offset + done, below)?;
            done += n as u64;
        }
        Ok(())
    }

    pub(super) fn zero_impl(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.ensure_prepared()?;
        let g = self.g;
        let end = offset.checked_add(len).ok_or_else(|| invalid("range overflows"))?;
        if self.hdr.version < 3 {
            // Version 2 has no zero flag: skip what already reads as zeroes
            // without a backing file, write zeroes elsewhere.
            let mut pos = offset;
            while pos < end {
                let (u, n) = self.scan(pos, end - pos)?;
                let skip = matches!(u, Unit::ZeroPlain | Unit::ZeroAlloc { .. })
                    || (u == Unit::Unallocated && !below.has_backing());
                if !skip {
                    self.write_zero_bytes(pos, n, below)?;
                }
                pos += n;
            }
            return Ok(());
        }
        let us = g.unit_size();
        let mut pos = offset;
        while pos < end {
            if pos & (us - 1) != 0 {
                let n = align_up(pos, us)?.min(end) - pos;
                self.write_zero_bytes(pos, n, below)?;
                pos += n;
                continue;
            }
            if end - pos < us {
                self.write_zero_bytes(pos, end - pos, below)?;
                break;
            }
            let table_end = ((pos >> g.l2_cover_bits()) + 1) << g.l2_cover_bits();
            let stop = (end & !(us - 1)).min(table_end);
            let partial = self.zero_units(pos, stop, below)?;
            for (o, l) in partial {
                self.write_zero_bytes(o, l, below)?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Mark the whole units in `[start, stop)` (one L2 table) as zero.
    /// Returns ranges that must be written as zero bytes instead (parts of
    /// compressed clusters with extended L2).
    fn zero_units(&self, start: u64, stop: u64, below: &dyn Below) -> Result<Vec<(u64, u64)>> {
        let g = self.g;
        let cs = g.cluster_size;
        let mut partial = Vec::new();
        let mut guard = self.lock_alloc()?;
        let rc = guard
            .as_mut()
            .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
        let (l1_idx, l2_cur) = self.l2_for(start)?;
        if l2_cur == 0 && !below.has_backing() {
            return Ok(partial); // reads as zeroes already
        }
        if self.hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            // The raw data file must show the guest content itself.
            if let Some(d) = &self.data {
                d.write_zeroes(start, stop - start)?;
            }
        }
        let l2_off = self.writable_l2(rc, l1_idx)?;
        let w = g.words();
        let ci0 = ((start >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
        let n = ((stop - 1) >> g.cluster_bits) - (start >> g.cluster_bits) + 1;
        let old = self.l2_words(l2_off, ci0, n as usize)?;
        let mut new = old.clone();
        let mut release: Vec<(u64, u64)> = Vec::new();
        for k in 0..n as usize {
            let cl = ((start >> g.cluster_bits) + k as u64) << g.cluster_bits;
            let (a, b) = (start.max(cl), stop.min(cl + cs));
            let e = old[k * w];
            let compressed = e & COMPRESSED != 0;
            let allocated = !self.is_fresh(e) && !compressed;
            let shared = allocated && e & COPIED == 0 && !self.has_data_file();
            if g.extended {
                let first_sc = ((a - cl) >> g.unit_bits) as u32;
                let count = ((b - a) >> g.unit_bits) as u32;
                let mask: u64 = if count == 32 {
                    0xffff_ffff
                } else {
                    ((1u64 << count) - 1) << first_sc
                };
                if compressed {
                    if count == 32 {
                        new[k * w] = 0;
                        new[k * w + 1] = 0xffff_ffff << 32;
                        release.push(self.release_range(e)?);
                    } else {
                        partial.push((a, b - a));
                    }
                } else if shared && count == 32 {
                    new[k * w] = 0;
                    new[k * w + 1] = 0xffff_ffff << 32;
                    release.push(self.release_range(e)?);
                } else {
                    let bm = old[k * w + 1];
                    new[k * w + 1] = (bm & !mask) | (mask << 32);
                }
            } else if compressed {
                new[k] = ZERO_FLAG;
                release.push(self.release_range(e)?);
            } else if shared || !allocated {
                new[k] = ZERO_FLAG;
                if shared {
                    release.push(self.release_range(e)?);
                }
            } else {
                // Keep our own cluster allocated, reading as zeroes.
                new[k] = (e & (OFFSET_MASK | COPIED)) | ZERO_FLAG;
            }
        }
        if new != old {
            self.set_l2(l2_off, ci0, &new)?;
        }
        for (first, count) in release {
            rc.release(self.file.as_ref(), first, count)?;
        }
        Ok(partial)
    }

    /// Drop whole clusters in `[offset, offset+len)`; partial clusters at
    /// the ends are left alone (discard is advisory). A discarded cluster
    /// reads as zeroes when the image has a backing file (v3: zero flag)
    /// and falls through otherwise (it reads as zeroes there too, or from
    /// the backing file on v2, as QEMU does). External data files keep
    /// their 1:1 mapping, so there it is a zero write.
    pub(super) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        let zero = self.hdr.version >= 3 && self.hdr.backing_file.is_some();
        self.drop_clusters(offset, len, zero)
    }

    /// Every cluster unallocated, reading from the backing file again
    /// (`qemu-img commit` empties the overlay so). With an external data
    /// file the mapping is fixed: there it is refused.
    pub(super) fn make_empty_impl(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(crate::error::unsupported(
                "a qcow2 image with an external data file cannot be emptied",
            ));
        }
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        self.drop_clusters(0, align_up(size, self.g.cluster_size)?, false)
    }

    /// Drop the whole clusters of a range, leaving them unallocated, or
    /// reading as zeroes when `zero`.
    fn drop_clusters(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.ensure_prepared()?;
        let g = self.g;
        let cs = g.cluster_size;
        let end = offset.checked_add(len).ok_or_else(|| invalid("range overflows"))?;
        let mut pos = align_up(offset, cs)?;
        let stop_all = end & !(cs - 1);
        if self.has_data_file() {
            if pos < stop_all {
                return self.zero_impl(pos, stop_all - pos, &crate::driver::NoBacking);
            }
            return Ok(());
        }
        while pos < stop_all {
            let table_end = ((pos >> g.l2_cover_bits()) + 1) << g.l2_cover_bits();
            let stop = stop_all.min(table_end);
            let mut guard = self.lock_alloc()?;
            let rc = guard
                .as_mut()
                .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
            let (l1_idx, l2_cur) = self.l2_for(pos)?;
            // Without an L2 table there is nothing to drop, unless the range
            // must stop showing the backing file.
            if l2_cur != 0 || zero {
                let l2_off = self.writable_l2(rc, l1_idx)?;
                let w = g.words();
                let ci0 = ((pos >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
                let n = ((stop - pos) >> g.cluster_bits) as usize;
                let old = self.l2_words(l2_off, ci0, n)?;
                let mut new = old.clone();
                let mut release = Vec::new();
                for k in 0..n {
                    let e = old[k * w];
                    if e & COMPRESSED != 0 || e & OFFSET_MASK != 0 {
                        release.push(self.release_range(e)?);
                    }
                    if g.extended {
                        new[k * w] = 0;
                        new[k * w + 1] = if zero { 0xffff_ffff << 32 } else { 0 };
                    } else {
                        new[k] = if zero { ZERO_FLAG } else { 0 };
                    }
                }
                if new != old {
                    // L2 first, then the refcounts it no longer holds.
                    self.set_l2(l2_off, ci0, &new)?;
                }
                for (first, count) in release {
                    rc.release(self.file.as_ref(), first, count)?;
                }
            }
            drop(guard);
            pos = stop;
        }
        Ok(())
    }

    /// Drop every cluster past the new end, then record the size: a crash
    /// in between leaves the old size with that range unallocated, never
    /// the new size with old data still mapped past it (growing again would
    /// show it). The L1 table keeps its length (a longer one is valid).
    fn shrink(&self, size: u64, cur: u64) -> Result<()> {
        use crate::driver::Driver;
        if !self.snapshots()?.is_empty() {
            return Err(unsupported("cannot shrink a qcow2 image that has internal snapshots"));
        }
        if self.has_data_file() {
            return Err(unsupported(
                "shrinking a qcow2 image with an external data file is not supported",
            ));
        }
        if self.hdr.bitmaps.is_some() {
            return Err(unsupported("cannot shrink a qcow2 image that has persistent bitmaps"));
        }
        let cs = self.g.cluster_size;
        let from = align_up(size, cs)?;
        let to = align_up(cur, cs)?;
        if to > from {
            self.drop_clusters(from, to - from, false)?;
        }
        let _guard = self.lock_alloc()?;
        self.file.write_at(&size.to_be_bytes(), OFF_SIZE)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn truncate_impl(&self, size: u64) -> Result<()> {
        let cur = self.size.load(Ordering::Relaxed);
        if !size.is_multiple_of(512) {
            return Err(invalid(format!(
                "the new size {size} is not a multiple of 512 (qcow2 counts sectors)"
            )));
        }
        if size < cur {
            return self.shrink(size, cur);
        }
        if size == cur {
            return Ok(());
        }
        if size > i64::MAX as u64 {
            return Err(invalid(format!("size {size} does not fit in 63 bits")));
        }
        if self.hdr.version < 3 && !self.snaps.read().list.is_empty() {
            // Version 2 snapshots need not record their size (QEMU's rule too).
            return Err(unsupported(
                "a compat=0.10 qcow2 image with internal snapshots cannot be resized",
            ));
        }
        let mut guard = self.lock_alloc()?;
        let rc = guard
            .as_mut()
            .ok_or_else(|| Error::Internal("allocation state missing".into()))?;
        let need = self.g.l1_entries_for(size).ok_or_else(|| invalid("size too large"))?;
        self.grow_l1(rc, need)?;
        if self.hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            if let Some(d) = &self.data {
                if d.len()? < size {
                    d.set_len(size)?;
                }
            }
        }
        self.file.write_at(&size.to_be_bytes(), OFF_SIZE)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Give the active L1 table at least `need` entries (new ones zero),
    /// moving it to the end of the file when it must grow.
    /// Crash order: refcount, then the new table, then the header, then
    /// the old table released.
    pub(super) fn grow_l1(&self, rc: &mut Refcounts, need: u64) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let (old_off, old_len) = {
            let l1 = self.l1.read();
            (l1.offset, l1.entries.len() as u64)
        };
        if need <= old_len {
            return Ok(());
        }
        if need * 8 > MAX_L1_BYTES {
            return Err(Error::OutOfRange(format!(
                "{need} L1 entries exceed the 32 MiB cap of the L1 table"
            )));
        }
        let clusters = (need * 8).div_ceil(cs);
        let off = rc.alloc(self.file.as_ref(), clusters)?;
        self.add_meta(rc, Some((off, off + clusters * cs)));
        self.note_end(off + clusters * cs);
        let mut entries = self.l1.read().entries.clone();
        entries.resize(need as usize, 0);
        let mut raw = try_zeroed((clusters * cs) as usize, "L1 table")?;
        for (i, e) in entries.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write_at(&raw, off)?;
        self.file.flush()?;
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(need as u32).to_be_bytes());
        h[4..].copy_from_slice(&off.to_be_bytes());
        self.file.write_at(&h, OFF_L1_SIZE)?;
        {
            let mut l1 = self.l1.write();
            l1.offset = off;
            l1.entries = entries;
        }
        if old_len > 0 {
            rc.release(
                self.file.as_ref(),
                old_off >> g.cluster_bits,
                (old_len * 8).div_ceil(cs),
            )?;
        }
        Ok(())
    }
}
