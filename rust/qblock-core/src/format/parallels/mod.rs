//! parallels: Parallels Desktop / Virtuozzo (ploop) expanding images, as the
//! OpenVZ ploop sources and QEMU's docs/interop/parallels.txt describe them.
//!
//! Layout: a 64-byte little-endian header, the block allocation table (BAT:
//! one u32 per cluster of the virtual disk, 0 = not allocated) right after
//! it, then data clusters from `data_off` on. Two header magics:
//! "WithoutFreeSpace" (v1: BAT entries count sectors, only the low 32 bits
//! of the sector count are meaningful) and "WithouFreSpacExt" (v2: BAT
//! entries count clusters). A v2 image may carry a format extension cluster
//! (`ext_off`), which holds dirty bitmaps.
//!
//! Supported: both magics, read and write, discard of whole clusters (as
//! QEMU), create (v2, as QEMU creates),
//! the in-use flag handled as QEMU does: set while the image is open for
//! writing, cleared (and leaked space at the end truncated) on close, a dirty
//! image opened for writing is repaired that way. Images with a format
//! extension are read (the bitmaps are ignored) but refuse writes, since
//! new clusters could land on the extension's clusters.
//!
//! `bundle`: opening a `.hdd` bundle through its DiskDescriptor.xml.
//! `check`: `qemu-img check` for parallels.
//!
//! Reading takes no lock: the BAT is a vector of atomics and `map` returns
//! runs of consecutive clusters. Allocation is serialized by one mutex.

pub mod bundle;
mod check;

use super::bytes::{le32, le64};
use crate::backend::Storage;
use crate::driver::{Below, CheckReport, Driver, DriverInfo, HostFile, Mapped, Mapping, Repair};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::registry::{FormatEntry, OpenCtx};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Parallels,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
const VERSION: u32 = 2;
const HEADER_SIZE: u64 = 64;
const SECTOR: u64 = 512;
/// `inuse` value of an image open for writing (or not closed cleanly): "Ynot".
const INUSE_MAGIC: u32 = 0x746f_6e59;
/// First 8 bytes of a format extension cluster.
const EXT_MAGIC: u64 = 0xab23_4cef_23dc_ea87;
/// Largest sectors-per-cluster QEMU opens ("Too big cluster"): keeps a
/// cluster's byte size within a signed 32-bit value with room to spare.
const MAX_TRACKS: u32 = (i32::MAX / 513) as u32;
/// Largest BAT QEMU opens (its byte size must fit an int).
const MAX_BAT_ENTRIES: u32 = (i32::MAX / 4) as u32;
/// Largest disk in sectors: QEMU's BDRV_MAX_LENGTH (the byte size must fit
/// an int64 rounded down to a page).
const MAX_SECTORS: u64 = (i64::MAX as u64 & !4095) / SECTOR;
/// QEMU's create limit: at most 2^32 clusters.
const MAX_IMAGE_FACTOR: u64 = 1 << 32;
const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;
/// Geometry QEMU records in new images (not used for addressing).
const HEADS: u32 = 16;
const SECTORS_PER_TRACK: u32 = 32;

mod off {
    pub const VERSION: usize = 16;
    pub const HEADS: usize = 20;
    pub const CYLINDERS: usize = 24;
    pub const TRACKS: usize = 28;
    pub const BAT_ENTRIES: usize = 32;
    pub const NB_SECTORS: usize = 36;
    pub const INUSE: usize = 44;
    pub const DATA_OFF: usize = 48;
    pub const FLAGS: usize = 52;
    pub const EXT_OFF: usize = 56;
}

fn probe(h: &[u8], s: &dyn Storage) -> u32 {
    if (h.starts_with(MAGIC_V1) || h.starts_with(MAGIC_V2)) && le32(h, off::VERSION) == Some(VERSION) {
        100
    } else if h.starts_with(MAGIC_V1) || h.starts_with(MAGIC_V2) {
        // A damaged version field: still ours, so opening says "corrupt".
        50
    } else {
        bundle::probe(h, s)
    }
}

