//! One hosted sparse extent: grain directory (in memory), grain tables
//! (a bounded cache), grains plain or compressed (streamOptimized), and the
//! grain allocation of the write path.
//!
//! Crash order of a write that allocates: the grain is written whole
//! (copy-on-write from the layers below for the parts the write does not
//! cover) at the end of the file; its grain table entry changes only in the
//! cache and is marked dirty. `flush` makes the grains durable first, then
//! writes each dirty table to its redundant copy and to the primary, then
//! flushes again. A crash before that leaves a grain no table references
//! (wasted space, never wrong data), as QEMU's order does. A grain whose
//! directory entry is empty first gets new zeroed tables (see `new_table`).

use super::header::{self, SparseLayout, GTE_ZEROED, MAX_EXTENT_FILE, SECTOR};
use crate::backend::Storage;
use crate::driver::{Below, HostFile, Mapped};
use crate::error::{corrupt, try_zeroed, unsupported, Error, Result};
use crate::format::deflate::{deflate, stored_zlib, whole_unit, Container};
use parking_lot::{Mutex, RwLock};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Grain table bytes kept in memory per extent: 16 MiB (8192 tables of
/// 2 KiB cover 256 GiB with the usual 64 KiB grains); when full, clean
/// tables are dropped.
const MAX_CACHED_BYTES: usize = 16 << 20;
/// Dirty tables are written back before the cache holds more than this.
const MAX_DIRTY_TABLES: usize = 1024;

type Table = Arc<Vec<u32>>;

/// Distinguishes extents in the per-thread decompression cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last grain this thread decompressed: (extent id, entry, bytes).
    /// Sequential small reads of a compressed grain decompress it once.
    static DECOMPRESSED: RefCell<(u64, u32, Vec<u8>)> = const { RefCell::new((0, 0, Vec::new())) };
}

#[derive(Default)]
struct Cache {
    tables: HashMap<u32, Table>,
    dirty: BTreeSet<u32>,
}

pub struct SparseExtent {
    pub file: HostFile,
    storage: Arc<dyn Storage>,
    pub layout: SparseLayout,
    /// Grain directory and its redundant copy: atomics, because a write
    /// may add a grain table while readers look entries up without a lock.
    gd: Vec<AtomicU32>,
    rgd: Option<Vec<AtomicU32>>,
    cache: RwLock<Cache>,
    /// Serialises writers (allocation, table updates).
    alloc: Mutex<()>,
    /// Serialises table write-back: two flushes writing one table in the
    /// opposite order to their snapshots would leave the older on disk.
    /// Taken after `alloc` (writers flush while holding it), never before.
    flushing: Mutex<()>,
    /// The extent file's end: new grains and tables go there; entries
    /// pointing at or past it are corrupt.
    end: AtomicU64,
    id: u64,
    /// The header says GD_AT_END (a stream, as VMware writes one): the
    /// tables, footer and end-of-stream marker end the file, so nothing
    /// can be appended to it.
    streamed: bool,
}

/// Encode one grain of guest bytes (shorter at the extent's end: padded
/// with zeroes) as the zlib stream a compressed grain holds. A grain that
/// does not compress is stored in uncompressed deflate blocks: every grain
/// of a compressed extent must be a zlib stream.
pub fn compress_grain(data: &[u8], grain: usize) -> Result<Vec<u8>> {
    let input = &whole_unit(data, grain)?[..];
    match deflate(input, grain - 1, Container::Zlib)? {
        Some(z) => Ok(z),
        None => stored_zlib(input),
    }
}

/// `buf` (whole grains from `at`, the last one possibly short) as
/// compressed grains at their offsets.
pub fn compressed_grains(buf: &[u8], at: u64, grain: u64) -> Result<Vec<(u64, Vec<u8>)>> {
    buf.chunks(grain as usize)
        .enumerate()
        .map(|(i, c)| Ok((at + i as u64 * grain, compress_grain(c, grain as usize)?)))
        .collect()
}

