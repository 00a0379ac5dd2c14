//! vpc: Connectix / Microsoft Virtual PC images (VHD), per Microsoft's
//! "Virtual Hard Disk Image Format Specification" (2006): the 512-byte
//! hard disk footer, the dynamic disk header, the block allocation table
//! (BAT) and the per-block sector bitmaps.
//!
//! Supported: fixed disks (footer only at the end), dynamic disks (footer
//! copy at offset 0, header, BAT, blocks of bitmap + data), read, write,
//! create both. The virtual size is the one QEMU reports: from the CHS
//! geometry, except for creators known to use the footer's current size
//! (Hyper-V, disk2vhd, XenServer, XenConverter, QEMU's `force_size`) and for
//! the maximal geometry. Sector bitmaps are honoured on read: a sector whose
//! bit is clear reads as zeroes, or from the parent (QEMU reads the block's
//! data area instead; writers zero-fill it, so both agree on real images).
//! The footer copy at 0 and the dynamic header must have sound checksums;
//! a bad copy at 0 falls back to a sound footer at the end (QEMU fails).
//! Writes allocate whole blocks (bitmap all set) where the end footer was,
//! then write the footer after them, then the BAT entry.
//!
//! Differencing disks (type 4): the parent is looked for beside the image
//! through the parent locators (relative and absolute Windows paths, Mac
//! URLs) and the Unicode parent name; one that exists must carry the UUID
//! the child records, and becomes the backing image (reads fall through
//! to it, writes copy from it). Without a parent found, the disk reads as
//! QEMU reads it (the child's blocks only, the rest zeroes) and writing is
//! `Unsupported`, naming the parent.
//!
//! Reading takes no lock: the BAT is a vector of atomics and the bitmap
//! state of each block is cached in another (a partially present block
//! briefly locks the one-entry bitmap cache); writes serialize on one mutex.

use super::bytes::{be16, be32, be64, tail512};
use crate::backend::Storage;
use crate::driver::{BackingRef, Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Error, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::reference::RefKind;
use crate::registry::{FormatEntry, OpenCtx};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Vpc,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_SIZE: u64 = 512;
const DYN_HEADER_SIZE: u64 = 1024;
const SECTOR: u64 = 512;

const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

/// A BAT entry for a block not allocated in this file.
const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// QEMU's cap on the virtual size: 2040 GiB (0xff000000 sectors), the
/// largest size Virtual PC and Hyper-V accept for VHD.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors); an
/// image carrying it declares its size in the footer's current size.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Cap on BAT entries: 2040 GiB in 32 KiB blocks. QEMU allows up to
/// INT_MAX/4 entries (2 GiB of table); no real writer uses blocks that small
/// for disks that large, and the cap bounds the table we hold (256 MiB).
const MAX_BAT_ENTRIES: u64 = 1 << 26;
/// The default (and only written) block size: 2 MiB, as Virtual PC and QEMU.
const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;

/// Bitmap state of an allocated block, cached per BAT entry.
const BITMAP_UNKNOWN: u8 = 0;
const BITMAP_FULL: u8 = 1;
const BITMAP_PARTIAL: u8 = 2;

fn probe(h: &[u8], s: &dyn Storage) -> u32 {
    // Fixed VHDs carry their footer only at the end.
    if h.starts_with(COOKIE) || tail512(s).is_some_and(|t| t.starts_with(COOKIE)) {
        100
    } else {
        0
    }
}

/// The VHD checksum: the one's complement of the byte sum, with the
/// checksum field itself (at `field`) counted as zero.
fn vhd_checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32));
    !sum
}

/// The hard disk footer's fields we use (spec section "Hard Disk Footer Format").
#[derive(Debug, Clone)]
struct Footer {
    raw: [u8; 512],
    data_offset: u64,
    creator_app: [u8; 4],
    current_size: u64,
    cyls: u16,
    heads: u8,
    secs: u8,
    disk_type: u32,
}