/// The checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub v2: bool,
    /// Sectors per cluster.
    pub tracks: u32,
    pub bat_entries: u32,
    pub size: u64,
    pub dirty: bool,
    /// Where data clusters may start, in bytes.
    pub data_start: u64,
    /// The format extension cluster, in bytes (0: none).
    pub ext_off: u64,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.tracks) * SECTOR
    }
    /// Bytes per BAT unit: a sector (v1) or a cluster (v2).
    pub fn unit(&self) -> u64 {
        if self.v2 {
            self.cluster_size()
        } else {
            SECTOR
        }
    }

    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_SIZE as usize || file_len < HEADER_SIZE {
            return Err(corrupt(format!(
                "the file ({file_len} bytes) is shorter than a parallels header"
            )));
        }
        let v2 = if b.starts_with(MAGIC_V2) {
            true
        } else if b.starts_with(MAGIC_V1) {
            false
        } else {
            return Err(corrupt("not a parallels image (bad magic)"));
        };
        let f = |at| le32(b, at).expect("within the header");
        let version = f(off::VERSION);
        if version != VERSION {
            return Err(corrupt(format!("parallels header version {version} is not 2")));
        }
        let tracks = f(off::TRACKS);
        if tracks == 0 {
            return Err(corrupt("parallels cluster size is zero (0 sectors per track)"));
        }
        if tracks > MAX_TRACKS {
            return Err(corrupt(format!(
                "parallels cluster of {tracks} sectors is too big (max {MAX_TRACKS})"
            )));
        }
        let bat_entries = f(off::BAT_ENTRIES);
        if bat_entries > MAX_BAT_ENTRIES {
            return Err(corrupt(format!("parallels BAT of {bat_entries} entries is too large")));
        }
        let bat_end = HEADER_SIZE + 4 * u64::from(bat_entries);
        if bat_end > file_len {
            return Err(corrupt(format!(
                "parallels BAT ({bat_entries} entries) extends past the end of the file ({file_len} bytes)"
            )));
        }
        let mut nb_sectors = le64(b, off::NB_SECTORS).expect("within the header");
        if !v2 {
            // Old images keep garbage in the high half (QEMU ignores it too).
            nb_sectors &= 0xffff_ffff;
        }
        let cluster_size = u64::from(tracks) * SECTOR;
        // The disk may extend past what the BAT covers (QEMU's old test
        // image fake.parallels does): that part reads as unallocated. The
        // size is still bounded as QEMU bounds every image (BDRV_MAX_LENGTH).
        if nb_sectors > MAX_SECTORS {
            return Err(corrupt(format!(
                "parallels disk of {nb_sectors} sectors is larger than any image may be"
            )));
        }
        let size = nb_sectors * SECTOR;
        let data_off = u64::from(f(off::DATA_OFF));
        let data_start = if data_off == 0 {
            bat_end.div_ceil(SECTOR) * SECTOR
        } else {
            let d = data_off * SECTOR;
            if d < bat_end {
                return Err(corrupt(format!(
                    "parallels data offset {d:#x} overlaps the BAT (ends {bat_end:#x})"
                )));
            }
            if d > file_len {
                return Err(corrupt(format!(
                    "parallels data offset {d:#x} is past the end of the file ({file_len} bytes)"
                )));
            }
            d
        };
        let ext_sectors = le64(b, off::EXT_OFF).expect("within the header");
        let ext_off = if ext_sectors == 0 {
            0
        } else {
            let e = ext_sectors
                .checked_mul(SECTOR)
                .filter(|&e| e >= data_start && e.checked_add(cluster_size).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    corrupt(format!(
                        "parallels format extension at sector {ext_sectors} is not inside the file's data area"
                    ))
                })?;
            e
        };
        let dirty = f(off::INUSE) == INUSE_MAGIC;
        Ok(Header {
            v2,
            tracks,
            bat_entries,
            size,
            dirty,
            data_start,
            ext_off,
        })
    }
}

struct Alloc {
    /// End of the last used cluster: where the next one goes.
    data_end: u64,
    /// The in-use flag is set on disk and must be cleared on close.
    marked: bool,
    closed: bool,
    /// The image was not closed cleanly and no check has repaired that yet
    /// (what a check reports, as QEMU's does, even once close would clear it).
    unclean: bool,
}

