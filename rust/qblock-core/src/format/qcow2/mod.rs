//! qcow2 (QEMU copy-on-write, versions 2 and 3), per QEMU's
//! docs/interop/qcow2.txt.
//!
//! - `types`: constants, limits, entry encodings.
//! - `header`: header, extensions, backing name; checks and serialization.
//! - `cluster`: L1 table and the bounded L2 cache.
//! - `refcount`: refcount table/blocks and cluster allocation.
//! - `write`: the write path (allocation, COW, zero clusters, discard,
//!   growing).
//! - `compress`: compressed clusters (zlib, zstd): decoding, and encoding
//!   for `write_compressed` (packed byte by byte, as QEMU writes them).
//! - `bitmap`: marking persistent bitmaps in use before we write.
//! - `repair`: recounting the refcounts of a dirty image.
//! - `check`: the consistency check and its repairs (`qemu-img check`).
//! - `snapshot`: the internal snapshot table (read, checked, written).
//! - `snapshot_ops`: creating, applying and deleting internal snapshots.
//! - `create`: new images.
//! - `amend`: compat level, lazy refcounts and refcount width in place.
//!
//! Supported: v2/v3, every refcount width, extended L2 (read and write),
//! zero clusters, compressed clusters (read; writing over one allocates a
//! plain cluster), external data files (raw or not), backing files (opened
//! by `image.rs`), internal snapshots (list, create, apply, delete; refused
//! with an external data file, as QEMU does), bitmaps preserved, dirty
//! images (refcounts rebuilt on a writable open). Not supported: encryption
//! (Unsupported on open and create).
//!
//! Reading never takes a mutex: `map` takes the L1 and L2-cache read locks
//! and returns a run of host bytes; the data I/O happens in `image.rs`
//! outside any lock.

pub mod amend;
mod bitmap;
mod check;
mod cluster;
mod compress;
mod create;
mod header;
mod refcount;
mod repair;
mod snapshot;
mod snapshot_ops;
pub mod stream;
mod types;
mod write;

#[cfg(test)]
mod tests;

use crate::backend::Storage;
use crate::driver::{
    BackingRef, Below, CheckReport, Driver, DriverInfo, HostFile, Mapped, Mapping, Repair, SnapshotInfo,
};
use crate::error::{corrupt, try_zeroed, Error, Result};
use crate::format_name::Format;
use crate::info::InfoValue;
use crate::registry::{FormatEntry, OpenCtx};
use cluster::{L2Cache, L1};
use header::Header;
use parking_lot::{Mutex, RwLock};
use refcount::Refcounts;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use types::*;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Qcow2,
    probe: Some(|head, _| if head.starts_with(MAGIC) { 100 } else { 0 }),
    open: Some(open),
    create: Some(create::create),
};

/// Reads of at least this many whole compressed clusters decode in parallel.
const PARALLEL_MIN_CLUSTERS: usize = 2;

/// Distinguishes driver instances in the per-thread decompression cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last cluster this thread decompressed: (driver id, L2 entry, bytes).
    /// Sequential small reads of a compressed cluster decompress it once.
    static DECOMPRESSED: RefCell<(u64, u64, Vec<u8>)> = const { RefCell::new((0, 0, Vec::new())) };
}

