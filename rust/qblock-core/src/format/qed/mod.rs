//! qed: QEMU Enhanced Disk, as specified on the QEMU wiki ("QED
//! specification") and implemented in QEMU's block/qed.c.
//!
//! Layout (all integers little-endian): a header cluster (64-byte header:
//! magic `QED\0`, cluster_size, table_size, header_size, features,
//! compat_features, autoclear_features, l1_table_offset, image_size,
//! backing_filename_offset/size; then the backing file name), an L1 table
//! and L2 tables of `table_size` clusters each, and data clusters. A table
//! entry is 0 (unallocated), 1 (a zero cluster, L2 only) or the
//! cluster-aligned host offset of a table or data cluster inside the file.
//!
//! Supported: reading, writing, creating (cluster_size, table_size, backing
//! file and backing format: `raw` is recorded as the "no probe" feature,
//! other formats are probed as in QEMU), zero clusters (read, and written
//! for whole-cluster zero writes as QEMU does), info and
//! block status as QEMU reports them, growing the disk. Not supported:
//! shrinking, discard.
//!
//! The need-check flag (QED_F_NEED_CHECK), as QEMU handles it: set (and
//! flushed) before the first allocating write, cleared after a flush on
//! `flush` and `close`. An image opened read-only with the flag set is
//! served as it is, every entry still checked when used (a bad one is
//! `CorruptImage`). An image opened writable with the flag set is checked
//! and repaired first, as `qemu-img check -r` would: L1 entries naming a
//! table outside the file and L2 entries naming a cluster outside the file
//! (or unaligned) are cleared, and the flag is cleared. Leaked clusters are
//! left (harmless; QEMU leaves them too). Clusters referenced twice are not
//! repaired, as in QEMU: an L2 table named by two L1 entries keeps the flag
//! set after the open (like QEMU, the next flush clears it); data clusters
//! named twice are not looked for. Entries are still checked whenever used.
//!
//! `check` (submodule): `qemu-img check` for qed, as QEMU's qed-check.c.
//!
//! Crash order of an allocating write: the data cluster, then (for a new L2
//! table) the table with its entry and a flush, then the L1 entry; or the
//! L2 entry. The need-check flag covers what a crash can leave (L2/L1
//! entries pointing past a file end that did not reach the disk).
//!
//! Beyond QEMU's checks: L2 tables may not lie on the L1 table, and a data
//! cluster lying on a table is read as QEMU reads it but never written
//! into. QEMU cannot open images with `table_size` 1 (its table check
//! rejects one-cluster tables); we read, write and create them.

mod check;

use super::bytes::{le32, le64};
use super::paged::{read_u64s, Order};
use super::qcow::table::{ranges_meet, TableCache, TableSet};
use crate::backend::Storage;
use crate::driver::{BackingRef, Below, CheckReport, Driver, DriverInfo, HostFile, Mapped, Mapping, Repair};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::registry::{FormatEntry, OpenCtx};
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Qed,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

pub const MAGIC: &[u8; 4] = b"QED\0";
pub const HEADER_SIZE: usize = 64;
/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 1;
/// The image was not closed cleanly: check it before writing.
pub const F_NEED_CHECK: u64 = 2;
/// The backing file is raw: do not probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// QEMU knows no autoclear features; it clears unknown ones on a writable open.
pub const AUTOCLEAR_FEATURE_MASK: u64 = 0;
/// Cluster sizes QEMU accepts (block/qed.h).
pub const MIN_CLUSTER_SIZE: u32 = 4096;
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
/// Table sizes in clusters QEMU accepts.
pub const MIN_TABLE_SIZE: u32 = 1;
pub const MAX_TABLE_SIZE: u32 = 16;
/// An L2 entry of 1: the cluster reads as zeroes.
pub const ZERO_CLUSTER: u64 = 1;
/// QEMU reads the backing name into a PATH_MAX buffer with its NUL.
pub const MAX_BACKING_NAME: u32 = 4095;
/// Defaults of `qemu-img create -f qed`.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Whole clusters allocated by one write at most (one table update each).
const MAX_RUN_CLUSTERS: u64 = 8192;

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.starts_with(MAGIC) {
        100
    } else {
        0
    }
}

/// The largest image size QEMU accepts for a geometry, computed as QEMU
/// does (64-bit wrap-around included, so that QEMU opens what we accept).
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size.wrapping_mul(cluster_size)) / 8;
    entries.wrapping_mul(u64::from(cluster_size)).wrapping_mul(entries)
}