pub struct Parallels {
    storage: Arc<dyn Storage>,
    header: Header,
    bat: Vec<AtomicU32>,
    alloc: Mutex<Alloc>,
    read_only: bool,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let mut head = [0u8; 512];
    storage.read_at(&mut head, 0)?;
    if bundle::is_descriptor(&head) {
        return bundle::open(storage, ctx);
    }
    let p = Parallels::open(storage, ctx.read_only)?;
    p.note_dirty(ctx, ctx.location);
    Ok(Box::new(p))
}

impl Parallels {
    /// Log a dirty image (the file at `location`, an image or a bundle's
    /// extent) as it was opened; opened to be checked, the check says it.
    pub(crate) fn note_dirty(&self, ctx: &OpenCtx, location: &crate::Location) {
        if self.header.dirty && !ctx.check {
            crate::events::dirty_on_open(
                Format::Parallels,
                location,
                !ctx.read_only && self.header.ext_off == 0,
                "it was not closed cleanly (in-use flag set); read as it is",
                "it was not closed cleanly (in-use flag set): checked on open; leaked space is cut and the \
                 flag cleared at close",
            );
        }
    }

    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> Result<Parallels> {
        let file_len = storage.len()?;
        let mut hb = [0u8; HEADER_SIZE as usize];
        storage.read_at(&mut hb, 0)?;
        let header = Header::parse(&hb, file_len)?;
        let cluster = header.cluster_size();
        let n = header.bat_entries as usize;
        // Bounded by the file: the BAT was checked to lie inside it.
        let mut bat = Vec::new();
        bat.try_reserve_exact(n)
            .map_err(|_| crate::Error::NoMemory(format!("cannot allocate the parallels BAT ({n} entries)")))?;
        // The used entries, sorted below to find overlapping clusters: at
        // most as many as the BAT has, 4 bytes each like the BAT itself.
        let mut used: Vec<u32> = Vec::new();
        let mut chunk = vec![0u8; (n * 4).min(1 << 20)];
        let mut i = 0usize;
        while i < n {
            let k = (n - i).min(chunk.len() / 4);
            storage.read_at(&mut chunk[..4 * k], HEADER_SIZE + 4 * i as u64)?;
            for e in chunk[..4 * k].chunks_exact(4) {
                let e = u32::from_le_bytes(e.try_into().expect("4 bytes"));
                if e != 0 {
                    let host = u64::from(e) * header.unit();
                    if host < header.data_start {
                        return Err(corrupt(format!(
                            "parallels BAT entry {i} points to {host:#x}, inside the header and BAT (data starts {:#x})",
                            header.data_start
                        )));
                    }
                    if host >= file_len {
                        return Err(corrupt(format!(
                            "parallels BAT entry {i} points to {host:#x}, past the end of the file ({file_len} bytes)"
                        )));
                    }
                    used.try_reserve(1)
                        .map_err(|_| crate::Error::NoMemory("parallels BAT check".into()))?;
                    used.push(e);
                }
                bat.push(AtomicU32::new(e));
                i += 1;
            }
        }
        drop(chunk);
        // No two clusters may overlap (v1 entries count sectors, so clusters
        // need not be aligned; v2 entries count clusters, so only equal
        // entries overlap).
        used.sort_unstable();
        let unit = header.unit();
        for w in used.windows(2) {
            if (u64::from(w[1]) - u64::from(w[0])) * unit < cluster {
                return Err(corrupt(format!(
                    "parallels clusters overlap: two BAT entries point to {:#x} and {:#x}",
                    u64::from(w[0]) * unit,
                    u64::from(w[1]) * unit
                )));
            }
        }
        let mut data_end = used.last().map_or(header.data_start, |&e| {
            (u64::from(e) * unit + cluster).max(header.data_start)
        });
        if header.ext_off != 0 {
            let mut m = [0u8; 8];
            storage.read_at(&mut m, header.ext_off)?;
            if u64::from_le_bytes(m) != EXT_MAGIC {
                return Err(corrupt(format!(
                    "parallels format extension at {:#x} has a bad magic",
                    header.ext_off
                )));
            }
            // Nor may a data cluster overlap the extension cluster.
            let first_after = used.partition_point(|&e| u64::from(e) * unit + cluster <= header.ext_off);
            if let Some(&e) = used.get(first_after) {
                if u64::from(e) * unit < header.ext_off + cluster {
                    return Err(corrupt(format!(
                        "parallels data cluster at {:#x} overlaps the format extension at {:#x}",
                        u64::from(e) * unit,
                        header.ext_off
                    )));
                }
            }
            data_end = data_end.max(header.ext_off + cluster);
        }
        // A dirty image opened for writing is repaired as QEMU repairs it:
        // our checks above are its check; close truncates leaked space and
        // clears the flag.
        let marked = header.dirty && !read_only && header.ext_off == 0;
        let alloc = Mutex::new(Alloc {
            data_end,
            marked,
            closed: false,
            unclean: header.dirty,
        });
        Ok(Parallels {
            storage,
            header,
            bat,
            alloc,
            read_only,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn host_of(&self, entry: u32) -> u64 {
        u64::from(entry) * self.header.unit()
    }

    fn check_writable(&self) -> Result<()> {
        if self.header.ext_off != 0 {
            return Err(unsupported(
                "writing parallels images with a format extension (dirty bitmaps) is not supported",
            ));
        }
        Ok(())
    }

    /// Writes past the clusters the BAT can address have nowhere to go.
    fn check_bat_reach(&self, offset: u64, len: u64) -> Result<()> {
        let reach = self.bat.len() as u64 * self.header.cluster_size();
        if offset + len > reach {
            return Err(unsupported(format!(
                "cannot write past {reach} bytes: the parallels BAT addresses no more (the disk claims {})",
                self.header.size
            )));
        }
        Ok(())
    }

    /// Set the in-use flag on disk before the first change, as QEMU does
    /// when it opens an image for writing.
    fn mark_in_use(&self, st: &mut Alloc) -> Result<()> {
        if !st.marked {
            self.storage.write_at(&INUSE_MAGIC.to_le_bytes(), off::INUSE as u64)?;
            self.storage.flush()?;
            st.marked = true;
        }
        Ok(())
    }

    /// Allocate a cluster for guest cluster `ci` and write `buf` at `within`.
    ///
    /// Crash order: the data cluster first, past every used cluster (a crash
    /// leaves only leaked space at the end, which close or QEMU's repair
    /// truncates), then the BAT entry that makes it visible.
    fn allocate(&self, ci: usize, within: u64, buf: &[u8], below: &dyn Below) -> Result<()> {
        let mut st = self.alloc.lock();
        self.mark_in_use(&mut st)?;
        let e = self.bat[ci].load(Ordering::Acquire);
        if e != 0 {
            return self.storage.write_at(buf, self.host_of(e) + within);
        }
        let cluster = self.header.cluster_size();
        let unit = self.header.unit();
        let host = st.data_end.div_ceil(unit) * unit;
        let entry = u32::try_from(host / unit)
            .map_err(|_| unsupported("the parallels image is full: its BAT cannot address more clusters"))?;
        let file_len = self.storage.len()?;
        if within == 0 && buf.len() as u64 == cluster {
            self.storage.write_at(buf, host)?;
        } else if host >= file_len && !below.has_backing() {
            self.storage.write_at(buf, host + within)?;
            if self.storage.len()? < host + cluster {
                self.storage.set_len(host + cluster)?;
            }
        } else {
            let mut c = try_zeroed(cluster as usize, "a parallels cluster")?;
            below.read_below(&mut c, ci as u64 * cluster)?;
            c[within as usize..within as usize + buf.len()].copy_from_slice(buf);
            self.storage.write_at(&c, host)?;
        }
        self.storage
            .write_at(&entry.to_le_bytes(), HEADER_SIZE + 4 * ci as u64)?;
        self.bat[ci].store(entry, Ordering::Release);
        st.data_end = host + cluster;
        Ok(())
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, u64)> {
        let cs = self.header.cluster_size();
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let item = ((pos / cs) as usize, within, n);
            pos += n;
            Some(item)
        })
    }

    /// Clear the in-use flag and drop leaked space past the last cluster.
    fn close_clean(&self, st: &mut Alloc) -> Result<()> {
        if st.marked && !st.closed {
            self.storage.flush()?;
            // The end of the last cluster still referenced (discards may
            // have freed the ones after it): QEMU's check counts anything
            // past it as leaked.
            let cs = self.header.cluster_size();
            let used_end = self
                .bat
                .iter()
                .map(|e| e.load(Ordering::Acquire))
                .filter(|&e| e != 0)
                .map(|e| self.host_of(e) + cs)
                .max()
                .unwrap_or(0)
                .max(self.header.data_start);
            if self.storage.len()? > used_end {
                self.storage.set_len(used_end)?;
            }
            st.data_end = used_end;
            self.storage.write_at(&0u32.to_le_bytes(), off::INUSE as u64)?;
            self.storage.flush()?;
            st.marked = false;
        }
        Ok(())
    }
}

impl Driver for Parallels {
    fn format(&self) -> Format {
        Format::Parallels
    }

    fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_impl(repair)
    }
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let cs = self.header.cluster_size();
        let ci = offset / cs;
        let within = offset % cs;
        if ci >= self.bat.len() as u64 {
            // Past the BAT's reach: nothing is stored there.
            return Ok(Mapping {
                kind: Mapped::Unallocated,
                len,
            });
        }
        let ci = ci as usize;
        let first = self.bat[ci].load(Ordering::Acquire);
        let mut run = cs - within;
        let mut prev = self.host_of(first);
        let mut i = ci + 1;
        while run < len && i < self.bat.len() {
            let e = self.bat[i].load(Ordering::Acquire);
            let same = if first != 0 {
                e != 0 && self.host_of(e) == prev + cs
            } else {
                e == 0
            };
            if !same {
                break;
            }
            prev = self.host_of(e);
            run += cs;
            i += 1;
        }
        let kind = if first != 0 {
            Mapped::Data {
                file: 0,
                offset: self.host_of(first) + within,
            }
        } else {
            Mapped::Unallocated
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
        self.check_writable()?;
        {
            let mut st = self.alloc.lock();
            self.mark_in_use(&mut st)?;
        }
        self.check_bat_reach(offset, buf.len() as u64)?;
        let mut done = 0usize;
        for (ci, within, n) in self.pieces(offset, buf.len() as u64) {
            let chunk = &buf[done..done + n as usize];
            let e = self.bat[ci].load(Ordering::Acquire);
            if e != 0 {
                self.storage.write_at(chunk, self.host_of(e) + within)?;
            } else {
                self.allocate(ci, within, chunk, below)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.check_writable()?;
        self.check_bat_reach(offset, len)?;
        for (ci, within, n) in self.pieces(offset, len) {
            let e = self.bat[ci].load(Ordering::Acquire);
            if e != 0 {
                let mut st = self.alloc.lock();
                self.mark_in_use(&mut st)?;
                drop(st);
                self.storage.write_zeroes(self.host_of(e) + within, n)?;
            } else if below.has_backing() {
                let zero = try_zeroed(n as usize, "parallels zeroes")?;
                self.allocate(ci, within, &zero, below)?;
            }
        }
        Ok(())
    }

    /// As QEMU: every whole cluster inside the range is dropped from the
    /// BAT (it reads as zeroes afterwards) and its host space is punched;
    /// partial clusters keep their data.
    ///
    /// Crash order: the BAT entry is cleared before the space is freed, so a
    /// crash leaves at most an unreferenced cluster in the middle of the
    /// file, which QEMU's check accepts. Freed clusters are not handed out
    /// again in this session: a write racing with the discard could
    /// otherwise land in another guest cluster's data.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let cs = self.header.cluster_size();
        let first = offset.div_ceil(cs);
        let end = ((offset + len) / cs).min(self.bat.len() as u64);
        for ci in first..end {
            let ci = ci as usize;
            if self.bat[ci].load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut st = self.alloc.lock();
            self.mark_in_use(&mut st)?;
            let e = self.bat[ci].load(Ordering::Acquire);
            if e == 0 {
                continue;
            }
            self.storage
                .write_at(&0u32.to_le_bytes(), HEADER_SIZE + 4 * ci as u64)?;
            self.bat[ci].store(0, Ordering::Release);
            drop(st);
            // Only what the file holds (an old image's last cluster may be short).
            let host = self.host_of(e);
            let n = cs.min(self.storage.len()?.saturating_sub(host));
            if n > 0 {
                self.storage.write_zeroes(host, n)?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    /// As `qemu-img info` reports parallels: no cluster size, no
    /// format-specific data.
    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo {
            cluster_size: None,
            dirty: self.header.dirty,
            ..Default::default()
        })
    }

    fn close(&self) -> Result<()> {
        let mut st = self.alloc.lock();
        if self.read_only {
            return Ok(());
        }
        let r = self.close_clean(&mut st);
        st.closed = true;
        r
    }
}

impl Drop for Parallels {
    fn drop(&mut self) {
        // Best effort for an image dropped without close.
        let mut st = self.alloc.lock();
        if !self.read_only && !st.closed {
            let _ = self.close_clean(&mut st);
        }
    }
}

/// The first sector of a new v2 image; returns it and the data offset.
pub fn new_header(size: u64, cluster_size: u64) -> Result<(Vec<u8>, u64)> {
    if cluster_size == 0 || !cluster_size.is_multiple_of(SECTOR) {
        return Err(invalid(format!(
            "parallels cluster_size {cluster_size} is not a positive multiple of 512"
        )));
    }
    if cluster_size / SECTOR > u64::from(MAX_TRACKS) {
        return Err(invalid(format!("parallels cluster_size {cluster_size} is too large")));
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(invalid(format!("parallels size {size} is not a multiple of 512")));
    }
    if size >= MAX_IMAGE_FACTOR * cluster_size {
        return Err(invalid(format!(
            "parallels size {size} is too large for {cluster_size}-byte clusters"
        )));
    }
    let bat_entries = size.div_ceil(cluster_size);
    if bat_entries > u64::from(MAX_BAT_ENTRIES) {
        return Err(invalid(format!(
            "parallels size {size} needs too many clusters of {cluster_size} bytes"
        )));
    }
    let data_start = (HEADER_SIZE + 4 * bat_entries).div_ceil(cluster_size) * cluster_size;
    let data_sectors = u32::try_from(data_start / SECTOR)
        .map_err(|_| invalid(format!("parallels BAT for size {size} is too large")))?;
    let mut h = vec![0u8; SECTOR as usize];
    h[..16].copy_from_slice(MAGIC_V2);
    let put32 = |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut h, off::VERSION, VERSION);
    put32(&mut h, off::HEADS, HEADS);
    put32(
        &mut h,
        off::CYLINDERS,
        (size / SECTOR / u64::from(HEADS) / u64::from(SECTORS_PER_TRACK)) as u32,
    );
    put32(&mut h, off::TRACKS, (cluster_size / SECTOR) as u32);
    put32(&mut h, off::BAT_ENTRIES, bat_entries as u32);
    h[off::NB_SECTORS..off::NB_SECTORS + 8].copy_from_slice(&(size / SECTOR).to_le_bytes());
    put32(&mut h, off::DATA_OFF, data_sectors);
    put32(&mut h, off::FLAGS, 0);
    Ok((h, data_start))
}

pub fn create_on(storage: &dyn Storage, size: u64, cluster_size: u64) -> Result<()> {
    let (h, data_start) = new_header(size, cluster_size)?;
    storage.set_len(0)?;
    storage.write_at(&h, 0)?;
    // The BAT (all zero: nothing allocated) and padding up to the data.
    storage.set_len(data_start)?;
    storage.flush()
}

fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let cluster_size = opts.take_u64("cluster_size")?.unwrap_or(DEFAULT_CLUSTER_SIZE);
    opts.finish("parallels")?;
    new_header(size, cluster_size)?;
    let storage = location.create_storage()?;
    create_on(storage.as_ref(), size, cluster_size)
}

#[cfg(test)]
mod tests;