pub struct Qcow2 {
    file: Arc<dyn Storage>,
    /// External data file (host file 1).
    data: Option<Arc<dyn Storage>>,
    hdr: Header,
    g: Geometry,
    size: AtomicU64,
    l1: RwLock<L1>,
    l2: L2Cache,
    /// The allocation state; every metadata change happens under it.
    /// Loaded at the first write.
    alloc: Mutex<Option<Refcounts>>,
    /// Set once the image has been prepared for writing (bitmaps marked in
    /// use, unknown autoclear bits cleared).
    prepared: AtomicBool,
    /// Cluster-aligned end of the image file: no L2 table or data cluster
    /// may lie beyond it. Grows as we allocate.
    file_end: AtomicU64,
    /// A fresh cluster's zero tail was left unwritten past the end of the
    /// file: the next flush grows the file to `file_end`.
    short_tail: AtomicBool,
    /// Where the next compressed cluster's bytes go and where the clusters
    /// allocated for packing them end (0, 0: none yet). Compressed data is
    /// packed byte by byte, as QEMU packs it. Taken under `alloc`.
    packed: Mutex<(u64, u64)>,
    read_only: bool,
    id: u64,
    /// Host ranges holding metadata of the image file (sorted by start),
    /// built at the first write: a data write that would land on one is
    /// refused, as QEMU's overlap check does. Bounded by the L1 and
    /// refcount table caps.
    meta: RwLock<Vec<(u64, u64)>>,
    /// The internal snapshot table as it is now (`hdr` keeps the values
    /// read at open).
    snaps: RwLock<snapshot::Table>,
    /// Held shared by every write call and exclusively by snapshot
    /// operations, so that no write (not even one into a cluster of our
    /// own, which takes no other lock) runs while the tables change hands.
    gate: RwLock<()>,
    /// Opened read-write for checking while dirty or marked corrupt: the
    /// refcounts on disk cannot be trusted, so nothing may allocate until a
    /// check has repaired them (`check.rs` clears it).
    stale: AtomicBool,
    /// Opened for checking with L1 entries that failed their checks (kept
    /// as `cluster::DAMAGED_L1`): never written through.
    damaged_l1: bool,
}

fn open(file: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    Ok(Box::new(Qcow2::open(file, ctx)?))
}