fn cluster_size_valid(c: u32) -> bool {
    c.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&c)
}
fn table_size_valid(t: u32) -> bool {
    t.is_power_of_two() && (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&t)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u32,
    pub table_size: u32,
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
}

impl Header {
    /// Parse and check what does not depend on the file length.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != MAGIC {
            return Err(corrupt("not a qed image (bad magic)"));
        }
        let h = Header {
            cluster_size: le32(b, 4).unwrap_or(0),
            table_size: le32(b, 8).unwrap_or(0),
            header_size: le32(b, 12).unwrap_or(0),
            features: le64(b, 16).unwrap_or(0),
            compat_features: le64(b, 24).unwrap_or(0),
            autoclear_features: le64(b, 32).unwrap_or(0),
            l1_table_offset: le64(b, 40).unwrap_or(0),
            image_size: le64(b, 48).unwrap_or(0),
            backing_filename_offset: le32(b, 56).unwrap_or(0),
            backing_filename_size: le32(b, 60).unwrap_or(0),
        };
        if h.features & !FEATURE_MASK != 0 {
            return Err(unsupported(format!(
                "unknown qed features {:#x}",
                h.features & !FEATURE_MASK
            )));
        }
        if !cluster_size_valid(h.cluster_size) {
            return Err(corrupt(format!(
                "cluster size {} is not a power of two in 4 KiB..64 MiB",
                h.cluster_size
            )));
        }
        if !table_size_valid(h.table_size) {
            return Err(corrupt(format!(
                "table size {} is not a power of two in 1..16",
                h.table_size
            )));
        }
        if !h.image_size.is_multiple_of(512) || h.image_size > max_image_size(h.cluster_size, h.table_size) {
            return Err(corrupt(format!(
                "image size {} is not a multiple of 512 or larger than the tables map",
                h.image_size
            )));
        }
        // The header must hold at least the header itself; its clusters
        // come before every table and data cluster.
        if h.header_size == 0 || u64::from(h.header_size) * u64::from(h.cluster_size) > 1 << 40 {
            return Err(corrupt(format!("header size of {} clusters is invalid", h.header_size)));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > h.header_bytes() || h.backing_filename_offset < HEADER_SIZE as u32 {
                return Err(corrupt("backing file name lies outside the header clusters"));
            }
            if h.backing_filename_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name of {} bytes is too long",
                    h.backing_filename_size
                )));
            }
        }
        Ok(h)
    }

    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }
}

pub struct Qed {
    storage: Arc<dyn Storage>,
    header: Mutex<Header>,
    size: AtomicU64,
    cluster_bits: u32,
    /// Entries per table.
    entries: u64,
    header_bytes: u64,
    l1_offset: u64,
    l1: RwLock<Vec<u64>>,
    l2: TableCache,
    /// Where the L2 tables are: a data cluster on one (or on the L1
    /// table) is never written into.
    l2_tables: TableSet,
    backing: Option<BackingRef>,
    /// The file size rounded down to whole clusters (as QEMU): where the
    /// next cluster goes, and the bound every entry is checked against.
    end: AtomicU64,
    /// The need-check flag as last written to the header.
    need_check: AtomicU64,
    write_lock: Mutex<()>,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    // The need-check flag as found, for the event below (a writable open
    // clears it by repairing).
    let mut features = [0u8; 8];
    let flagged = storage.read_at(&mut features, 16).is_ok() && u64::from_le_bytes(features) & F_NEED_CHECK != 0;
    let q = Qed::open_with(storage, !ctx.read_only, ctx.check)?;
    if flagged && !ctx.check {
        crate::events::dirty_on_open(
            Format::Qed,
            ctx.location,
            !ctx.read_only,
            "its need-check flag is set; read as it is, each table checked when used",
            "its need-check flag was set: tables checked, bad entries dropped, the flag cleared",
        );
    }
    Ok(Box::new(q))
}

impl Qed {
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Qed> {
        Self::open_with(storage, writable, false)
    }