impl Footer {
    fn parse(raw: &[u8; 512]) -> Result<Footer> {
        if !raw.starts_with(COOKIE) {
            return Err(corrupt("VHD footer has no 'conectix' cookie"));
        }
        let stored = be32(raw, 64).unwrap_or(0);
        let computed = vhd_checksum(raw, 64);
        if stored != computed {
            return Err(corrupt(format!(
                "VHD footer checksum is wrong (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let disk_type = be32(raw, 60).unwrap_or(0);
        if !matches!(disk_type, TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING) {
            return Err(corrupt(format!(
                "VHD disk type {disk_type} is not fixed (2), dynamic (3) or differencing (4)"
            )));
        }
        Ok(Footer {
            raw: *raw,
            data_offset: be64(raw, 16).unwrap_or(0),
            creator_app: raw[28..32].try_into().unwrap_or_default(),
            current_size: be64(raw, 48).unwrap_or(0),
            cyls: be16(raw, 56).unwrap_or(0),
            heads: raw[58],
            secs: raw[59],
            disk_type,
        })
    }

    /// The virtual size QEMU reports. Virtual PC sizes a disk by its CHS
    /// geometry (the footer's size is usually larger); Hyper-V, disk2vhd,
    /// XenServer, XenConverter and QEMU with force_size ('qem2') use the
    /// current size, and so does any image with the maximal geometry.
    fn virtual_size(&self) -> Result<u64> {
        let chs = self.cyls as u64 * self.heads as u64 * self.secs as u64;
        let trusts_size = matches!(&self.creator_app, b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
        let sectors = if trusts_size || chs == MAX_GEOMETRY {
            self.current_size / SECTOR
        } else {
            chs
        };
        if sectors > MAX_SECTORS {
            return Err(corrupt(format!(
                "VHD virtual size of {sectors} sectors is larger than 2040 GiB"
            )));
        }
        Ok(sectors * SECTOR)
    }
}

/// The dynamic disk header (spec section "Dynamic Disk Header Format").
#[derive(Debug, Clone)]
struct DynHeader {
    table_offset: u64,
    max_table_entries: u32,
    block_size: u32,
    parent_name: String,
    parent_uuid: [u8; 16],
    /// Parent locators: platform code, data length, data offset.
    locators: Vec<([u8; 4], u32, u64)>,
}

impl DynHeader {
    fn parse(raw: &[u8]) -> Result<DynHeader> {
        if !raw.starts_with(DYN_COOKIE) {
            return Err(corrupt("VHD dynamic disk header has no 'cxsparse' cookie"));
        }
        let stored = be32(raw, 36).unwrap_or(0);
        let computed = vhd_checksum(&raw[..DYN_HEADER_SIZE as usize], 36);
        if stored != computed {
            return Err(corrupt(format!(
                "VHD dynamic disk header checksum is wrong (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let name: Vec<u16> = raw[64..64 + 512]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        Ok(DynHeader {
            table_offset: be64(raw, 16).unwrap_or(0),
            max_table_entries: be32(raw, 28).unwrap_or(0),
            block_size: be32(raw, 32).unwrap_or(0),
            parent_name: String::from_utf16_lossy(&name[..end]),
            parent_uuid: raw[40..56].try_into().unwrap_or_default(),
            locators: (0..8)
                .map(|i| 576 + 24 * i)
                .filter(|&at| raw[at..at + 4] != [0; 4])
                .map(|at| {
                    let code = raw[at..at + 4].try_into().unwrap_or_default();
                    (code, be32(raw, at + 8).unwrap_or(0), be64(raw, at + 16).unwrap_or(0))
                })
                .collect(),
        })
    }
}

/// A dynamic (or differencing) disk's allocation state.
struct Dynamic {
    block_size: u64,
    /// Sector bitmap bytes before each block's data, rounded to a sector.
    bitmap_size: u64,
    bat_offset: u64,
    /// BAT entries (sector numbers of each block's bitmap), host order.
    bat: Vec<AtomicU32>,
    /// BITMAP_* per entry: whether every sector of the block is present.
    bitmap_state: Vec<AtomicU8>,
    /// The last partial bitmap read (BAT index, bytes): reading a block
    /// whose sectors alternate maps it a few sectors at a time, and must
    /// not read its bitmap each time. Locked only for partial blocks.
    last_bitmap: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
    /// Where the next block goes (the footer sits there): taken by writers.
    next_free: Mutex<u64>,
    /// The parent of a differencing disk, as named in it.
    parent: Option<String>,
    /// The parent found beside the image (its UUID checked): unallocated
    /// ranges read from it. A differencing disk without one reads as QEMU
    /// reads it (zeroes) and refuses writes.
    backing: Option<BackingRef>,
}

pub struct Vpc {
    storage: Arc<dyn Storage>,
    footer: Footer,
    size: u64,
    dynamic: Option<Dynamic>,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    Ok(Box::new(Vpc::open_at(storage, Some(ctx))?))
}

impl Vpc {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Vpc> {
        Self::open_at(storage, None)
    }

    /// Open; `ctx` (where the image is, what it may name) lets a
    /// differencing disk find its parent.
    pub fn open_at(storage: Arc<dyn Storage>, ctx: Option<&OpenCtx>) -> Result<Vpc> {
        let file_len = storage.len()?;
        if file_len < FOOTER_SIZE {
            return Err(corrupt(format!(
                "file of {file_len} bytes is too small for a VHD footer"
            )));
        }
        // As QEMU: the copy at offset 0 when there is one (dynamic disks),
        // else the footer at the end, which must then be a fixed disk's.
        // Unlike QEMU, a copy at 0 with a bad checksum falls back to the
        // footer at the end when that one is sound and not a fixed disk's.
        let mut raw = [0u8; 512];
        storage.read_at(&mut raw, 0)?;
        let at_start = raw.starts_with(COOKIE);
        if !at_start {
            storage.read_at(&mut raw, file_len - FOOTER_SIZE)?;
        }
        let footer = match Footer::parse(&raw) {
            Ok(f) => f,
            Err(first) if at_start && be32(&raw, 64) != Some(vhd_checksum(&raw, 64)) => {
                let Some(end) = tail512(storage.as_ref()) else {
                    return Err(first);
                };
                match Footer::parse(&end) {
                    Ok(f) if f.disk_type != TYPE_FIXED && f.data_offset == be64(&raw, 16).unwrap_or(0) => f,
                    _ => return Err(corrupt(format!("{first} (and the footer at the end is no better)"))),
                }
            }
            Err(e) => return Err(e),
        };
        if !at_start && footer.disk_type != TYPE_FIXED {
            return Err(corrupt(format!(
                "VHD with only an end footer must be a fixed disk, not type {}",
                footer.disk_type
            )));
        }
        let size = footer.virtual_size()?;
        if footer.disk_type == TYPE_FIXED {
            // The data area precedes the footer; a size reaching into or past
            // the footer would make writes overwrite it.
            if at_start {
                // QEMU would serve the footer copy as guest data; no writer makes these.
                return Err(unsupported("fixed VHD with a footer copy at offset 0"));
            }
            if size > file_len - FOOTER_SIZE {
                return Err(corrupt(format!(
                    "fixed VHD of {size} bytes does not fit in a file of {file_len} bytes before its footer"
                )));
            }
            return Ok(Vpc {
                storage,
                footer,
                size,
                dynamic: None,
            });
        }
        let dynamic = Self::open_dynamic(storage.as_ref(), &footer, size, file_len, ctx)?;
        Ok(Vpc {
            storage,
            footer,
            size,
            dynamic: Some(dynamic),
        })
    }

    fn open_dynamic(
        storage: &dyn Storage,
        footer: &Footer,
        size: u64,
        file_len: u64,
        ctx: Option<&OpenCtx>,
    ) -> Result<Dynamic> {
        let hdr_off = footer.data_offset;
        if hdr_off < FOOTER_SIZE || hdr_off.checked_add(DYN_HEADER_SIZE).is_none_or(|e| e > file_len) {
            return Err(corrupt(format!(
                "VHD dynamic disk header offset {hdr_off} is outside the file"
            )));
        }
        let mut raw = [0u8; DYN_HEADER_SIZE as usize];
        storage.read_at(&mut raw, hdr_off)?;
        let hdr = DynHeader::parse(&raw)?;
        let bs = hdr.block_size as u64;
        if !bs.is_power_of_two() || bs < SECTOR {
            return Err(corrupt(format!(
                "VHD block size {bs} is not a power of two of at least 512"
            )));
        }
        let bitmap_size = (bs / (8 * SECTOR)).div_ceil(SECTOR) * SECTOR;
        let entries = hdr.max_table_entries as u64;
        if entries > MAX_BAT_ENTRIES {
            return Err(corrupt(format!(
                "VHD max table entries {entries} is larger than {MAX_BAT_ENTRIES}"
            )));
        }
        if entries * bs < size {
            return Err(corrupt(format!(
                "VHD BAT of {entries} blocks of {bs} bytes does not cover {size} bytes"
            )));
        }
        let bat_off = hdr.table_offset;
        let bat_bytes = entries * 4;
        let bat_end = bat_off.checked_add(bat_bytes).filter(|&e| e <= file_len);
        let Some(bat_end) = bat_end else {
            return Err(corrupt(format!(
                "VHD BAT at {bat_off} of {entries} entries is outside the file"
            )));
        };
        if bat_off < FOOTER_SIZE || overlaps(bat_off, bat_bytes, hdr_off, DYN_HEADER_SIZE) {
            return Err(corrupt(format!(
                "VHD BAT at {bat_off} overlaps the footer copy or the dynamic header"
            )));
        }
        // Parent locator data (differencing disks): inside the file, clear of
        // the BAT and the header; blocks must stay clear of it too.
        let mut locators = Vec::new();
        if footer.disk_type == TYPE_DIFFERENCING {
            for &(code, len, off) in &hdr.locators {
                if len as u64 > MAX_LOCATOR
                    || off < FOOTER_SIZE
                    || off.checked_add(len as u64).is_none_or(|e| e > file_len)
                    || overlaps(off, len as u64, hdr_off, DYN_HEADER_SIZE)
                    || overlaps(off, len as u64, bat_off, bat_bytes)
                {
                    return Err(corrupt(format!(
                        "VHD parent locator at {off} of {len} bytes is misplaced"
                    )));
                }
                let mut data = vec![0u8; len as usize];
                storage.read_at(&mut data, off)?;
                locators.push((code, off, len as u64, data));
            }
        }
        // Read in 1 MiB pieces: the BAT (up to 256 MiB) is held once.
        let n = (bat_bytes / 4) as usize;
        let mut bat: Vec<u32> = Vec::new();
        bat.try_reserve_exact(n)
            .map_err(|_| Error::NoMemory(format!("cannot allocate the VHD BAT ({n} entries)")))?;
        let mut piece = try_zeroed((n * 4).min(1 << 20), "a piece of the VHD BAT")?;
        while bat.len() < n {
            let k = (n - bat.len()).min(piece.len() / 4);
            storage.read_at(&mut piece[..4 * k], bat_off + 4 * bat.len() as u64)?;
            bat.extend(
                piece[..4 * k]
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        drop(piece);
        // Every allocated block inside the file, clear of the metadata and
        // of every other block; the next block goes after the last of all.
        let block_len = bitmap_size + bs;
        let mut next_free = (bat_end.div_ceil(SECTOR) * SECTOR).max(hdr_off + DYN_HEADER_SIZE);
        // Blocks that do not overlap each take block_len bytes of the file:
        // more allocated entries than that (plus one, which the checks below
        // name as truncated) overlap somewhere, and are refused before a
        // list of them (16 bytes each) outgrows the file.
        let allocated = bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64;
        let max_blocks = file_len / block_len + 1;
        if allocated > max_blocks {
            return Err(corrupt(format!(
                "VHD BAT allocates {allocated} blocks of {block_len} bytes, more than the {file_len}-byte file holds without overlap"
            )));
        }
        let mut starts = Vec::new();
        starts
            .try_reserve_exact(allocated as usize)
            .map_err(|_| Error::NoMemory("cannot allocate the VHD block list".into()))?;
        for (i, &e) in bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = e as u64 * SECTOR;
            let end = start + block_len;
            if end > file_len {
                return Err(corrupt(format!(
                    "VHD block {i} at {start} ends past the end of the file ({file_len} bytes): the image is truncated"
                )));
            }
            if start < FOOTER_SIZE
                || overlaps(start, block_len, hdr_off, DYN_HEADER_SIZE)
                || overlaps(start, block_len, bat_off, bat_bytes)
                || locators.iter().any(|l| overlaps(start, block_len, l.1, l.2))
            {
                return Err(corrupt(format!(
                    "VHD block {i} at {start} overlaps the image's metadata"
                )));
            }
            next_free = next_free.max(end);
            starts.push((start, i));
        }
        starts.sort_unstable();
        for w in starts.windows(2) {
            if w[1].0 < w[0].0 + block_len {
                return Err(corrupt(format!(
                    "VHD blocks {} and {} overlap at {}",
                    w[0].1, w[1].1, w[1].0
                )));
            }
        }
        drop(starts);
        for l in &locators {
            next_free = next_free.max((l.1 + l.2).div_ceil(SECTOR) * SECTOR);
        }
        let parent = (footer.disk_type == TYPE_DIFFERENCING).then(|| hdr.parent_name.clone());
        let backing = match (&parent, ctx) {
            (Some(_), Some(ctx)) => find_parent(ctx, &hdr, &locators)?,
            _ => None,
        };
        Ok(Dynamic {
            block_size: bs,
            bitmap_size,
            bat_offset: bat_off,
            bitmap_state: bat.iter().map(|_| AtomicU8::new(BITMAP_UNKNOWN)).collect(),
            bat: bat.into_iter().map(AtomicU32::new).collect(),
            next_free: Mutex::new(next_free),
            last_bitmap: Mutex::new(None),
            parent,
            backing,
        })
    }

    /// Whether every sector of allocated block `idx` (bitmap at `bitmap_at`)
    /// is present, reading and caching its bitmap the first time.
    fn bitmap_full(&self, d: &Dynamic, idx: usize, bitmap_at: u64) -> Result<bool> {
        match d.bitmap_state[idx].load(Ordering::Acquire) {
            BITMAP_FULL => return Ok(true),
            BITMAP_PARTIAL => return Ok(false),
            _ => {}
        }
        let bm = self.read_bitmap(d, bitmap_at)?;
        let sectors = (d.block_size / SECTOR) as usize;
        let full = (0..sectors).all(|s| bit(&bm, s));
        d.bitmap_state[idx].store(if full { BITMAP_FULL } else { BITMAP_PARTIAL }, Ordering::Release);
        Ok(full)
    }

    fn read_bitmap(&self, d: &Dynamic, at: u64) -> Result<Vec<u8>> {
        let mut bm = try_zeroed(d.bitmap_size as usize, "a VHD sector bitmap")?;
        self.storage.read_at(&mut bm, at)?;
        Ok(bm)
    }

    fn map_dynamic(&self, d: &Dynamic, offset: u64, len: u64) -> Result<Mapping> {
        let bs = d.block_size;
        let idx = (offset / bs) as usize;
        let in_block = offset % bs;
        let entry = d.bat[idx].load(Ordering::Acquire);
        if entry == UNALLOCATED {
            // Merge the following unallocated blocks into one run.
            let mut run = (bs - in_block).min(len);
            let mut next = idx + 1;
            while run < len && next < d.bat.len() && d.bat[next].load(Ordering::Acquire) == UNALLOCATED {
                run = (run + bs).min(len);
                next += 1;
            }
            return Ok(Mapping {
                kind: d.absent(),
                len: run,
            });
        }
        let run = (bs - in_block).min(len);
        let bitmap_at = entry as u64 * SECTOR;
        let data_at = bitmap_at + d.bitmap_size;
        if self.bitmap_full(d, idx, bitmap_at)? {
            return Ok(Mapping {
                kind: Mapped::Data {
                    file: 0,
                    offset: data_at + in_block,
                },
                len: run,
            });
        }
        // A partial block: a run of sectors sharing the first one's bit.
        let cached = d
            .last_bitmap
            .lock()
            .as_ref()
            .filter(|(i, _)| *i == idx)
            .map(|(_, b)| b.clone());
        let bm = match cached {
            Some(b) => b,
            None => {
                let b = Arc::new(self.read_bitmap(d, bitmap_at)?);
                *d.last_bitmap.lock() = Some((idx, b.clone()));
                b
            }
        };
        let first = (in_block / SECTOR) as usize;
        let present = bit(&bm, first);
        let end_sector = (in_block + run).div_ceil(SECTOR) as usize;
        let mut s = first + 1;
        while s < end_sector && bit(&bm, s) == present {
            s += 1;
        }
        let n = (s as u64 * SECTOR - in_block).min(run);
        let kind = if present {
            Mapped::Data {
                file: 0,
                offset: data_at + in_block,
            }
        } else {
            d.absent()
        };
        Ok(Mapping { kind, len: n })
    }

    /// Write within one block of a dynamic disk, allocating it if needed.
    /// The caller holds `next_free`.
    fn write_block(&self, d: &Dynamic, next_free: &mut u64, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let bs = d.block_size;
        let idx = (offset / bs) as usize;
        let in_block = offset % bs;
        let entry = d.bat[idx].load(Ordering::Acquire);
        if entry != UNALLOCATED {
            let bitmap_at = entry as u64 * SECTOR;
            let data_at = bitmap_at + d.bitmap_size;
            if !self.bitmap_full(d, idx, bitmap_at)? {
                // Crash order: fill the absent sectors' data with what they
                // read as (the parent's bytes, or zeroes), make it durable,
                // then mark every sector present.
                let bm = self.read_bitmap(d, bitmap_at)?;
                let sectors = (bs / SECTOR) as usize;
                let mut s = 0;
                while s < sectors {
                    if bit(&bm, s) {
                        s += 1;
                        continue;
                    }
                    let start = s;
                    while s < sectors && !bit(&bm, s) {
                        s += 1;
                    }
                    let (at, n) = (start as u64 * SECTOR, (s - start) as u64 * SECTOR);
                    if d.backing.is_some() {
                        let mut fill = try_zeroed(n as usize, "a VHD copy-on-write buffer")?;
                        below.read_below(&mut fill, idx as u64 * bs + at)?;
                        self.storage.write_at(&fill, data_at + at)?;
                    } else {
                        self.storage.write_zeroes(data_at + at, n)?;
                    }
                }
                self.storage.flush()?;
                self.storage.write_at(&vec![0xff; d.bitmap_size as usize], bitmap_at)?;
                d.bitmap_state[idx].store(BITMAP_FULL, Ordering::Release);
                *d.last_bitmap.lock() = None;
            }
            return self.storage.write_at(buf, data_at + in_block);
        }
        // Allocate at the end, where the footer is. Crash order: bitmap and
        // data first, then the footer after them, flushed; only then the BAT
        // entry points at the block. A crash before the BAT write leaves an
        // unreferenced block (and the footer copy at offset 0 still opens
        // the image); never a BAT entry pointing at unwritten bytes.
        let bitmap_at = *next_free;
        let data_at = bitmap_at + d.bitmap_size;
        let block_end = data_at + bs;
        let sector = bitmap_at / SECTOR;
        if sector >= UNALLOCATED as u64 {
            return Err(unsupported(
                "the VHD file is full: BAT entries cannot address past 2 TiB",
            ));
        }
        let file_len = self.storage.len()?;
        if file_len > data_at {
            // Old footer or trailing bytes inside the new block: zero them.
            self.storage.write_zeroes(data_at, file_len.min(block_end) - data_at)?;
        }
        self.storage.write_at(&vec![0xff; d.bitmap_size as usize], bitmap_at)?;
        if d.backing.is_some() && buf.len() as u64 != bs {
            // Copy-on-write: the rest of the block comes from the parent.
            let mut block = try_zeroed(bs as usize, "a VHD copy-on-write buffer")?;
            below.read_below(&mut block, idx as u64 * bs)?;
            block[in_block as usize..in_block as usize + buf.len()].copy_from_slice(buf);
            self.storage.write_at(&block, data_at)?;
        } else {
            self.storage.write_at(buf, data_at + in_block)?;
        }
        self.storage.write_at(&self.footer.raw, block_end)?;
        self.storage.flush()?;
        self.storage
            .write_at(&(sector as u32).to_be_bytes(), d.bat_offset + 4 * idx as u64)?;
        d.bitmap_state[idx].store(BITMAP_FULL, Ordering::Release);
        d.bat[idx].store(sector as u32, Ordering::Release);
        *next_free = block_end;
        Ok(())
    }
}

impl Dynamic {
    /// How a range this file does not hold maps: to the parent when there
    /// is one, else zeroes (allocated, as QEMU reports them).
    fn absent(&self) -> Mapped {
        if self.backing.is_some() {
            Mapped::Unallocated
        } else {
            Mapped::Zero { host: None }
        }
    }
}

/// Largest parent locator we read (a path in UTF-16: a few hundred bytes;
/// writers reserve a sector or a few).
const MAX_LOCATOR: u64 = 64 * 1024;

/// The parent of a differencing disk, from its locators (relative Windows
/// path, absolute Windows path, Mac URL) or its Unicode name, tried beside
/// the image: the first one that exists and is a VHD whose UUID matches.
/// None when no candidate exists (the disk then reads as QEMU reads it).
fn find_parent(
    ctx: &OpenCtx,
    hdr: &DynHeader,
    locators: &[([u8; 4], u64, u64, Vec<u8>)],
) -> Result<Option<BackingRef>> {
    let utf16le = |b: &[u8]| {
        let u: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        String::from_utf16_lossy(&u).trim_end_matches('\0').to_string()
    };
    let mut names = Vec::new();
    for code in [b"W2ru", b"W2ku", b"MacX"] {
        for (c, _, _, data) in locators.iter().filter(|l| &l.0 == code) {
            let name = if c == b"MacX" {
                String::from_utf8_lossy(data)
                    .trim_end_matches('\0')
                    .trim_start_matches("file://")
                    .to_string()
            } else {
                utf16le(data)
            };
            names.push(name.replace('\\', "/"));
        }
    }
    names.push(hdr.parent_name.replace('\\', "/"));
    // Absolute Windows paths rarely exist here: try their last component too.
    let bases: Vec<String> = names
        .iter()
        .filter_map(|n| n.rsplit('/').next().map(str::to_string))
        .collect();
    names.extend(bases);
    let mut refused = None;
    for name in names {
        let name = name.trim_start_matches("./").to_string();
        if name.is_empty() || name.contains(':') {
            continue;
        }
        let loc = ctx.location.relative(&name);
        let Location::File(path) = &loc else {
            continue;
        };
        // A candidate the open's rules refuse is never opened; the refusal
        // stands if no allowed candidate is the parent.
        if let Err(e) = ctx.admit(RefKind::ParentLocator, &name, &loc) {
            refused.get_or_insert(e);
            continue;
        }
        if ctx.inspecting() || !path.is_file() {
            continue;
        }
        let parent = loc.open_storage(true)?;
        let mut f = [0u8; 512];
        parent.read_at(&mut f, 0)?;
        if !f.starts_with(COOKIE) {
            match tail512(parent.as_ref()) {
                Some(t) => f = t,
                None => continue,
            }
        }
        if f.starts_with(COOKIE) && f[68..84] == hdr.parent_uuid {
            return Ok(Some(BackingRef {
                filename: name,
                format: Some("vpc".into()),
            }));
        }
        return Err(corrupt(format!(
            "the VHD parent '{name}' has another UUID than the one recorded in the child"
        )));
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Sector `s`'s bit in a VHD sector bitmap: most significant bit first.
fn bit(bm: &[u8], s: usize) -> bool {
    bm.get(s / 8).is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Driver for Vpc {
    fn format(&self) -> Format {
        Format::Vpc
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        // A fixed disk is data throughout; QEMU's map says so too (it adds
        // `zero` over holes of the file, which no mapping kind expresses).
        match &self.dynamic {
            None => Ok(Mapping {
                kind: Mapped::Data { file: 0, offset },
                len,
            }),
            Some(d) => self.map_dynamic(d, offset, len),
        }
    }
    fn backing(&self) -> Option<BackingRef> {
        self.dynamic.as_ref().and_then(|d| d.backing.clone())
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.storage.write_at(buf, offset);
        };
        if let (Some(p), None) = (&d.parent, &d.backing) {
            return Err(unsupported(format!(
                "writing a differencing VHD is not supported while its parent '{p}' is not found"
            )));
        }
        let mut next_free = d.next_free.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((d.block_size - pos % d.block_size) as usize).min(buf.len() - done);
            self.write_block(d, &mut next_free, &buf[done..done + n], pos, below)?;
            done += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.storage.write_zeroes(offset, len);
        };
        // Unallocated blocks already read as zeroes (without a parent): write
        // only allocated ones.
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (d.block_size - pos % d.block_size).min(end - pos);
            if d.backing.is_some() || d.bat[(pos / d.block_size) as usize].load(Ordering::Acquire) != UNALLOCATED {
                let zero = vec![0u8; n as usize];
                self.write_at(&zero, pos, below)?;
            }
            pos += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }
    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo {
            cluster_size: self.dynamic.as_ref().map(|d| d.block_size),
            ..Default::default()
        })
    }
}

// ---------------------------------------------------------------- create

/// The CHS geometry the VHD specification derives from a sector count (its
/// appendix algorithm, as QEMU implements it); it may round down.
fn geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_GEOMETRY);
    let (mut spt, mut heads, mut cth): (u64, u64, u64);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        spt = 17;
        cth = total / spt;
        heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The size and geometry of a new image of (at least) `size` bytes, as
/// `qemu-img create` makes it: rounded up to a sector, then up to the next
/// CHS geometry unless `force_size` keeps it exact.
pub fn plan_size(size: u64, force_size: bool) -> Result<(u64, (u16, u8, u8))> {
    let size = size.div_ceil(SECTOR) * SECTOR;
    let geo = if force_size {
        (65535, 16, 255)
    } else {
        let want = (size / SECTOR).min(MAX_GEOMETRY);
        let mut i = 0;
        let mut g = (0u16, 0u8, 0u8);
        while want > g.0 as u64 * g.1 as u64 * g.2 as u64 {
            g = geometry(want + i);
            i += 1;
        }
        g
    };
    let chs = geo.0 as u64 * geo.1 as u64 * geo.2 as u64;
    let sectors = if chs == MAX_GEOMETRY { size / SECTOR } else { chs };
    if sectors > MAX_SECTORS {
        return Err(invalid(format!("a VHD image is at most 2040 GiB, not {size} bytes")));
    }
    Ok((sectors * SECTOR, geo))
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut u);
    }
    if u == [0; 16] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u[..16].copy_from_slice(&(t.as_nanos() ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Seconds since 2000-01-01 00:00:00 UTC, the VHD timestamp epoch.
fn vhd_timestamp() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    now.saturating_sub(946_684_800) as u32
}

fn build_footer(size: u64, geo: (u16, u8, u8), disk_type: u32, force_size: bool) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit, always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if disk_type == TYPE_FIXED { u64::MAX } else { FOOTER_SIZE };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&vhd_timestamp().to_be_bytes());
    // 'qem2' tells readers (QEMU, us) to trust the current size over CHS.
    f[28..32].copy_from_slice(if force_size { b"qem2" } else { b"qemu" });
    f[32..34].copy_from_slice(&5u16.to_be_bytes()); // Virtual PC 2007's version
    f[34..36].copy_from_slice(&3u16.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..58].copy_from_slice(&geo.0.to_be_bytes());
    f[58] = geo.1;
    f[59] = geo.2;
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&random_uuid());
    let sum = vhd_checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let subformat = opts.take_str("subformat")?.unwrap_or_else(|| "dynamic".into());
    let force_size = opts.take_bool("force_size")?.unwrap_or(false);
    opts.finish("vpc")?;
    let fixed = match subformat.as_str() {
        "dynamic" => false,
        "fixed" => true,
        other => {
            return Err(invalid(format!(
                "vpc subformat must be dynamic or fixed, not '{other}'"
            )))
        }
    };
    let plan = plan_size(size, force_size)?;
    let storage = location.create_storage()?;
    write_new(storage.as_ref(), plan, fixed, force_size)?;
    storage.flush()
}

/// Lay out a new image of `plan` (size, geometry) on empty storage.
fn write_new(storage: &dyn Storage, (size, geo): (u64, (u16, u8, u8)), fixed: bool, force_size: bool) -> Result<()> {
    if fixed {
        let footer = build_footer(size, geo, TYPE_FIXED, force_size);
        storage.set_len(size + FOOTER_SIZE)?;
        return storage.write_at(&footer, size);
    }
    // Footer copy, dynamic header at 512, BAT at 1536, footer after the BAT.
    let footer = build_footer(size, geo, TYPE_DYNAMIC, force_size);
    let entries = size.div_ceil(DEFAULT_BLOCK_SIZE);
    let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let bat_off = FOOTER_SIZE + DYN_HEADER_SIZE;
    let mut h = [0u8; DYN_HEADER_SIZE as usize];
    h[0..8].copy_from_slice(DYN_COOKIE);
    // The spec says 0xFFFFFFFF for "no next structure"; Microsoft's tools
    // expect all 64 bits set.
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&bat_off.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(DEFAULT_BLOCK_SIZE as u32).to_be_bytes());
    let sum = vhd_checksum(&h, 36);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    storage.write_at(&footer, 0)?;
    storage.write_at(&h, FOOTER_SIZE)?;
    let mut bat = try_zeroed(bat_bytes as usize, "the VHD BAT")?;
    bat.fill(0xff);
    storage.write_at(&bat, bat_off)?;
    storage.write_at(&footer, bat_off + bat_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;

    fn dynamic_image(size: u64) -> Vec<u8> {
        let s = MemoryStorage::new(Vec::new(), false);
        write_new(&s, plan_size(size, true).unwrap(), false, true).unwrap();
        s.into_inner()
    }

    fn open_bytes(b: Vec<u8>) -> Result<Vpc> {
        Vpc::open(Arc::new(MemoryStorage::new(b, false)))
    }

    fn refix_footer(b: &mut [u8], at: usize) {
        b[at + 64..at + 68].fill(0);
        let sum = vhd_checksum(&b[at..at + 512], 64);
        b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
    }
    fn refix_header(b: &mut [u8]) {
        b[512 + 36..512 + 40].fill(0);
        let sum = vhd_checksum(&b[512..1536], 36);
        b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    }

    fn err(b: Vec<u8>) -> String {
        match open_bytes(b) {
            Err(Error::CorruptImage(m)) => m,
            Err(e) => panic!("expected CorruptImage, got {e:?}"),
            Ok(_) => panic!("expected CorruptImage, opened"),
        }
    }

    #[test]
    fn geometry_matches_qemu_rounding() {
        // 10 MiB is no CHS size: rounded up to the next geometry, as qemu-img does.
        let (s, g) = plan_size(10 << 20, false).unwrap();
        assert_eq!(s, 10_514_432);
        assert_eq!(s, g.0 as u64 * g.1 as u64 * g.2 as u64 * 512);
        let (s, g) = plan_size(1 << 30, false).unwrap();
        assert!(s >= 1 << 30);
        assert_eq!(s, g.0 as u64 * g.1 as u64 * g.2 as u64 * 512);
        assert_eq!(plan_size(1000, true).unwrap().0, 1024);
        assert!(plan_size(2041 << 30, true).is_err());
    }

    #[test]
    fn dynamic_round_trip_and_bitmaps() {
        let b = dynamic_image(5 << 20);
        let v = open_bytes(b).unwrap();
        assert_eq!(v.virtual_size(), 5 << 20);
        assert_eq!(v.map(0, 5 << 20).unwrap().kind, Mapped::Zero { host: None });
        v.write_at(&[7u8; 1000], (2 << 20) - 500, &NoBacking).unwrap();
        let m = v.map((2 << 20) - 500, 1000).unwrap();
        assert!(matches!(m.kind, Mapped::Data { .. }));
        assert_eq!(m.len, 500);
        let mut snap = vec![0u8; v.storage.len().unwrap() as usize];
        v.storage.read_at(&mut snap, 0).unwrap();
        // Reopen: the end footer moved, the BAT points at two blocks.
        let v2 = open_bytes(snap.clone()).unwrap();
        assert!(matches!(v2.map(2 << 20, 10).unwrap().kind, Mapped::Data { .. }));
        let tail: [u8; 512] = snap[snap.len() - 512..].try_into().unwrap();
        assert!(Footer::parse(&tail).is_ok());
        // Clear one sector's bit: it reads as zeroes, its neighbours as data.
        let mut partial = snap;
        let e = be32(&partial, 1536).unwrap() as usize * 512;
        partial[e] = 0x7f;
        let v3 = open_bytes(partial).unwrap();
        assert_eq!(
            v3.map(0, 4096).unwrap(),
            Mapping {
                kind: Mapped::Zero { host: None },
                len: 512
            }
        );
        assert!(matches!(v3.map(512, 4096).unwrap().kind, Mapped::Data { .. }));
    }

    #[test]
    fn fixed_images() {
        let s = MemoryStorage::new(Vec::new(), false);
        write_new(&s, plan_size(1 << 20, true).unwrap(), true, true).unwrap();
        let b = s.into_inner();
        assert_eq!(b.len(), (1 << 20) + 512);
        let v = open_bytes(b.clone()).unwrap();
        assert_eq!(v.virtual_size(), 1 << 20);
        assert!(v.info().unwrap().cluster_size.is_none());
        // A footer claiming more than the file holds.
        let mut big = b;
        let at = big.len() - 512;
        big[at + 48..at + 56].copy_from_slice(&(2u64 << 20).to_be_bytes());
        refix_footer(&mut big, at);
        assert!(err(big).contains("does not fit"));
    }

    #[test]
    fn chs_size_unless_trusted_creator() {
        let mut b = dynamic_image(4 << 20);
        // 'qemu' creator: the size is cyls*heads*secs.
        b[28..32].copy_from_slice(b"qemu");
        b[56..58].copy_from_slice(&100u16.to_be_bytes());
        b[58] = 4;
        b[59] = 17;
        refix_footer(&mut b, 0);
        assert_eq!(open_bytes(b.clone()).unwrap().virtual_size(), 100 * 4 * 17 * 512);
        b[28..32].copy_from_slice(b"win ");
        refix_footer(&mut b, 0);
        assert_eq!(open_bytes(b).unwrap().virtual_size(), 4 << 20);
    }

    #[test]
    fn rejections() {
        let good = dynamic_image(4 << 20);
        // A bad copy at 0 falls back to the footer at the end; both bad fail.
        let mut b = good.clone();
        b[70] ^= 1;
        assert_eq!(open_bytes(b.clone()).unwrap().virtual_size(), 4 << 20);
        let end = b.len() - 512;
        b[end + 70] ^= 1;
        assert!(err(b).contains("no better"));
        let mut b = good.clone();
        b[60..64].copy_from_slice(&9u32.to_be_bytes());
        refix_footer(&mut b, 0);
        assert!(err(b).contains("disk type"));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        refix_footer(&mut b, 0);
        assert!(err(b).contains("header offset"));
        let mut b = good.clone();
        b[512] = b'X';
        assert!(err(b).contains("cxsparse"));
        let mut b = good.clone();
        b[512 + 40] ^= 1;
        assert!(err(b).contains("header checksum"));
        let mut b = good.clone();
        b[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
        refix_header(&mut b);
        assert!(err(b).contains("block size"));
        let mut b = good.clone();
        b[512 + 28..512 + 32].copy_from_slice(&1_073_741_825u32.to_be_bytes());
        refix_header(&mut b);
        assert!(err(b).contains("max table entries"));
        let mut b = good.clone();
        b[512 + 28..512 + 32].copy_from_slice(&1u32.to_be_bytes());
        refix_header(&mut b);
        assert!(err(b).contains("does not cover"));
        let mut b = good.clone();
        b[512 + 16..512 + 24].copy_from_slice(&600u64.to_be_bytes());
        refix_header(&mut b);
        assert!(err(b).contains("overlaps"));
        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(err(b).contains("truncated"));
        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&1u32.to_be_bytes());
        b.resize(8 << 20, 0);
        assert!(err(b).contains("metadata"));
        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&4u32.to_be_bytes());
        b[1540..1544].copy_from_slice(&5u32.to_be_bytes());
        b.resize(8 << 20, 0);
        assert!(err(b).contains("overlap"));
        assert!(err(vec![0u8; 100]).contains("too small"));
    }

    #[test]
    fn bat_allocating_more_blocks_than_the_file_holds_is_refused_early() {
        // 64 MiB disk, 2 MiB blocks: 32 entries at 1536, all naming the block
        // at sector 4 in a file of 8 MiB, which holds 3 blocks of 2 MiB + 512.
        let mut b = dynamic_image(64 << 20);
        for i in 0..32 {
            b[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&4u32.to_be_bytes());
        }
        b.resize(8 << 20, 0);
        let m = err(b);
        assert!(
            m.contains("allocates 32 blocks") && m.contains("without overlap"),
            "{m}"
        );
    }
}