impl Qcow2 {
    pub fn open(file: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Qcow2> {
        let len = file.len()?;
        let mut head = [0u8; V3_HEADER_LEN_FULL as usize];
        file.read_at(&mut head, 0)?;
        let mut hdr = Header::parse_fixed(&head, len)?;
        let cs = hdr.cluster_size();
        let mut first = try_zeroed(cs as usize, "qcow2 header cluster")?;
        file.read_at(&mut first, 0)?;
        hdr.parse_extensions(&first)?;
        hdr.validate(len)?;
        let read_only = ctx.read_only;
        // A corrupt image may be opened for writing only to be repaired.
        if !read_only && !ctx.check && hdr.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt("image is marked corrupt; it can only be opened read-only"));
        }
        let g = Geometry::new(hdr.cluster_bits, hdr.extended_l2());
        let file_end = align_up(len, cs)?;
        let (l1, damaged_l1) =
            cluster::load_l1(file.as_ref(), &g, hdr.l1_table_offset, hdr.l1_size, file_end, ctx.check)?;
        let stale = ctx.check && !read_only && hdr.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0;
        let snaps = if hdr.nb_snapshots > 0 {
            let (list, table_len) = snapshot::read_table(file.as_ref(), &hdr, len)?;
            snapshot::Table {
                offset: hdr.snapshots_offset,
                len: table_len,
                list,
            }
        } else {
            snapshot::Table::default()
        };
        if hdr.version < 3 {
            // QEMU ignores a bitmaps extension in a version 2 image.
            hdr.bitmaps = None;
        }
        if let (Some(b), true) = (&hdr.bitmaps, hdr.autoclear & AUTOCLEAR_BITMAPS != 0) {
            bitmap::check(file.as_ref(), b, cs, file_end)?;
        }
        if hdr.incompatible & INCOMPAT_DIRTY != 0 && !ctx.check {
            if read_only {
                crate::events::dirty_served_as_is(
                    Format::Qcow2,
                    ctx.location,
                    "its lazy refcounts were not written back; read as it is (a read-write open repairs it)",
                );
            } else {
                // Lazy refcounts were not written back before a crash: recount
                // them before anything relies on them, as QEMU does.
                repair::rebuild(file.as_ref(), &mut hdr, l1.offset, l1.entries.len() as u64)
                    .map_err(|e| e.context("cannot repair the refcounts of this dirty image"))?;
                crate::events::repaired_on_open(
                    Format::Qcow2,
                    ctx.location,
                    "the image was not closed cleanly with lazy refcounts: the refcounts were rebuilt",
                );
            }
        }
        if let (Some(b), false, true) = (&hdr.bitmaps, read_only, hdr.autoclear & AUTOCLEAR_BITMAPS != 0) {
            crate::events::format_note(
                Format::Qcow2,
                ctx.location,
                &format!(
                    "its {} persistent bitmap(s) are kept but not updated: the first write marks the \
                     enabled ones in use, so QEMU treats them as stale",
                    b.nb_bitmaps
                ),
            );
        }
        let file_end = align_up(file.len()?, cs)?;
        let data = match &hdr.data_file {
            Some(name) => {
                let loc = ctx.location.relative(name);
                // Data written through the image would land on its own
                // metadata, or in a backing file that must stay unchanged.
                let id = loc.identity();
                if id == ctx.location.identity() {
                    return Err(corrupt(format!("the external data file '{name}' is the image itself")));
                }
                if hdr
                    .backing_file
                    .as_ref()
                    .is_some_and(|b| ctx.location.relative(b).identity() == id)
                {
                    return Err(corrupt(format!(
                        "the external data file '{name}' is also the backing file"
                    )));
                }
                Some(
                    ctx.open_data_file(name, &loc, read_only)
                        .map_err(|e| e.context(format!("cannot open the external data file '{name}'")))?,
                )
            }
            None => None,
        };
        Ok(Qcow2 {
            file,
            data,
            size: AtomicU64::new(hdr.size),
            l2: L2Cache::new(&g),
            g,
            hdr,
            l1: RwLock::new(l1),
            alloc: Mutex::new(None),
            prepared: AtomicBool::new(false),
            file_end: AtomicU64::new(file_end),
            short_tail: AtomicBool::new(false),
            packed: Mutex::new((0, 0)),
            read_only,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            meta: RwLock::new(Vec::new()),
            snaps: RwLock::new(snaps),
            gate: RwLock::new(()),
            stale: AtomicBool::new(stale),
            damaged_l1,
        })
    }

    fn has_data_file(&self) -> bool {
        self.data.is_some()
    }

    fn data_host(&self) -> HostFile {
        if self.has_data_file() {
            1
        } else {
            0
        }
    }

    /// The unit `u` (cluster, or subcluster with extended L2) of an L2
    /// table, with its host offset checked.
    #[inline]
    fn unit_at(&self, w: &[u64], u: u64) -> Result<Unit> {
        let g = &self.g;
        let per = g.cluster_bits - g.unit_bits;
        let ci = (u >> per) as usize;
        let sc = (u & ((1 << per) - 1)) as u32;
        let (e, bm) = if g.extended {
            (w[ci * 2], w[ci * 2 + 1])
        } else {
            (w[ci], 0)
        };
        let unit = decode(g, e, bm, sc, self.has_data_file())?;
        match unit {
            Unit::Data { .. } | Unit::ZeroAlloc { .. } => self.check_mapped_host(e & OFFSET_MASK)?,
            _ => {}
        }
        Ok(unit)
    }

    /// A guest cluster's host cluster: aligned and past the header. It may
    /// lie past the end of the file, as after a crash that lost a write
    /// extending the file but kept the L2 entry (QEMU's check repairs it by
    /// growing the file): it reads as zeroes there, as QEMU reads it, and a
    /// write fills it in.
    #[inline]
    fn check_mapped_host(&self, off: u64) -> Result<()> {
        if off & (self.g.cluster_size - 1) != 0 {
            return Err(corrupt(format!("data cluster offset {off:#x} is not cluster aligned")));
        }
        if !self.has_data_file() && off < self.g.cluster_size {
            return Err(corrupt(format!("data cluster at {off:#x} is the image header")));
        }
        Ok(())
    }

    #[inline]
    fn check_host(&self, off: u64) -> Result<()> {
        if off & (self.g.cluster_size - 1) != 0 {
            return Err(corrupt(format!("data cluster offset {off:#x} is not cluster aligned")));
        }
        if !self.has_data_file() {
            let end = self.file_end.load(Ordering::Relaxed);
            if off < self.g.cluster_size || off.checked_add(self.g.cluster_size).is_none_or(|e| e > end) {
                return Err(corrupt(format!("data cluster at {off:#x} is outside the image file")));
            }
        }
        Ok(())
    }

    /// The L2 table covering `offset`: its L1 index and host offset (0 if none).
    #[inline]
    fn l2_for(&self, offset: u64) -> Result<(usize, u64)> {
        let idx = (offset >> self.g.l2_cover_bits()) as usize;
        let l1 = self.l1.read();
        let e = *l1
            .entries
            .get(idx)
            .ok_or_else(|| Error::Internal(format!("offset {offset} is beyond the L1 table")))?;
        if e == cluster::DAMAGED_L1 {
            return Err(corrupt(format!("L1 entry {idx} is damaged (see the check's report)")));
        }
        Ok((idx, e & OFFSET_MASK))
    }

    /// How the run from `offset` maps: its first unit (host offset moved to
    /// `offset`) and the length of the run of units continuing it.
    fn scan(&self, offset: u64, len: u64) -> Result<(Unit, u64)> {
        let g = &self.g;
        let cover_bits = g.l2_cover_bits();
        let (l1_idx, l2_off) = self.l2_for(offset)?;
        let table_end = ((l1_idx as u64) + 1) << cover_bits;
        let max = len.min(table_end - offset);
        if l2_off == 0 {
            return Ok((Unit::Unallocated, max));
        }
        let us = g.unit_size();
        self.l2.with(self.file.as_ref(), l2_off, |w| {
            let u0 = (offset & ((1u64 << cover_bits) - 1)) >> g.unit_bits;
            let within = offset & (us - 1);
            let first = self.unit_at(w, u0)?;
            if first == Unit::Compressed {
                // A run of compressed clusters decodes as one (in parallel).
                let per = 1u64 << (g.cluster_bits - g.unit_bits);
                let mut run = g.cluster_size - (offset & (g.cluster_size - 1));
                let mut u = (u0 / per + 1) * per;
                let last_unit = 1u64 << (cover_bits - g.unit_bits);
                while run < max && u < last_unit && self.unit_at(w, u)? == Unit::Compressed {
                    run += g.cluster_size;
                    u += per;
                }
                return Ok((first, max.min(run)));
            }
            if first == Unit::Unallocated {
                // Sparse tables are mostly zero words: find the next word that
                // is not with a plain search instead of decoding every unit.
                let words = g.words();
                let per = g.cluster_bits - g.unit_bits;
                let ci0 = (u0 >> per) as usize;
                let entries = 1usize << (cover_bits - g.cluster_bits);
                if w[ci0 * words..(ci0 + 1) * words].iter().all(|&x| x == 0) {
                    let next = w[(ci0 + 1) * words..entries * words]
                        .iter()
                        .position(|&x| x != 0)
                        .map_or(entries, |p| ci0 + 1 + p / words);
                    let run = ((next - ci0) as u64) * g.cluster_size - (offset & (g.cluster_size - 1));
                    return Ok((Unit::Unallocated, run.min(max)));
                }
            }
            let mut run = us - within;
            let mut k = 1u64;
            let last_unit = 1u64 << (cover_bits - g.unit_bits);
            while run < max && u0 + k < last_unit {
                let next = self.unit_at(w, u0 + k)?;
                let cont = match (first, next) {
                    (Unit::Unallocated, Unit::Unallocated) | (Unit::ZeroPlain, Unit::ZeroPlain) => true,
                    (Unit::Data { host: h0, copied: c0 }, Unit::Data { host: h1, copied: c1 })
                    | (Unit::ZeroAlloc { host: h0, copied: c0 }, Unit::ZeroAlloc { host: h1, copied: c1 }) => {
                        c0 == c1 && h0.checked_add(k * us) == Some(h1)
                    }
                    _ => false,
                };
                if !cont {
                    break;
                }
                run += us;
                k += 1;
            }
            let first = match first {
                Unit::Data { host, copied } => Unit::Data {
                    host: host + within,
                    copied,
                },
                Unit::ZeroAlloc { host, copied } => Unit::ZeroAlloc {
                    host: host + within,
                    copied,
                },
                other => other,
            };
            Ok((first, run.min(max)))
        })?
    }

    /// The raw L2 entry (and bitmap) of the cluster holding `offset`.
    fn entry_at(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        let (_, l2_off) = self.l2_for(offset)?;
        if l2_off == 0 {
            return Ok(None);
        }
        let g = &self.g;
        let ci = ((offset >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
        self.l2.with(self.file.as_ref(), l2_off, |w| {
            if g.extended {
                Some((w[ci * 2], w[ci * 2 + 1]))
            } else {
                Some((w[ci], 0))
            }
        })
    }

    /// Decompress the cluster described by the compressed entry `e` into `out`.
    fn decompress_entry(&self, e: u64, out: &mut [u8]) -> Result<()> {
        let (off, len) = self.g.compressed(e);
        let end = off
            .checked_add(len)
            .ok_or_else(|| corrupt("compressed cluster range overflows"))?;
        if off < self.g.cluster_size || off >= self.file_end.load(Ordering::Relaxed) {
            return Err(corrupt(format!(
                "compressed cluster at {off:#x} is outside the image file"
            )));
        }
        let _ = end;
        let mut input = try_zeroed(len as usize, "compressed cluster")?; // at most 2 clusters
        self.file.read_at(&mut input, off)?;
        compress::decompress(self.hdr.compression_type, &input, out)
    }

    /// The L2 entry of the compressed cluster holding `offset`.
    fn compressed_entry(&self, offset: u64) -> Result<u64> {
        let (e, _) = self
            .entry_at(offset)?
            .ok_or_else(|| Error::Internal("compressed cluster vanished".into()))?;
        if e & COMPRESSED == 0 {
            // A concurrent write replaced it between map and read.
            return Err(Error::Internal(
                "cluster is no longer compressed (concurrent write)".into(),
            ));
        }
        Ok(e)
    }

    /// Part of a compressed cluster, through the per-thread cache so that
    /// small sequential reads decompress each cluster once.
    fn read_cached(&self, e: u64, within: usize, out: &mut [u8]) -> Result<()> {
        let cs = self.g.cluster_size as usize;
        DECOMPRESSED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != self.id || c.1 != e || c.2.len() != cs {
                c.0 = 0;
                if c.2.len() != cs {
                    c.2 = try_zeroed(cs, "decompressed cluster")?;
                }
                self.decompress_entry(e, &mut c.2)?;
                c.0 = self.id;
                c.1 = e;
            }
            out.copy_from_slice(&c.2[within..within + out.len()]);
            Ok(())
        })
    }

    fn to_mapping(&self, u: Unit, len: u64) -> Mapping {
        let hf = self.data_host();
        let kind = match u {
            Unit::Unallocated => Mapped::Unallocated,
            Unit::ZeroPlain => Mapped::Zero { host: None },
            Unit::ZeroAlloc { host, .. } => Mapped::Zero { host: Some((hf, host)) },
            Unit::Data { host, .. } => Mapped::Data { file: hf, offset: host },
            Unit::Compressed => Mapped::Encoded,
        };
        Mapping { kind, len }
    }
}