    /// `check`: opened to be checked (as QEMU's BDRV_O_CHECK), so neither
    /// repaired at open nor refused for bad L1 entries (they stay checked
    /// whenever used).
    pub fn open_with(storage: Arc<dyn Storage>, writable: bool, check: bool) -> Result<Qed> {
        let file_len = storage.len()?;
        if file_len < HEADER_SIZE as u64 {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the qed header"
            )));
        }
        let mut hb = [0u8; HEADER_SIZE];
        storage.read_at(&mut hb, 0)?;
        let mut h = Header::parse(&hb)?;
        let cs = u64::from(h.cluster_size);
        let end = file_len & !(cs - 1);
        let q = Qed {
            size: AtomicU64::new(h.image_size),
            cluster_bits: h.cluster_size.trailing_zeros(),
            entries: h.table_bytes() / 8,
            header_bytes: h.header_bytes(),
            l1_offset: h.l1_table_offset,
            l1: RwLock::new(Vec::new()),
            l2: TableCache::new(false),
            l2_tables: TableSet::new(h.table_bytes()),
            backing: None,
            end: AtomicU64::new(end),
            need_check: AtomicU64::new(h.features & F_NEED_CHECK),
            write_lock: Mutex::new(()),
            header: Mutex::new(h.clone()),
            storage,
        };
        if !q.table_ok(h.l1_table_offset) {
            return Err(corrupt(format!(
                "L1 table at {} is unaligned or outside the file ({file_len} bytes)",
                h.l1_table_offset
            )));
        }
        let backing = if h.features & F_BACKING_FILE != 0 {
            let mut name = vec![0u8; h.backing_filename_size as usize];
            q.storage.read_at(&mut name, u64::from(h.backing_filename_offset))?;
            if let Some(z) = name.iter().position(|&c| c == 0) {
                name.truncate(z);
            }
            let s = String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?;
            let format = (h.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string());
            (!s.is_empty()).then_some(BackingRef { filename: s, format })
        } else {
            None
        };
        // The L1 table lies inside the file (checked above): its memory is
        // bounded by the file's own size.
        // Read in pieces: a table may be 1 GiB (QEMU's 16 clusters of 64 MiB).
        let l1 = read_u64s(
            q.storage.as_ref(),
            h.l1_table_offset,
            (h.table_bytes() / 8) as usize,
            Order::Little,
            "the qed L1 table",
        )?;
        *q.l1.write() = l1;
        let q = Qed { backing, ..q };
        if writable && h.autoclear_features & !AUTOCLEAR_FEATURE_MASK != 0 {
            h.autoclear_features &= AUTOCLEAR_FEATURE_MASK;
            q.write_header(&h)?;
            q.storage.flush()?;
        }
        if check {
            // Left for `Driver::check` to report and repair.
        } else if writable && h.features & F_NEED_CHECK != 0 {
            q.repair()?;
        } else if h.features & F_NEED_CHECK == 0 {
            // A clean image: every L1 entry must name a table in the file.
            // (A read-only image not closed cleanly is served as QEMU
            // serves it, each entry checked when used.)
            for (i, &e) in q.l1.read().iter().enumerate() {
                if e != 0 && !q.l2_table_ok(e) {
                    return Err(corrupt(format!(
                        "L1 entry {i}: L2 table at {e:#x} is unaligned, outside the file or on the L1 table"
                    )));
                }
            }
        }
        for &e in q.l1.read().iter() {
            if e != 0 {
                q.l2_tables.insert(e);
            }
        }
        Ok(q)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn table_bytes(&self) -> u64 {
        self.entries * 8
    }

    /// A cluster offset QEMU accepts: aligned, after the header, before
    /// the (cluster-rounded) end of the file.
    fn cluster_ok(&self, off: u64) -> bool {
        off & (self.cluster_size() - 1) == 0 && off >= self.header_bytes && off < self.end.load(Ordering::Acquire)
    }
    fn table_ok(&self, off: u64) -> bool {
        match off.checked_add(self.table_bytes() - self.cluster_size()) {
            Some(last) => self.cluster_ok(off) && self.cluster_ok(last),
            None => false,
        }
    }
    /// An L2 table must also stay off the L1 table (writing its entries
    /// would rewrite L1 entries).
    fn l2_table_ok(&self, off: u64) -> bool {
        self.table_ok(off) && !ranges_meet(self.l1_range(), (off, off + self.table_bytes()))
    }
    fn l1_range(&self) -> (u64, u64) {
        (self.l1_offset, self.l1_offset + self.table_bytes())
    }
    /// Refuse to write into a data cluster that lies on a table.
    fn check_in_place(&self, host: u64) -> Result<()> {
        let r = (host, host + self.cluster_size());
        if ranges_meet(self.l1_range(), r) || self.l2_tables.overlaps(r.0, r.1) {
            return Err(corrupt(format!(
                "data cluster at {host:#x} lies on a table; not writing into it"
            )));
        }
        Ok(())
    }

    fn write_header(&self, h: &Header) -> Result<()> {
        self.storage.write_at(&h.encode(), 0)?;
        *self.header.lock() = h.clone();
        Ok(())
    }

    fn set_need_check(&self, on: bool) -> Result<()> {
        let mut h = self.header.lock().clone();
        if on {
            h.features |= F_NEED_CHECK;
        } else {
            h.features &= !F_NEED_CHECK;
        }
        self.write_header(&h)?;
        self.storage.flush()?;
        self.need_check.store(h.features & F_NEED_CHECK, Ordering::Release);
        Ok(())
    }

    /// What QEMU's check with repair does on a writable open of an image
    /// not closed cleanly: clear entries naming places outside the file.
    /// Tables are read one at a time, so memory stays at one table chunk.
    fn repair(&self) -> Result<()> {
        let mut l1 = self.l1.write();
        let mut duplicates = false;
        let mut seen_tables = std::collections::HashSet::new();
        for i in 0..l1.len() {
            let t = l1[i];
            if t == 0 {
                continue;
            }
            if !self.l2_table_ok(t) {
                self.storage
                    .write_at(&0u64.to_le_bytes(), self.l1_offset + i as u64 * 8)?;
                l1[i] = 0;
                continue;
            }
            if !seen_tables.insert(t) {
                duplicates = true;
                continue;
            }
            let mut j = 0;
            while j < self.entries {
                let chunk = self.l2.get(self.storage.as_ref(), t, self.entries, j)?;
                let n = chunk.entries.len() - chunk.index;
                for k in 0..n {
                    let e = chunk.entries[chunk.index + k];
                    if e != 0 && e != ZERO_CLUSTER && !self.cluster_ok(e) {
                        self.l2.set(self.storage.as_ref(), t, self.entries, j + k as u64, 0)?;
                    }
                }
                j += n as u64;
            }
        }
        drop(l1);
        self.l2.clear();
        self.storage.flush()?;
        if !duplicates {
            self.set_need_check(false)?;
        }
        Ok(())
    }

    fn indices(&self, offset: u64) -> (usize, u64) {
        let c = offset >> self.cluster_bits;
        ((c / self.entries) as usize, c % self.entries)
    }

    fn l1_entry(&self, i1: usize) -> Result<u64> {
        let t = self.l1.read().get(i1).copied().unwrap_or(0);
        if t != 0 && !self.l2_table_ok(t) {
            return Err(corrupt(format!(
                "L1 entry {i1}: L2 table at {t:#x} is outside the file"
            )));
        }
        Ok(t)
    }

    fn check_entry(&self, e: u64) -> Result<()> {
        if e > ZERO_CLUSTER && !self.cluster_ok(e) {
            return Err(corrupt(format!(
                "L2 entry names cluster {e:#x}, unaligned or outside the file"
            )));
        }
        Ok(())
    }
}