/// A grain marker (extent-relative sector, stream length) and the stream,
/// padded to whole sectors.
pub fn push_grain(out: &mut Vec<u8>, rel: u64, blob: &[u8]) {
    out.extend_from_slice(&(rel / SECTOR).to_le_bytes());
    out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
    out.extend_from_slice(blob);
    out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
}

/// Read `n` little-endian u32 from `at`, in 1 MiB pieces: a grain
/// directory (up to 128 MiB) is held once, not also as raw bytes.
fn read_u32s(s: &dyn Storage, at: u64, n: usize, what: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| crate::error::Error::NoMemory(format!("cannot allocate {n} entries for {what}")))?;
    let mut raw = try_zeroed((n * 4).min(1 << 20), what)?;
    while out.len() < n {
        let k = (n - out.len()).min(raw.len() / 4);
        s.read_at(&mut raw[..4 * k], at + 4 * out.len() as u64)?;
        out.extend(
            raw[..4 * k]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(out)
}

impl SparseExtent {
    /// Open the sparse extent in `storage` (host file `file`), whose header
    /// sector is `head`.
    pub fn open(file: HostFile, storage: Arc<dyn Storage>, head: &[u8], writable: bool) -> Result<SparseExtent> {
        let file_len = storage.len()?;
        if head.starts_with(header::MAGIC_COWD) {
            let layout = header::cowd_layout(head, file_len)?;
            return Self::with_layout(file, storage, layout, file_len, writable);
        }
        let mut h = header::SparseHeader::parse(head)?;
        let streamed = h.gd_offset == header::GD_AT_END;
        if streamed {
            if file_len < 1536 + 512 {
                return Err(corrupt("stream-optimized extent is too short for its footer"));
            }
            let mut tail = vec![0u8; 1536];
            storage.read_at(&mut tail, file_len - 1536)?;
            h = header::parse_footer(&tail)?;
            if h.gd_offset == header::GD_AT_END {
                return Err(corrupt("stream-optimized footer has no grain directory either"));
            }
        }
        let layout = header::validate(&h, file_len, writable)?;
        let mut e = Self::with_layout(file, storage, layout, file_len, writable)?;
        e.streamed = streamed;
        Ok(e)
    }

    fn with_layout(
        file: HostFile,
        storage: Arc<dyn Storage>,
        layout: SparseLayout,
        file_len: u64,
        writable: bool,
    ) -> Result<SparseExtent> {
        let n = layout.gd_entries as usize;
        let gd = read_u32s(storage.as_ref(), layout.gd_offset, n, "the grain directory")?;
        let rgd = match layout.rgd_offset {
            Some(o) => Some(read_u32s(storage.as_ref(), o, n, "the redundant grain directory")?),
            None => None,
        };
        let gt_bytes = layout.gt_bytes();
        for (i, &e) in gd.iter().chain(rgd.iter().flatten()).enumerate() {
            let at = u64::from(e) * SECTOR;
            if e != 0 && at.checked_add(gt_bytes).is_none_or(|end| end > file_len) {
                return Err(corrupt(format!(
                    "grain table {} at sector {e} is outside the file",
                    i % n.max(1)
                )));
            }
        }
        if let Some(r) = &rgd {
            if writable && gd.iter().zip(r).any(|(&a, &b)| (a == 0) != (b == 0)) {
                return Err(corrupt(
                    "grain directory and its redundant copy disagree on allocated tables",
                ));
            }
        }
        Ok(SparseExtent {
            file,
            storage,
            layout,
            gd: gd.into_iter().map(AtomicU32::new).collect(),
            rgd: rgd.map(|r| r.into_iter().map(AtomicU32::new).collect()),
            cache: RwLock::new(Cache::default()),
            alloc: Mutex::new(()),
            flushing: Mutex::new(()),
            end: AtomicU64::new(file_len),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            streamed: false,
        })
    }

    /// The grain table for directory index `l1`, None when not allocated.
    fn gd_entry(&self, l1: usize) -> Option<u32> {
        self.gd.get(l1).map(|e| e.load(Ordering::Acquire))
    }

    fn table(&self, l1: usize) -> Result<Option<Table>> {
        let sector = match self.gd_entry(l1) {
            Some(0) => return Ok(None),
            Some(s) => s,
            None => return Err(corrupt(format!("grain directory index {l1} out of range"))),
        };
        if let Some(t) = self.cache.read().tables.get(&(l1 as u32)) {
            return Ok(Some(t.clone()));
        }
        let t = Arc::new(read_u32s(
            self.storage.as_ref(),
            u64::from(sector) * SECTOR,
            self.layout.gtes_per_gt as usize,
            "a grain table",
        )?);
        let mut c = self.cache.write();
        if let Some(t) = c.tables.get(&(l1 as u32)) {
            return Ok(Some(t.clone()));
        }
        if c.tables.len() >= MAX_CACHED_BYTES / self.layout.gt_bytes() as usize {
            let Cache { tables, dirty } = &mut *c;
            tables.retain(|k, _| dirty.contains(k));
        }
        c.tables.insert(l1 as u32, t.clone());
        Ok(Some(t))
    }

    /// The grain table entry for extent-relative byte `rel`.
    fn entry(&self, rel: u64) -> Result<u32> {
        let l = &self.layout;
        let l1 = (rel / l.gt_span()) as usize;
        let l2 = ((rel % l.gt_span()) / l.grain) as usize;
        Ok(match self.table(l1)? {
            None => 0,
            Some(t) => t[l2],
        })
    }

    fn classify(&self, gte: u32, rel_in_grain: u64) -> Result<Mapped> {
        if gte == 0 {
            return Ok(Mapped::Unallocated);
        }
        if gte == GTE_ZEROED && self.layout.zero_grain {
            return Ok(Mapped::Zero { host: None });
        }
        let at = u64::from(gte) * SECTOR;
        if at >= self.end.load(Ordering::Acquire) {
            return Err(corrupt(format!(
                "grain at sector {gte} is beyond the end of the extent file"
            )));
        }
        if self.layout.compressed {
            return Ok(Mapped::Encoded);
        }
        Ok(Mapped::Data {
            file: self.file,
            offset: at + rel_in_grain,
        })
    }

    /// How extent-relative `[rel, rel+len)` maps, as far as it maps one way
    /// (`len` already clipped to the extent).
    pub fn map(&self, rel: u64, len: u64) -> Result<(Mapped, u64)> {
        let l = &self.layout;
        let grain = l.grain;
        let in_grain = rel % grain;
        let first = self.classify(self.entry(rel)?, in_grain)?;
        let mut run = (grain - in_grain).min(len);
        // Compressed grains are decoded one at a time.
        if first == Mapped::Encoded {
            return Ok((first, run));
        }
        let span = l.gt_span();
        let same = |next: Mapped, run: u64| match (first, next) {
            (Mapped::Data { offset: a, .. }, Mapped::Data { offset: b, .. }) => a + run == b,
            (a, b) => a == b,
        };
        // From here `rel + run` is grain-aligned: scan each table once.
        while run < len {
            let pos = rel + run;
            let l1 = (pos / span) as usize;
            match self.table(l1)? {
                // A missing grain table is one unallocated run of its span.
                None if first == Mapped::Unallocated => run = (run + span - pos % span).min(len),
                None => break,
                Some(t) => {
                    for &gte in &t[((pos % span) / grain) as usize..] {
                        if run >= len {
                            break;
                        }
                        if !same(self.classify(gte, 0)?, run) {
                            return Ok((first, run));
                        }
                        run = (run + grain).min(len);
                    }
                }
            }
        }
        Ok((first, run))
    }

    /// Decode the compressed grain holding extent-relative `rel` into `buf`
    /// (which stays inside that grain).
    pub fn read_compressed(&self, buf: &mut [u8], rel: u64) -> Result<()> {
        let gte = self.entry(rel)?;
        let off = (rel % self.layout.grain) as usize;
        DECOMPRESSED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != self.id || c.1 != gte {
                *c = (0, 0, Vec::new());
                let out = self.decompress(gte)?;
                *c = (self.id, gte, out);
            }
            let out = &c.2;
            if off + buf.len() > out.len() {
                return Err(corrupt(format!("compressed grain at sector {gte} decompresses short")));
            }
            buf.copy_from_slice(&out[off..off + buf.len()]);
            Ok(())
        })
    }

    /// Decode the compressed grain at sector `gte`: the bytes it produced
    /// (at most one grain).
    fn decompress(&self, gte: u32) -> Result<Vec<u8>> {
        let grain = self.layout.grain;
        let at = u64::from(gte) * SECTOR;
        // A grain marker (lba u64, size u32) precedes the zlib stream; QEMU
        // reads up to two grains of it.
        let max = (2 * grain) as usize;
        let (data_at, data_len) = if self.layout.markers {
            let mut m = [0u8; 12];
            self.storage.read_at(&mut m, at)?;
            let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as usize;
            if size == 0 || size > max {
                return Err(corrupt(format!(
                    "compressed grain at sector {gte} has a bad size {size}"
                )));
            }
            (at + 12, size)
        } else {
            (at, grain as usize)
        };
        // Both buffers are bounded by the file, not only by the grain size
        // (up to 1 GiB): the compressed bytes must lie in the file, and
        // deflate expands at most 1032 to 1.
        let data_len = if data_at.saturating_add(data_len as u64) > self.end.load(Ordering::Acquire) {
            if self.layout.markers {
                return Err(corrupt(format!(
                    "compressed grain at sector {gte} runs past the end of the file"
                )));
            }
            // Without markers the grain's length is unknown: read what is there.
            self.end
                .load(Ordering::Acquire)
                .saturating_sub(data_at)
                .min(data_len as u64) as usize
        } else {
            data_len
        };
        let mut src = try_zeroed(data_len, "a compressed grain")?;
        self.storage.read_at(&mut src, data_at)?;
        let out_len = (grain as usize).min(data_len.saturating_mul(1032).saturating_add(64));
        let mut out = try_zeroed(out_len, "a decompressed grain")?;
        let mut z = flate2::Decompress::new(true);
        match z.decompress(&src, &mut out, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {}
            // Anything else: a broken stream, or one that wants more room
            // than a grain (too big).
            _ => return Err(corrupt(format!("compressed grain at sector {gte} does not decompress"))),
        }
        out.truncate(z.total_out() as usize);
        Ok(out)
    }

    /// Write `buf` at extent-relative `rel`; `guest_base` is the extent's
    /// first guest byte (for copy-on-write reads from `below`).
    pub fn write(&self, buf: &[u8], rel: u64, guest_base: u64, below: &dyn Below) -> Result<()> {
        if self.layout.compressed {
            return self.write_whole_grains(buf, rel);
        }
        let _g = self.alloc.lock();
        self.write_locked(buf, rel, guest_base, below)?;
        let dirty = self.cache.read().dirty.len();
        if dirty >= MAX_DIRTY_TABLES {
            self.flush_tables()?;
        }
        Ok(())
    }

    /// Whether grains can be appended: a compressed extent whose tables
    /// lie before its grains (QEMU's layout), not one written as a stream.
    pub fn appendable(&self) -> bool {
        !self.streamed
    }

    pub fn compress_grain(&self, data: &[u8]) -> Result<Vec<u8>> {
        compress_grain(data, self.layout.grain as usize)
    }

    /// A compressed extent takes whole grains only, each written once (as
    /// QEMU's streamOptimized writes): each grain of `buf` is compressed
    /// here and appended.
    fn write_whole_grains(&self, buf: &[u8], rel: u64) -> Result<()> {
        let grain = self.layout.grain;
        let cap = self.layout.capacity;
        let ends_at_cap = rel + buf.len() as u64 == cap;
        if !rel.is_multiple_of(grain) || !((buf.len() as u64).is_multiple_of(grain) || ends_at_cap) {
            return Err(unsupported(format!(
                "a streamOptimized VMDK is written in whole grains ({grain} bytes, aligned): \
                 {} bytes at extent offset {rel} are not",
                buf.len()
            )));
        }
        let blobs = compressed_grains(buf, rel, grain)?;
        let units: Vec<(u64, &[u8])> = blobs.iter().map(|(a, b)| (*a, &b[..])).collect();
        self.write_compressed(&units)
    }

    /// Append compressed grains (`compress_grain`'s streams) at
    /// extent-relative grain offsets, each behind its grain marker, in one
    /// write; their table entries change in the cache. A grain already
    /// written is refused, as QEMU refuses it: its old stream stays where
    /// it is, and a second one would leak it.
    pub fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        if !self.layout.compressed {
            return Err(unsupported("this VMDK extent does not hold compressed grains"));
        }
        if self.streamed {
            return Err(unsupported(
                "this streamOptimized VMDK was written as a stream (its tables follow its grains): \
                 it cannot be written to; convert it to write",
            ));
        }
        let _g = self.alloc.lock();
        let grain = self.layout.grain;
        let start = self.end.load(Ordering::Acquire).next_multiple_of(SECTOR);
        let mut out: Vec<u8> = Vec::new();
        let mut entries = Vec::with_capacity(units.len());
        let mut seen = BTreeSet::new();
        for (rel, blob) in units {
            if !seen.insert(*rel) {
                return Err(crate::error::invalid(format!(
                    "the grain at extent offset {rel} is twice in one batch"
                )));
            }
            if !rel.is_multiple_of(grain) || *rel >= self.layout.capacity {
                return Err(crate::error::invalid(format!(
                    "a compressed grain at extent offset {rel} is not a whole grain of the extent"
                )));
            }
            if blob.is_empty() || blob.len() as u64 > 2 * grain {
                return Err(crate::error::invalid(format!(
                    "a compressed grain of {} bytes (at most {} can be read back)",
                    blob.len(),
                    2 * grain
                )));
            }
            let gte = self.entry(*rel)?;
            if gte != 0 && !(gte == GTE_ZEROED && self.layout.zero_grain) {
                return Err(unsupported(format!(
                    "the streamOptimized VMDK grain at extent offset {rel} is already written \
                     (each grain can be written once)"
                )));
            }
            let at = start + out.len() as u64;
            push_grain(&mut out, *rel, blob);
            entries.push((*rel, at));
        }
        let end = start + out.len() as u64;
        if end > MAX_EXTENT_FILE {
            return Err(Error::NoMemory(
                "the VMDK extent file is full (grain offsets are 32-bit sectors)".into(),
            ));
        }
        for (rel, _) in &entries {
            let l1 = (rel / self.layout.gt_span()) as usize;
            if self.gd_entry(l1) == Some(0) {
                self.new_table(l1)?;
            }
        }
        // Tables may have been added at the end: the grains go after them.
        let start2 = self.end.load(Ordering::Acquire).next_multiple_of(SECTOR);
        let shift = start2 - start;
        // The data first: nothing references it until its table entry does.
        self.storage.write_at(&out, start2)?;
        self.end.store(end + shift, Ordering::Release);
        for (rel, at) in entries {
            self.set_entry(rel, ((at + shift) / SECTOR) as u32)?;
        }
        let dirty = self.cache.read().dirty.len();
        if dirty >= MAX_DIRTY_TABLES {
            self.flush_tables()?;
        }
        Ok(())
    }

    /// Make extent-relative `[rel, rel+len)` read as zeroes. Whole grains
    /// become zeroed-grain entries when the extent has them (as QEMU);
    /// unallocated grains with nothing below, and zeroed grains, already
    /// read as zeroes; the rest is written with zeroes.
    pub fn write_zeroes(&self, rel: u64, len: u64, guest_base: u64, below: &dyn Below) -> Result<()> {
        if self.layout.compressed {
            return self.zero_compressed(rel, len, below);
        }
        let _g = self.alloc.lock();
        let grain = self.layout.grain;
        let mut done = 0u64;
        while done < len {
            let pos = rel + done;
            let in_grain = pos % grain;
            let n = (grain - in_grain).min(len - done);
            let gte = self.entry(pos)?;
            let kind = self.classify(gte, in_grain)?;
            let has_table = self
                .gd_entry((pos / self.layout.gt_span()) as usize)
                .is_some_and(|s| s != 0);
            if matches!(kind, Mapped::Zero { .. }) || (kind == Mapped::Unallocated && !below.has_backing()) {
                // Already reads as zeroes.
            } else if self.layout.zero_grain && n == grain && has_table {
                self.set_entry(pos, GTE_ZEROED)?;
            } else {
                let z = try_zeroed(n as usize, "zeroes")?;
                self.write_locked(&z, pos, guest_base, below)?;
            }
            done += n;
        }
        let dirty = self.cache.read().dirty.len();
        if dirty >= MAX_DIRTY_TABLES {
            self.flush_tables()?;
        }
        Ok(())
    }

    /// Zeroes in a compressed extent: grains that read as zeroes already
    /// stay as they are; an unwritten grain over a backing file becomes a
    /// compressed grain of zeroes; the rest cannot be rewritten.
    fn zero_compressed(&self, rel: u64, len: u64, below: &dyn Below) -> Result<()> {
        let grain = self.layout.grain;
        let mut pos = rel;
        while pos < rel + len {
            let in_grain = pos % grain;
            let n = (grain - in_grain).min(rel + len - pos);
            let gte = self.entry(pos)?;
            let kind = self.classify(gte, in_grain)?;
            let reads_zero =
                matches!(kind, Mapped::Zero { .. }) || (kind == Mapped::Unallocated && !below.has_backing());
            if !reads_zero {
                let whole = in_grain == 0 && (n == grain || pos + n == self.layout.capacity);
                if kind != Mapped::Unallocated || !whole {
                    return Err(unsupported(format!(
                        "zeroes at extent offset {pos} would rewrite part of a streamOptimized VMDK grain"
                    )));
                }
                let z = self.compress_grain(&[])?;
                self.write_compressed(&[(pos, &z)])?;
            }
            pos += n;
        }
        Ok(())
    }

    fn write_locked(&self, buf: &[u8], rel: u64, guest_base: u64, below: &dyn Below) -> Result<()> {
        let grain = self.layout.grain;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = rel + done as u64;
            let in_grain = pos % grain;
            let n = ((grain - in_grain) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            let gte = self.entry(pos)?;
            match self.classify(gte, in_grain)? {
                Mapped::Data { offset, .. } => {
                    if u64::from(gte) * SECTOR < self.layout.overhead {
                        return Err(corrupt(format!("grain at sector {gte} overlaps the extent's metadata")));
                    }
                    self.storage.write_at(chunk, offset)?;
                }
                Mapped::Unallocated | Mapped::Zero { .. } => {
                    self.allocate(pos - in_grain, in_grain as usize, chunk, gte != 0, guest_base, below)?;
                }
                Mapped::Hole { .. } | Mapped::Encoded => unreachable!("sparse extents map no holes"),
            }
            done += n;
        }
        Ok(())
    }

    /// Point the table entry of the grain holding extent-relative `pos` at
    /// `value` in the cache (written back by `flush_tables`).
    fn set_entry(&self, pos: u64, value: u32) -> Result<()> {
        let l = &self.layout;
        let l1 = (pos / l.gt_span()) as usize;
        let l2 = ((pos % l.gt_span()) / l.grain) as usize;
        let t = self
            .table(l1)?
            .ok_or_else(|| unsupported("no grain table for this grain"))?;
        let mut c = self.cache.write();
        let slot = c.tables.entry(l1 as u32).or_insert(t);
        Arc::make_mut(slot)[l2] = value;
        c.dirty.insert(l1 as u32);
        Ok(())
    }

    /// Allocate the grain at extent-relative `grain_start`, fill it from
    /// `below` (or zeroes when it was a zeroed grain) around `chunk` at
    /// `skip`, write it, then point its table entry at it (dirty).
    fn allocate(
        &self,
        grain_start: u64,
        skip: usize,
        chunk: &[u8],
        zeroed: bool,
        guest_base: u64,
        below: &dyn Below,
    ) -> Result<()> {
        let l = &self.layout;
        let l1 = (grain_start / l.gt_span()) as usize;
        match self.gd_entry(l1) {
            None => return Err(corrupt(format!("grain directory index {l1} out of range"))),
            Some(0) => self.new_table(l1)?,
            Some(_) => {}
        }
        let grain = l.grain;
        let end = self.end.load(Ordering::Acquire);
        let at = end.div_ceil(grain) * grain;
        if at.checked_add(grain).is_none_or(|e| e > MAX_EXTENT_FILE) {
            return Err(Error::NoMemory(
                "the VMDK extent file is full (grain offsets are 32-bit sectors)".into(),
            ));
        }
        let mut g = try_zeroed(grain as usize, "a new grain")?;
        if !zeroed && below.has_backing() {
            below.read_below(&mut g, guest_base + grain_start)?;
        }
        g[skip..skip + chunk.len()].copy_from_slice(chunk);
        // The data first: nothing references it until its table entry does.
        self.storage.write_at(&g, at)?;
        self.end.store(at + grain, Ordering::Release);
        self.set_entry(grain_start, (at / SECTOR) as u32)
    }

    /// Give directory index `l1` a new, zeroed grain table (and a redundant
    /// one) at the end of the file. Crash order: the zeroed tables are
    /// written and made durable before the redundant directory entry, then
    /// the primary one, point at them; a crash before leaves unreferenced
    /// zeroes.
    fn new_table(&self, l1: usize) -> Result<()> {
        let gt_len = self.layout.gt_bytes().next_multiple_of(SECTOR);
        let copies = if self.rgd.is_some() { 2 } else { 1 };
        let at = self.end.load(Ordering::Acquire).next_multiple_of(SECTOR);
        let end = at + copies * gt_len;
        if end > MAX_EXTENT_FILE {
            return Err(Error::NoMemory(
                "the VMDK extent file is full (table offsets are 32-bit sectors)".into(),
            ));
        }
        let zero = try_zeroed(gt_len as usize, "a grain table")?;
        self.storage.write_at(&zero, at)?;
        if self.rgd.is_some() {
            self.storage.write_at(&zero, at + gt_len)?;
        }
        self.end.store(end, Ordering::Release);
        self.storage.flush()?;
        let entry_at = |dir: u64| dir + 4 * l1 as u64;
        if let (Some(r), Some(dir)) = (&self.rgd, self.layout.rgd_offset) {
            let s = ((at + gt_len) / SECTOR) as u32;
            self.storage.write_at(&s.to_le_bytes(), entry_at(dir))?;
            r[l1].store(s, Ordering::Release);
        }
        let s = (at / SECTOR) as u32;
        self.storage
            .write_at(&s.to_le_bytes(), entry_at(self.layout.gd_offset))?;
        self.gd[l1].store(s, Ordering::Release);
        Ok(())
    }

    /// Write dirty grain tables back: grains durable first, then the
    /// redundant tables, then the primary ones, then durable again.
    pub fn flush_tables(&self) -> Result<()> {
        let _one_at_a_time = self.flushing.lock();
        let dirty: Vec<(u32, Table)> = {
            let c = self.cache.read();
            c.dirty.iter().map(|k| (*k, c.tables[k].clone())).collect()
        };
        if dirty.is_empty() {
            return Ok(());
        }
        self.storage.flush()?;
        let bytes = |t: &Table| t.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
        if let Some(r) = &self.rgd {
            for (k, t) in &dirty {
                let at = u64::from(r[*k as usize].load(Ordering::Acquire)) * SECTOR;
                self.storage.write_at(&bytes(t), at)?;
            }
        }
        for (k, t) in &dirty {
            let at = u64::from(self.gd[*k as usize].load(Ordering::Acquire)) * SECTOR;
            self.storage.write_at(&bytes(t), at)?;
        }
        self.storage.flush()?;
        let mut c = self.cache.write();
        for (k, t) in &dirty {
            // Still the same table (no write raced in): clean.
            if c.tables.get(k).is_some_and(|cur| Arc::ptr_eq(cur, t)) {
                c.dirty.remove(k);
            }
        }
        Ok(())
    }
}