impl Drop for Qcow2 {
    /// An image dropped without close still gives back its reserved
    /// clusters (best effort: an error here can only leave leaked clusters).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.release_reserved();
        }
    }
}

impl Driver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn backing(&self) -> Option<BackingRef> {
        self.hdr.backing_file.as_ref().map(|f| BackingRef {
            filename: f.clone(),
            format: self.hdr.backing_format.clone(),
        })
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let (u, n) = self.scan(offset, len)?;
        Ok(self.to_mapping(u, n))
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        match file {
            0 => Some(self.file.as_ref()),
            1 => self.data.as_deref(),
            _ => None,
        }
    }

    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        // Split into per-cluster pieces; whole clusters decode straight into
        // `buf`, pieces of clusters through the per-thread cache.
        let mut whole: Vec<(u64, &mut [u8])> = Vec::new();
        let mut rest = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let within = pos & (cs - 1);
            let n = ((cs - within) as usize).min(rest.len());
            let (piece, tail) = rest.split_at_mut(n);
            let e = self.compressed_entry(pos)?;
            if n as u64 == cs {
                whole.push((e, piece));
            } else {
                self.read_cached(e, within as usize, piece)?;
            }
            rest = tail;
            pos += n as u64;
        }
        if whole.len() < PARALLEL_MIN_CLUSTERS {
            return whole
                .into_iter()
                .try_for_each(|(e, piece)| self.decompress_entry(e, piece));
        }
        // The pool's threads persist: a read pays a wake-up, not a spawn.
        use rayon::prelude::*;
        whole
            .into_par_iter()
            .try_for_each(|(e, piece)| self.decompress_entry(e, piece))
    }

    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let _g = self.gate.read_recursive();
        self.write_impl(buf, offset, below)
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let _g = self.gate.read_recursive();
        self.zero_impl(offset, len, below)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.gate.read_recursive();
        self.discard_impl(offset, len)
    }

    fn flush(&self) -> Result<()> {
        // Metadata is written through under the allocation lock, so there is
        // nothing dirty in memory: give back reserved clusters, then make the
        // files durable.
        if self.read_only {
            return Ok(());
        }
        self.release_reserved()?;
        if let Some(d) = &self.data {
            d.flush()?;
        }
        self.file.flush()
    }

    fn info(&self) -> Result<DriverInfo> {
        let h = &self.hdr;
        let mut fs: Vec<(String, InfoValue)> = Vec::new();
        let v3 = h.version >= 3;
        fs.push(("compat".into(), if v3 { "1.1" } else { "0.10" }.into()));
        let ct = if h.compression_type == COMPRESSION_ZSTD {
            "zstd"
        } else {
            "zlib"
        };
        fs.push(("compression-type".into(), ct.into()));
        if v3 {
            fs.push((
                "lazy-refcounts".into(),
                (h.compatible & COMPAT_LAZY_REFCOUNTS != 0).into(),
            ));
            if let (Some(b), true) = (&h.bitmaps, h.autoclear & AUTOCLEAR_BITMAPS != 0) {
                let end = self.file_end.load(Ordering::Relaxed);
                fs.push((
                    "bitmaps".into(),
                    bitmap::info(self.file.as_ref(), b, self.g.cluster_size, end)?,
                ));
            }
        }
        fs.push(("refcount-bits".into(), (1u64 << h.refcount_order).into()));
        if v3 {
            if let Some(d) = &h.data_file {
                fs.push(("data-file".into(), d.clone().into()));
                fs.push((
                    "data-file-raw".into(),
                    (h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0).into(),
                ));
            }
            fs.push(("corrupt".into(), (h.incompatible & INCOMPAT_CORRUPT != 0).into()));
            fs.push(("extended-l2".into(), h.extended_l2().into()));
        }
        Ok(DriverInfo {
            cluster_size: Some(self.g.cluster_size),
            encrypted: h.crypt_method != 0,
            dirty: h.incompatible & INCOMPAT_DIRTY != 0,
            format_specific: fs,
        })
    }

    fn compressed_unit(&self) -> Option<u64> {
        // QEMU writes no compressed clusters into an external data file.
        (!self.has_data_file()).then_some(self.g.cluster_size)
    }

    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        compress::compress_cluster(self.hdr.compression_type, data, self.g.cluster_size as usize)
    }

    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        let _g = self.gate.read_recursive();
        self.write_compressed_impl(units)
    }

    fn make_empty(&self) -> Result<()> {
        let _g = self.gate.read_recursive();
        self.make_empty_impl()
    }

    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.snaps.read().list.iter().map(|s| s.info()).collect())
    }

    fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        self.snapshot_create_impl(name)
    }

    fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_apply_impl(id_or_name)
    }

    fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_delete_impl(id_or_name)
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        // Under the allocation lock: every other header write happens there.
        let _meta = self.alloc.lock();
        let first = header::with_backing_from(self.file.as_ref(), backing)?;
        self.file.write_at(&first, 0)?;
        self.file.flush()
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.truncate_impl(size)
    }

    fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_impl(repair)
    }
}