impl Driver for Qed {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_impl(repair)
    }
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let cs = self.cluster_size();
        let (i1, i2) = self.indices(offset);
        let t = self.l1_entry(i1)?;
        let in_cluster = offset & (cs - 1);
        if t == 0 {
            // The following empty L1 entries are unallocated too.
            let span = self.entries << self.cluster_bits;
            let want_end = offset.saturating_add(len);
            let l1 = self.l1.read();
            let mut i = i1 + 1;
            while i < l1.len() && (i as u64).saturating_mul(span) < want_end && l1[i] == 0 {
                i += 1;
            }
            let span_end = (i as u64).saturating_mul(span);
            return Ok(Mapping {
                kind: Mapped::Unallocated,
                len: len.min(span_end - offset),
            });
        }
        let chunk = self.l2.get(self.storage.as_ref(), t, self.entries, i2)?;
        let entries = &chunk.entries[chunk.index..];
        let first = entries[0];
        self.check_entry(first)?;
        let mut run = cs - in_cluster;
        let kind = match first {
            0 | ZERO_CLUSTER => {
                for &e in &entries[1..] {
                    if run >= len || e != first {
                        break;
                    }
                    run += cs;
                }
                if first == 0 {
                    Mapped::Unallocated
                } else {
                    Mapped::Zero { host: None }
                }
            }
            host => {
                let mut next = host + cs;
                for &e in &entries[1..] {
                    if run >= len || e != next || !self.cluster_ok(e) {
                        break;
                    }
                    run += cs;
                    next += cs;
                }
                Mapped::Data {
                    file: 0,
                    offset: host + in_cluster,
                }
            }
        };
        Ok(Mapping {
            kind,
            len: run.min(len),
        })
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }

    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let _g = self.write_lock.lock();
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rem = (buf.len() - done) as u64;
            if pos & (cs - 1) == 0 && rem >= cs {
                // Whole clusters not yet allocated: one data write, one
                // table write.
                let n = self.unallocated_run(pos, rem / cs)?;
                if n > 0 {
                    let bytes = (n * cs) as usize;
                    self.place_new(pos, &buf[done..done + bytes])?;
                    done += bytes;
                    continue;
                }
            }
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            self.write_cluster(&buf[done..done + n], pos, below)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let cs = self.cluster_size();
        let zeroes = vec![0u8; len.min(cs) as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = ((pos / cs + 1) * cs).min(end) - pos;
            if n == cs {
                self.zero_cluster(pos)?;
            } else {
                self.write_at(&zeroes[..n as usize], pos, below)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()?;
        if self.need_check.load(Ordering::Acquire) != 0 {
            let _g = self.write_lock.lock();
            // Data and tables are on disk: the image is consistent again.
            self.set_need_check(false)?;
        }
        Ok(())
    }

    /// Grow the disk, as QEMU does (only the header's size changes;
    /// shrinking is not supported, as in QEMU).
    fn truncate(&self, size: u64) -> Result<()> {
        let _g = self.write_lock.lock();
        let mut h = self.header.lock().clone();
        if !size.is_multiple_of(512) || size > max_image_size(h.cluster_size, h.table_size) {
            return Err(invalid(format!("invalid qed image size {size}")));
        }
        if size < h.image_size {
            return Err(unsupported("shrinking qed images is not supported"));
        }
        h.image_size = size;
        self.write_header(&h)?;
        self.size.store(size, Ordering::Release);
        self.storage.flush()
    }

    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo {
            cluster_size: Some(self.cluster_size()),
            dirty: self.need_check.load(Ordering::Acquire) != 0,
            ..Default::default()
        })
    }
}

impl Qed {
    fn alloc(&self, clusters: u64) -> Result<u64> {
        let at = self.end.load(Ordering::Acquire);
        let next = clusters
            .checked_mul(self.cluster_size())
            .and_then(|n| at.checked_add(n))
            .ok_or_else(|| invalid("qed image file is too large"))?;
        self.end.store(next, Ordering::Release);
        Ok(at)
    }

    /// One write within one cluster; see the module docs for the order.
    fn write_cluster(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let cs = self.cluster_size();
        let in_cluster = pos & (cs - 1);
        let start = pos - in_cluster;
        let (i1, i2) = self.indices(pos);
        let t = self.l1_entry(i1)?;
        let e = if t == 0 {
            0
        } else {
            self.l2.entry(self.storage.as_ref(), t, self.entries, i2)?
        };
        self.check_entry(e)?;
        if e > ZERO_CLUSTER {
            self.check_in_place(e)?;
            return self.storage.write_at(data, e + in_cluster);
        }
        if self.need_check.load(Ordering::Acquire) == 0 {
            self.set_need_check(true)?;
        }
        let mut content = try_zeroed(cs as usize, "a qed cluster")?;
        if e == 0 && data.len() as u64 != cs {
            let inside = self.virtual_size().saturating_sub(start).min(cs) as usize;
            below.read_below(&mut content[..inside], start)?;
        }
        content[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        let host = self.alloc(1)?;
        self.storage.write_at(&content, host)?;
        self.set_l2(i1, i2, t, host)
    }

    /// How many clusters from `pos` on (at most `max`, within one table
    /// chunk) are unallocated or zero clusters (a whole-cluster write
    /// replaces either).
    fn unallocated_run(&self, pos: u64, max: u64) -> Result<u64> {
        let (i1, i2) = self.indices(pos);
        let limit = max.min(self.entries - i2).min(MAX_RUN_CLUSTERS);
        let t = self.l1_entry(i1)?;
        if t == 0 {
            return Ok(limit);
        }
        let chunk = self.l2.get(self.storage.as_ref(), t, self.entries, i2)?;
        let run = chunk.entries[chunk.index..].iter().take(limit as usize);
        Ok(run.take_while(|&&e| e == 0 || e == ZERO_CLUSTER).count() as u64)
    }

    /// Put whole clusters of `data` at the end of the file and point the
    /// entries from `pos` on at them (data first, then the table).
    fn place_new(&self, pos: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let n = data.len() as u64 / cs;
        let (i1, i2) = self.indices(pos);
        let t = self.l1_entry(i1)?;
        if self.need_check.load(Ordering::Acquire) == 0 {
            self.set_need_check(true)?;
        }
        let host = self.alloc(n)?;
        self.storage.write_at(data, host)?;
        let values: Vec<u64> = (0..n).map(|k| host + k * cs).collect();
        self.set_l2_many(i1, i2, t, &values)
    }

    fn set_l2(&self, i1: usize, i2: u64, t: u64, value: u64) -> Result<()> {
        self.set_l2_many(i1, i2, t, &[value])
    }

    /// Point L2 entries `i2..` of table `t` (L1 entry `i1`; 0 for none
    /// yet) at `values`. A new table is written whole, with the entries,
    /// and flushed before the L1 entry names it.
    fn set_l2_many(&self, i1: usize, i2: u64, t: u64, values: &[u64]) -> Result<()> {
        if t != 0 {
            return self.l2.set_many(self.storage.as_ref(), t, self.entries, i2, values);
        }
        let table = self.alloc(u64::from(self.header.lock().table_size))?;
        let mut tb = try_zeroed(self.table_bytes() as usize, "a qed L2 table")?;
        for (k, v) in values.iter().enumerate() {
            let at = (i2 as usize + k) * 8;
            tb[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.storage.write_at(&tb, table)?;
        self.storage.flush()?;
        self.storage
            .write_at(&table.to_le_bytes(), self.l1_offset + i1 as u64 * 8)?;
        self.l1.write()[i1] = table;
        self.l2_tables.insert(table);
        Ok(())
    }

    /// Make one whole cluster read as zeroes, as QEMU does: zeroes written
    /// in place into an allocated cluster, a zero entry otherwise.
    fn zero_cluster(&self, pos: u64) -> Result<()> {
        let _g = self.write_lock.lock();
        let (i1, i2) = self.indices(pos);
        let t = self.l1_entry(i1)?;
        let e = if t == 0 {
            0
        } else {
            self.l2.entry(self.storage.as_ref(), t, self.entries, i2)?
        };
        self.check_entry(e)?;
        match e {
            ZERO_CLUSTER => Ok(()),
            0 => {
                if self.need_check.load(Ordering::Acquire) == 0 {
                    self.set_need_check(true)?;
                }
                self.set_l2(i1, i2, t, ZERO_CLUSTER)
            }
            host => {
                self.check_in_place(host)?;
                self.storage.write_zeroes(host, self.cluster_size())
            }
        }
    }
}

/// Create an image as `qemu-img create -f qed` does: header and backing
/// name in the first cluster, the L1 table right after it, zeroed.
fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let backing = opts.take_str("backing_file")?.filter(|s| !s.is_empty());
    let backing_fmt = opts.take_str("backing_fmt")?.filter(|s| !s.is_empty());
    let cluster_size = opts
        .take_u64("cluster_size")?
        .unwrap_or(u64::from(DEFAULT_CLUSTER_SIZE));
    let table_size = opts.take_u64("table_size")?.unwrap_or(u64::from(DEFAULT_TABLE_SIZE));
    opts.finish("qed")?;
    let bytes = build_image(
        size,
        cluster_size,
        table_size,
        backing.as_deref(),
        backing_fmt.as_deref(),
    )?;
    let storage = location.create_storage()?;
    storage.write_at(&bytes, 0)?;
    storage.flush()
}

pub fn build_image(
    size: u64,
    cluster_size: u64,
    table_size: u64,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
) -> Result<Vec<u8>> {
    let cs = u32::try_from(cluster_size)
        .ok()
        .filter(|&c| cluster_size_valid(c))
        .ok_or_else(|| {
            invalid(format!(
                "qed cluster_size must be a power of two from 4 KiB to 64 MiB, not {cluster_size}"
            ))
        })?;
    let ts = u32::try_from(table_size)
        .ok()
        .filter(|&t| table_size_valid(t))
        .ok_or_else(|| {
            invalid(format!(
                "qed table_size must be a power of two from 1 to 16, not {table_size}"
            ))
        })?;
    if !size.is_multiple_of(512) || size > max_image_size(cs, ts) {
        return Err(invalid(format!(
            "qed size {size} must be a multiple of 512 and at most {} with these cluster and table sizes",
            max_image_size(cs, ts)
        )));
    }
    let mut h = Header {
        cluster_size: cs,
        table_size: ts,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: u64::from(cs),
        image_size: size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    if let Some(b) = backing {
        if b.len() as u64 > u64::from(cs) - HEADER_SIZE as u64 || b.len() as u64 > u64::from(MAX_BACKING_NAME) {
            return Err(invalid("backing file name does not fit in the qed header cluster"));
        }
        h.features |= F_BACKING_FILE;
        h.backing_filename_offset = HEADER_SIZE as u32;
        h.backing_filename_size = b.len() as u32;
        if backing_fmt == Some("raw") {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    let total = u64::from(cs) + h.table_bytes();
    let mut out = try_zeroed(total as usize, "a new qed image")?;
    out[..HEADER_SIZE].copy_from_slice(&h.encode());
    if let Some(b) = backing {
        out[HEADER_SIZE..HEADER_SIZE + b.len()].copy_from_slice(b.as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;
    use crate::error::ErrorKind;

    const CS: usize = 4096;

    fn base() -> Vec<u8> {
        // 4 KiB clusters, 1-cluster tables: 512 entries each.
        build_image(1 << 20, CS as u64, 1, None, None).unwrap()
    }

    fn set(v: &mut [u8], at: usize, bytes: &[u8]) {
        v[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn open_bytes(v: Vec<u8>, writable: bool) -> Result<Qed> {
        Qed::open(Arc::new(MemoryStorage::new(v, false)), writable)
    }

    fn kind(r: Result<Qed>) -> ErrorKind {
        r.err().expect("must fail").kind()
    }

    #[test]
    fn limits_as_qemu() {
        assert_eq!(max_image_size(65536, 4), 64 << 40);
        assert_eq!(max_image_size(64 << 20, 16), 0);
    }

    #[test]
    fn created_layout() {
        let v = build_image(10 << 20, 65536, 4, Some("b.raw"), Some("raw")).unwrap();
        assert_eq!(v.len(), 65536 * 5);
        assert_eq!(&v[..4], b"QED\0");
        assert_eq!(le64(&v, 16), Some(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE));
        assert_eq!(le64(&v, 40), Some(65536));
        assert_eq!(le64(&v, 48), Some(10 << 20));
        assert_eq!(&v[64..69], b"b.raw");
        let q = open_bytes(v, false).unwrap();
        assert_eq!(
            q.backing(),
            Some(BackingRef {
                filename: "b.raw".into(),
                format: Some("raw".into())
            })
        );
        assert!(build_image(1000, 65536, 4, None, None).is_err());
        assert!(build_image(1 << 20, 65536, 3, None, None).is_err());
        assert!(build_image(1 << 20, 2048, 4, None, None).is_err());
    }

    #[test]
    fn write_sets_and_flush_clears_need_check() {
        let q = open_bytes(base(), true).unwrap();
        q.write_at(&[9u8; 100], 5000, &NoBacking).unwrap();
        assert_eq!(le64(&q_bytes(&q), 16).unwrap() & F_NEED_CHECK, F_NEED_CHECK);
        assert!(q.info().unwrap().dirty);
        q.flush().unwrap();
        assert_eq!(le64(&q_bytes(&q), 16).unwrap() & F_NEED_CHECK, 0);
        let m = q.map(5000, 100).unwrap();
        assert!(matches!(m.kind, Mapped::Data { .. }), "{m:?}");
        q.write_at(&[8u8; 5000], 4000, &NoBacking).unwrap();
        let q2 = open_bytes(q_bytes(&q), false).unwrap();
        assert_eq!(q2.map(0, 4096).unwrap().kind, Mapped::Data { file: 0, offset: 16384 });
    }

    fn q_bytes(q: &Qed) -> Vec<u8> {
        let n = q.storage.len().unwrap() as usize;
        let mut v = vec![0u8; n];
        q.storage.read_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn grows_as_qemu() {
        let q = open_bytes(base(), true).unwrap();
        q.truncate(2 << 20).unwrap();
        assert_eq!(q.virtual_size(), 2 << 20);
        assert_eq!(le64(&q_bytes(&q), 48), Some(2 << 20));
        assert_eq!(q.truncate(1 << 20).unwrap_err().kind(), ErrorKind::Unsupported);
        assert_eq!(q.truncate((2 << 20) + 1).unwrap_err().kind(), ErrorKind::InvalidParam);
        assert_eq!(q.truncate(1 << 40).unwrap_err().kind(), ErrorKind::InvalidParam);
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(open_bytes(base(), false).is_ok());
        let cases: Vec<(usize, Vec<u8>, ErrorKind)> = vec![
            (4, 2048u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (4, 12288u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (8, 3u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (8, 32u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (12, 0u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (12, 5u32.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (16, 8u64.to_le_bytes().to_vec(), ErrorKind::Unsupported),
            (40, 4097u64.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (40, 0u64.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (40, (1u64 << 40).to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (40, (u64::MAX - 4095).to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (48, 1001u64.to_le_bytes().to_vec(), ErrorKind::CorruptImage),
            (48, (1u64 << 40).to_le_bytes().to_vec(), ErrorKind::CorruptImage),
        ];
        for (at, bytes, k) in cases {
            let mut v = base();
            set(&mut v, at, &bytes);
            assert_eq!(kind(open_bytes(v, false)), k, "field at {at}");
        }
        // Backing name outside the header cluster, or too long.
        let mut v = base();
        set(&mut v, 16, &F_BACKING_FILE.to_le_bytes());
        set(&mut v, 56, &4000u32.to_le_bytes());
        set(&mut v, 60, &200u32.to_le_bytes());
        assert_eq!(kind(open_bytes(v, false)), ErrorKind::CorruptImage);
        assert_eq!(kind(open_bytes(b"QED\0".to_vec(), false)), ErrorKind::CorruptImage);
    }

    #[test]
    fn bad_entries_are_corrupt_or_repaired() {
        // L1 entry outside the file.
        let mut v = base();
        set(&mut v, CS, &(1u64 << 30).to_le_bytes());
        assert_eq!(kind(open_bytes(v.clone(), false)), ErrorKind::CorruptImage);
        // ... dropped by the repair of a writable open with need-check set.
        set(&mut v, 16, &F_NEED_CHECK.to_le_bytes());
        let q = open_bytes(v.clone(), true).unwrap();
        assert_eq!(q.map(0, 4096).unwrap().kind, Mapped::Unallocated);
        let fixed = q_bytes(&q);
        assert_eq!(le64(&fixed, CS), Some(0));
        assert_eq!(le64(&fixed, 16), Some(0));
        // Read-only with the flag: the bad entry is refused when used.
        let q = open_bytes(v, false).unwrap();
        assert_eq!(q.map(0, 4096).unwrap_err().kind(), ErrorKind::CorruptImage);
        // L2 entries: unaligned, past the end.
        for bad in [8192 + 1, 1u64 << 40, 512] {
            let mut v = base();
            v.resize(4 * CS, 0);
            set(&mut v, CS, &(2 * CS as u64).to_le_bytes());
            set(&mut v, 2 * CS, &bad.to_le_bytes());
            let q = open_bytes(v.clone(), false).unwrap();
            assert_eq!(q.map(0, 4096).unwrap_err().kind(), ErrorKind::CorruptImage, "{bad:#x}");
            set(&mut v, 16, &F_NEED_CHECK.to_le_bytes());
            let q = open_bytes(v, true).unwrap();
            assert_eq!(q.map(0, 4096).unwrap().kind, Mapped::Unallocated);
        }
        // An L2 table on the L1 table; a data cluster on its L2 table.
        let mut v = base();
        set(&mut v, CS, &(CS as u64).to_le_bytes());
        assert_eq!(kind(open_bytes(v, false)), ErrorKind::CorruptImage);
        let mut v = base();
        v.resize(3 * CS, 0);
        set(&mut v, CS, &(2 * CS as u64).to_le_bytes());
        set(&mut v, 2 * CS, &(2 * CS as u64).to_le_bytes());
        let q = open_bytes(v, true).unwrap();
        assert!(matches!(q.map(0, 4096).unwrap().kind, Mapped::Data { .. }));
        assert_eq!(
            q.write_at(&[1], 0, &NoBacking).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
        assert_eq!(
            q.write_zeroes(0, 4096, &NoBacking).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
        // A zero cluster reads as zeroes.
        let mut v = base();
        v.resize(3 * CS, 0);
        set(&mut v, CS, &(2 * CS as u64).to_le_bytes());
        set(&mut v, 2 * CS, &ZERO_CLUSTER.to_le_bytes());
        let q = open_bytes(v, false).unwrap();
        assert_eq!(
            q.map(0, 8192).unwrap(),
            Mapping {
                kind: Mapped::Zero { host: None },
                len: 4096
            }
        );
    }
}
