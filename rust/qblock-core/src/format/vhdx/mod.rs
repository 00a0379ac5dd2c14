//! vhdx: Hyper-V virtual hard disks, per Microsoft's "VHDX Format
//! Specification" v1.00 (MS-VHDX).
//!
//! - `guid`: the spec's GUIDs in their on-disk (mixed-endian) form.
//! - `header`: file identifier, the two headers (CRC-32C, sequence
//!   numbers), the region tables.
//! - `log`: finding the active log sequence and the updates it replays.
//! - `metadata`: the metadata table and items (block size, virtual size,
//!   sector sizes, page 83, parent locator).
//! - `bat`: BAT entries, states, the chunk ratio.
//!
//! Supported: dynamic and fixed disks, 512 and 4096-byte logical sectors,
//! block sizes of 1-256 MiB; read, write, create. A dirty log (a header
//! with a log GUID and a valid active sequence) is replayed into the file
//! on a writable open, as QEMU does; a read-only open of such a file is
//! `Unsupported` with that advice (as QEMU, which refuses it too).
//! Differencing disks (`has_parent`) are read through their parent when it
//! is found beside them by the locator's paths and carries the data write
//! GUID the locator links to (PARTIALLY_PRESENT blocks by their sector
//! bitmaps) and written with copy-on-write from it (new blocks whole, a
//! partially present block completed from the parent before it becomes
//! fully present); a parent not found is `Unsupported`, naming it.
//!
//! Payload states: FULLY_PRESENT blocks map to the file; ZERO reads as
//! zeroes (allocated); NOT_PRESENT, UNDEFINED and UNMAPPED read as zeroes
//! (not allocated: from the parent, or zeroes without one; UNMAPPED reads
//! as zeroes in a differencing disk).
//! PARTIALLY_PRESENT is only valid with a parent; elsewhere it is corrupt.
//!
//! Writes allocate whole payload blocks at the end of the file (1 MiB
//! aligned). The BAT entry is written in place after the block's data is
//! durable, not through the log: a crash leaves either the old entry (the
//! new block leaked) or the new one (its data already on disk). The log
//! GUID stays zero, so QEMU and Hyper-V see a clean file. Before the first
//! write both headers get new file and data write GUIDs, as the spec asks.
//!
//! Reading takes no lock: the BAT is a vector of atomics (a partially
//! present block briefly locks the one-entry sector bitmap cache).

mod bat;
mod guid;
mod header;
mod log;
mod metadata;

use super::paged::{Order, Paged};
use crate::backend::Storage;
use crate::driver::{BackingRef, Below, CheckReport, Driver, DriverInfo, HostFile, Mapped, Mapping, Repair};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::reference::RefKind;
use crate::registry::{FormatEntry, OpenCtx};
use bat::*;
use guid::{random_guid, ZERO_GUID};
use header::{Header, Region, Regions, HEADER_OFFSETS, HEADER_SECTION_END, MIB};
use metadata::{Metadata, ParentLocator};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Vhdx,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.starts_with(header::FILE_ID_SIGNATURE) {
        100
    } else {
        0
    }
}

/// Header state the writer keeps: the current header and its slot.
struct WriteState {
    header: Header,
    slot: usize,
    /// Both headers carry this session's write GUIDs (done before the first write).
    headers_updated: bool,
    /// Where the next payload block goes (1 MiB aligned, past everything).
    next_free: u64,
}

pub struct Vhdx {
    storage: Arc<dyn Storage>,
    meta: Metadata,
    layout: Layout,
    bat_offset: u64,
    bat: Paged<AtomicU64>,
    write: Mutex<WriteState>,
    /// A differencing disk's parent, found beside it (its data write GUID
    /// checked against the locator's linkage).
    backing: Option<BackingRef>,
    /// The last partially present block's sector bits (block, bytes):
    /// mapping it sector run by sector run must not reread them each time.
    last_bitmap: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// This open replayed a dirty log (a check reports it as fixed).
    log_replayed: bool,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let v = Vhdx::open_at(storage, ctx.read_only, Some(ctx))?;
    // Opened to be checked, the check's report counts the replay.
    if v.log_replayed && !ctx.check {
        crate::events::repaired_on_open(
            Format::Vhdx,
            ctx.location,
            "its log held writes not yet applied: the log was replayed",
        );
    }
    Ok(Box::new(v))
}

/// A GUID as Windows prints it (and parent locators record it): "{8-4-4-4-12}".
fn guid_text(g: &guid::Guid) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let tail: String = g[10..].iter().map(|b| format!("{b:02X}")).collect();
    format!("{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{tail}}}", g[8], g[9])
}

/// Find a differencing disk's parent beside it: the locator's paths (and
/// their last components, for absolute Windows paths), the first that
/// exists; its data write GUID must be the recorded linkage.
fn find_parent(ctx: &OpenCtx, p: &ParentLocator) -> Result<Option<BackingRef>> {
    let mut names: Vec<String> = p.paths.iter().map(|n| n.replace('\\', "/")).collect();
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
        let (h, _) = header::read_headers(parent.as_ref()).map_err(|e| e.context(format!("VHDX parent '{name}'")))?;
        let text = guid_text(&h.data_write_guid);
        if p.linkage.as_ref().is_some_and(|l| !l.eq_ignore_ascii_case(&text)) {
            return Err(corrupt(format!(
                "VHDX parent '{name}' has data write GUID {text}, not the linkage {} the child records",
                p.linkage.as_deref().unwrap_or("")
            )));
        }
        return Ok(Some(BackingRef {
            filename: name,
            format: Some("vhdx".into()),
        }));
    }
    if let Some(e) = refused {
        return Err(e);
    }
    if ctx.inspecting() {
        return Ok(None);
    }
    Err(unsupported(format!(
        "differencing VHDX image whose parent '{}' is not found beside it",
        p.describe()
    )))
}

fn round_up_mib(x: u64) -> u64 {
    x.div_ceil(MIB) * MIB
}

impl Vhdx {
    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> Result<Vhdx> {
        Self::open_at(storage, read_only, None)
    }

    /// Open; `ctx` (where the image is, what it may name) lets a
    /// differencing disk find its parent.
    pub fn open_at(storage: Arc<dyn Storage>, read_only: bool, ctx: Option<&OpenCtx>) -> Result<Vhdx> {
        let file_len = storage.len()?;
        let mut id = [0u8; 8];
        storage.read_at(&mut id, 0)?;
        if &id != header::FILE_ID_SIGNATURE {
            return Err(corrupt("VHDX file identifier 'vhdxfile' is missing"));
        }
        if file_len < HEADER_SECTION_END {
            return Err(corrupt(format!(
                "file of {file_len} bytes is too small for a VHDX header section"
            )));
        }
        let (mut hdr, mut slot) = header::read_headers(storage.as_ref())?;
        let log = Region {
            offset: hdr.log_offset,
            length: hdr.log_length as u64,
        };
        if log.offset < HEADER_SECTION_END
            || !log.offset.is_multiple_of(MIB)
            || !log.length.is_multiple_of(MIB)
            || log.offset.checked_add(log.length).is_none_or(|e| e > file_len)
            || (log.length == 0 && hdr.log_guid != ZERO_GUID)
        {
            return Err(corrupt(format!(
                "VHDX log at {} of {} bytes is not whole MiBs inside the file",
                log.offset, log.length
            )));
        }
        let mut log_replayed = false;
        if hdr.log_guid != ZERO_GUID {
            let bytes = log::load(storage.as_ref(), log.offset, log.length)?;
            if let Some(replay) = log::find_replay(&bytes, &hdr.log_guid)? {
                if read_only {
                    return Err(unsupported(format!(
                        "the VHDX image has a log to replay (sequence {}): open it read-write to replay it",
                        replay.head_sequence
                    )));
                }
                Self::replay(storage.as_ref(), &replay, &mut hdr, &mut slot)?;
                log_replayed = true;
            }
        }
        let file_len = storage.len()?;
        let regions = header::read_regions(storage.as_ref(), file_len)?;
        for r in [regions.bat, regions.metadata] {
            if header::overlaps(&r, &log) {
                return Err(corrupt(format!("VHDX region at {} overlaps the log", r.offset)));
            }
        }
        let meta = metadata::read_metadata(storage.as_ref(), regions.metadata)?;
        let backing = match (&meta.parent, ctx) {
            (None, _) => None,
            (Some(p), Some(ctx)) => find_parent(ctx, p)?,
            (Some(p), None) => {
                return Err(unsupported(format!(
                    "differencing VHDX image (parent '{}') opened without a location",
                    p.describe()
                )))
            }
        };
        let layout = Layout::new(
            meta.disk_size,
            meta.block_size,
            meta.chunk_ratio(),
            meta.parent.is_some(),
        );
        if layout.entries * 8 > regions.bat.length {
            return Err(corrupt(format!(
                "VHDX BAT region of {} bytes is too small for {} entries",
                regions.bat.length, layout.entries
            )));
        }
        // In 1 MiB pages: a 64 TiB disk with 1 MiB blocks has a 512 MiB BAT.
        let bat = Paged::read(
            storage.as_ref(),
            regions.bat.offset,
            layout.entries as usize,
            Order::Little,
            "the VHDX BAT",
            AtomicU64::new,
        )?;
        let next_free = Self::check_bat(&meta, &layout, &bat, &[log, regions.bat, regions.metadata], file_len)?;
        Ok(Vhdx {
            storage,
            meta,
            layout,
            bat_offset: regions.bat.offset,
            bat,
            write: Mutex::new(WriteState {
                header: hdr,
                slot,
                headers_updated: false,
                next_free,
            }),
            backing,
            log_replayed,
            last_bitmap: Mutex::new(None),
        })
    }

    /// Check every BAT entry; return where the next block may go.
    fn check_bat(
        meta: &Metadata,
        layout: &Layout,
        bat: &Paged<AtomicU64>,
        meta_regions: &[Region],
        file_len: u64,
    ) -> Result<u64> {
        let entries = |i: u64| bat[i as usize].load(Ordering::Relaxed);
        // Blocks that do not overlap each take at least 1 MiB of the file,
        // but the last payload block: more than that many overlap somewhere,
        // and listing them all would cost memory the file does not hold.
        let max_blocks = file_len / MIB + 1;
        let bs = meta.block_size;
        let mut end = meta_regions
            .iter()
            .map(|r| r.offset + r.length)
            .max()
            .unwrap_or(0)
            .max(file_len);
        let mut blocks: Vec<(u64, u64, u64)> = Vec::new();
        for block in 0..layout.payload_blocks {
            let i = layout.payload_index(block);
            let e = entries(i);
            match state(e) {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => continue,
                PAYLOAD_FULLY_PRESENT => {}
                PAYLOAD_PARTIALLY_PRESENT if meta.parent.is_some() => {
                    let sb = entries(layout.bitmap_index(block));
                    if state(sb) != SB_PRESENT {
                        return Err(corrupt(format!(
                            "VHDX block {block} is PARTIALLY_PRESENT but its sector bitmap is not present"
                        )));
                    }
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(corrupt(format!(
                        "VHDX block {block} is PARTIALLY_PRESENT in a disk without parent"
                    )))
                }
                s => return Err(corrupt(format!("VHDX block {block} has the invalid state {s}"))),
            }
            let off = offset(e);
            // The last block may lie only partly in the file (QEMU wrote such files).
            let len = bs.min(meta.disk_size - block * bs);
            if off < HEADER_SECTION_END || off.checked_add(len).is_none_or(|x| x > file_len) {
                return Err(corrupt(format!(
                    "VHDX block {block} at {off} lies outside the file ({file_len} bytes): truncated?"
                )));
            }
            let r = Region {
                offset: off,
                length: len,
            };
            if meta_regions.iter().any(|m| header::overlaps(m, &r)) {
                return Err(corrupt(format!(
                    "VHDX block {block} at {off} overlaps the log, BAT or metadata"
                )));
            }
            end = end.max(off + bs);
            Self::push_block(&mut blocks, (off, len, block), max_blocks)?;
        }
        // Sector bitmap blocks (1 MiB): a differencing disk reads them, so
        // they must be sane; a disk without parent does not use them, but
        // new payload blocks stay clear of them.
        for i in (layout.chunk_ratio..layout.entries).step_by(layout.chunk_ratio as usize + 1) {
            let e = entries(i);
            if state(e) != SB_PRESENT {
                continue;
            }
            let off = offset(e);
            if meta.parent.is_some() {
                let r = Region {
                    offset: off,
                    length: MIB,
                };
                if off < HEADER_SECTION_END
                    || off.checked_add(MIB).is_none_or(|x| x > file_len)
                    || meta_regions.iter().any(|m| header::overlaps(m, &r))
                {
                    return Err(corrupt(format!("VHDX sector bitmap block at {off} is misplaced")));
                }
                Self::push_block(&mut blocks, (off, MIB, u64::MAX), max_blocks)?;
            }
            if off >= HEADER_SECTION_END {
                end = end.max(off.saturating_add(MIB));
            }
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if w[1].0 < w[0].0 + w[0].1 {
                return Err(corrupt(format!(
                    "VHDX blocks {} and {} overlap at {}",
                    w[0].2, w[1].2, w[1].0
                )));
            }
        }
        Ok(round_up_mib(end))
    }

    fn push_block(blocks: &mut Vec<(u64, u64, u64)>, b: (u64, u64, u64), max: u64) -> Result<()> {
        if blocks.len() as u64 >= max {
            return Err(corrupt(format!(
                "VHDX BAT places more than {max} blocks, more than the file holds without overlap"
            )));
        }
        blocks
            .try_reserve(1)
            .map_err(|_| crate::error::Error::NoMemory("VHDX block list".into()))?;
        blocks.push(b);
        Ok(())
    }

    /// Replay the log into the file. Crash order: the updates, flushed,
    /// then the headers without the log GUID (a crash before that replays
    /// the same updates again, which is idempotent).
    fn replay(storage: &dyn Storage, r: &log::Replay, hdr: &mut Header, slot: &mut usize) -> Result<()> {
        for u in &r.updates {
            match u {
                log::Update::Data { offset, bytes } => storage.write_at(bytes, *offset)?,
                log::Update::Zero { offset, len } => storage.write_zeroes(*offset, *len)?,
            }
        }
        if storage.len()? < r.last_file_offset {
            storage.set_len(r.last_file_offset)?;
        }
        storage.flush()?;
        hdr.log_guid = ZERO_GUID;
        Self::write_headers(storage, hdr, slot)
    }

    /// Update both headers as the spec asks: the non-current one first
    /// with the next sequence number, then the other. Flushed.
    fn write_headers(storage: &dyn Storage, hdr: &mut Header, slot: &mut usize) -> Result<()> {
        for _ in 0..2 {
            let other = 1 - *slot;
            hdr.sequence = hdr.sequence.wrapping_add(1);
            storage.write_at(&hdr.to_bytes(), HEADER_OFFSETS[other])?;
            storage.flush()?;
            *slot = other;
        }
        Ok(())
    }

    fn entry_of(&self, block: u64) -> u64 {
        self.bat[self.layout.payload_index(block) as usize].load(Ordering::Acquire)
    }

    /// 0: data here; 1: zeroes; 2: not here (the parent's, or zeroes);
    /// 3: partly here (sector bitmap). UNMAPPED reads as zeroes in a
    /// differencing disk too (the spec allows zeroes or the old contents,
    /// never the parent's).
    fn kind_of(&self, e: u64) -> u8 {
        match state(e) {
            PAYLOAD_FULLY_PRESENT => 0,
            PAYLOAD_ZERO => 1,
            PAYLOAD_UNMAPPED if self.meta.parent.is_some() => 1,
            PAYLOAD_PARTIALLY_PRESENT => 3,
            _ => 2,
        }
    }

    /// The sector bits of partially present `block` (LSB first), cached.
    fn sector_bits(&self, block: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((b, bits)) = self.last_bitmap.lock().as_ref() {
            if *b == block {
                return Ok(bits.clone());
            }
        }
        let spb = self.meta.block_size / self.meta.logical_sector_size as u64;
        let sb = self.bat[self.layout.bitmap_index(block) as usize].load(Ordering::Acquire);
        let mut bits = try_zeroed((spb / 8) as usize, "a VHDX sector bitmap")?;
        self.storage
            .read_at(&mut bits, bat::offset(sb) + (block % self.layout.chunk_ratio) * spb / 8)?;
        let bits = Arc::new(bits);
        *self.last_bitmap.lock() = Some((block, bits.clone()));
        Ok(bits)
    }
}

impl Driver for Vhdx {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    /// `qemu-img check` for vhdx, as QEMU's: a log this open replayed is a
    /// fixed corruption. BAT entries past the end of the file, which QEMU
    /// reports here, are refused at open already; there is nothing else to
    /// find or repair.
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _ = repair;
        Ok(CheckReport {
            corruptions_fixed: u64::from(self.log_replayed),
            ..Default::default()
        })
    }
    fn virtual_size(&self) -> u64 {
        self.meta.disk_size
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let bs = self.meta.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let e = self.entry_of(block);
        let kind = self.kind_of(e);
        let mut run = (bs - in_block).min(len);
        if kind == 3 {
            // A run of sectors sharing the first one's bit: present here, or in the parent.
            let lss = self.meta.logical_sector_size as u64;
            let bits = self.sector_bits(block)?;
            let bit = |s: u64| bits.get((s / 8) as usize).is_some_and(|b| b & (1 << (s % 8)) != 0);
            let first = in_block / lss;
            let present = bit(first);
            let end = (in_block + run).div_ceil(lss);
            let mut s = first + 1;
            while s < end && bit(s) == present {
                s += 1;
            }
            let n = (s * lss - in_block).min(run);
            let kind = if present {
                Mapped::Data {
                    file: 0,
                    offset: bat::offset(e) + in_block,
                }
            } else {
                Mapped::Unallocated
            };
            return Ok(Mapping { kind, len: n });
        }
        let mut next = block + 1;
        // One run across following blocks that map the same way (and, for
        // data, continue in the file).
        while run < len && next < self.layout.payload_blocks {
            let n = self.entry_of(next);
            let contiguous = kind != 0 || bat::offset(n) == bat::offset(e) + (next - block) * bs;
            if self.kind_of(n) != kind || !contiguous {
                break;
            }
            run = (run + bs).min(len);
            next += 1;
        }
        let kind = match kind {
            0 => Mapped::Data {
                file: 0,
                offset: bat::offset(e) + in_block,
            },
            1 => Mapped::Zero { host: None },
            _ => Mapped::Unallocated,
        };
        Ok(Mapping { kind, len: run })
    }
    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let mut w = self.write.lock();
        if !w.headers_updated {
            let ws = &mut *w;
            ws.header.file_write_guid = random_guid();
            ws.header.data_write_guid = random_guid();
            ws.header.log_guid = ZERO_GUID;
            Self::write_headers(self.storage.as_ref(), &mut ws.header, &mut ws.slot)?;
            ws.headers_updated = true;
        }
        let bs = self.meta.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            let idx = self.layout.payload_index(block) as usize;
            let e = self.bat[idx].load(Ordering::Acquire);
            let kind = self.kind_of(e);
            if kind == 0 {
                self.storage.write_at(chunk, bat::offset(e) + in_block)?;
            } else if kind == 3 {
                // Partially present: give the sectors still in the parent
                // their parent's bytes, durably, then call the block fully
                // present (the BAT entry last), then write.
                let lss = self.meta.logical_sector_size as u64;
                let bits = self.sector_bits(block)?;
                let bit = |s: u64| bits.get((s / 8) as usize).is_some_and(|b| b & (1 << (s % 8)) != 0);
                let sectors = bs / lss;
                let mut s = 0;
                while s < sectors {
                    if bit(s) {
                        s += 1;
                        continue;
                    }
                    let start = s;
                    while s < sectors && !bit(s) {
                        s += 1;
                    }
                    let mut fill = try_zeroed(((s - start) * lss) as usize, "a VHDX copy-on-write buffer")?;
                    below.read_below(&mut fill, block * bs + start * lss)?;
                    self.storage.write_at(&fill, bat::offset(e) + start * lss)?;
                }
                self.storage.flush()?;
                let ne = bat::entry(PAYLOAD_FULLY_PRESENT, bat::offset(e));
                self.storage
                    .write_at(&ne.to_le_bytes(), self.bat_offset + 8 * idx as u64)?;
                self.bat[idx].store(ne, Ordering::Release);
                *self.last_bitmap.lock() = None;
                self.storage.write_at(chunk, bat::offset(e) + in_block)?;
            } else {
                // Allocate at the end. The rest of the new block is what the
                // block read as: the parent's bytes (not present in a
                // differencing disk), else zeroes (the file grows past it,
                // holes). Crash order: data durable, then the BAT entry.
                let at = w.next_free;
                if self.storage.len()? < at + bs {
                    self.storage.set_len(at + bs)?;
                }
                if kind == 2 && self.backing.is_some() && n as u64 != bs {
                    let mut whole = try_zeroed(bs as usize, "a VHDX copy-on-write buffer")?;
                    below.read_below(&mut whole, block * bs)?;
                    whole[in_block as usize..in_block as usize + n].copy_from_slice(chunk);
                    self.storage.write_at(&whole, at)?;
                } else {
                    self.storage.write_at(chunk, at + in_block)?;
                }
                self.storage.flush()?;
                let ne = bat::entry(PAYLOAD_FULLY_PRESENT, at);
                self.storage
                    .write_at(&ne.to_le_bytes(), self.bat_offset + 8 * idx as u64)?;
                self.bat[idx].store(ne, Ordering::Release);
                w.next_free = at + bs;
            }
            done += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        // Blocks reading as zeroes stay as they are: ZERO (and UNMAPPED in a
        // differencing disk), and any block not present without a parent.
        let bs = self.meta.block_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos);
            let kind = self.kind_of(self.entry_of(pos / bs));
            if kind == 0 || kind == 3 || (kind == 2 && self.backing.is_some()) {
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(1 << 20);
                    self.write_at(&vec![0u8; k as usize], pos + done, below)?;
                    done += k;
                }
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
            cluster_size: Some(self.meta.block_size),
            ..Default::default()
        })
    }
}

// ---------------------------------------------------------------- create

/// QEMU's default block size for a disk size: keeps the BAT small.
fn default_block_size(size: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 * GIB {
        32 * MIB
    } else if size > GIB {
        16 * MIB
    } else {
        8 * MIB
    }
}

fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let block_size = opts.take_u64("block_size")?.unwrap_or(0);
    let log_size = opts.take_u64("log_size")?.unwrap_or(MIB);
    let subformat = opts.take_str("subformat")?.unwrap_or_else(|| "dynamic".into());
    let zero_blocks = opts.take_bool("block_state_zero")?.unwrap_or(true);
    opts.finish("vhdx")?;
    let fixed = match subformat.as_str() {
        "dynamic" => false,
        "fixed" => true,
        other => {
            return Err(invalid(format!(
                "vhdx subformat must be dynamic or fixed, not '{other}'"
            )))
        }
    };
    let storage = location.create_storage()?;
    write_new(storage.as_ref(), size, block_size, log_size, fixed, zero_blocks)?;
    storage.flush()
}

/// Lay out a new image (QEMU's layout): header section, log at 1 MiB, BAT,
/// metadata, payload. The headers go last, so a crash mid-way leaves a file
/// no reader takes for a VHDX.
fn write_new(s: &dyn Storage, size: u64, block_size: u64, log_size: u64, fixed: bool, zero_blocks: bool) -> Result<()> {
    write_image(s, size, block_size, log_size, fixed, zero_blocks, None)
}

/// `write_new`, or a differencing child of `parent` (tests; no option
/// creates one yet).
fn write_image(
    s: &dyn Storage,
    size: u64,
    block_size: u64,
    log_size: u64,
    fixed: bool,
    zero_blocks: bool,
    parent: Option<&ParentLocator>,
) -> Result<()> {
    let size = size.div_ceil(512) * 512;
    if size > metadata::MAX_DISK_SIZE {
        return Err(invalid(format!("a VHDX image is at most 64 TiB, not {size} bytes")));
    }
    let bs = if block_size == 0 {
        default_block_size(size)
    } else {
        block_size
    };
    if !bs.is_power_of_two() || !(metadata::MIN_BLOCK_SIZE..=metadata::MAX_BLOCK_SIZE).contains(&bs) {
        return Err(invalid(format!(
            "vhdx block_size must be a power of two from 1 MiB to 256 MiB, not {bs}"
        )));
    }
    if log_size == 0 || !log_size.is_multiple_of(MIB) || log_size >= 1 << 32 {
        return Err(invalid(format!(
            "vhdx log_size must be a multiple of 1 MiB below 4 GiB, not {log_size}"
        )));
    }
    let meta = Metadata {
        block_size: bs,
        flags: if fixed { metadata::LEAVE_BLOCKS_ALLOCATED } else { 0 }
            | if parent.is_some() { metadata::HAS_PARENT } else { 0 },
        disk_size: size,
        logical_sector_size: 512,
        physical_sector_size: 512,
        page83: random_guid(),
        parent: parent.cloned(),
    };
    let layout = Layout::new(size, bs, meta.chunk_ratio(), meta.parent.is_some());
    let log = Region {
        offset: HEADER_SECTION_END,
        length: log_size,
    };
    let bat_region = Region {
        offset: log.offset + log.length,
        length: round_up_mib(layout.entries * 8).max(MIB),
    };
    let meta_region = Region {
        offset: bat_region.offset + bat_region.length,
        length: MIB,
    };
    let data_start = meta_region.offset + meta_region.length;

    let mut id = vec![0u8; 64 * 1024];
    id[..8].copy_from_slice(header::FILE_ID_SIGNATURE);
    for (i, c) in "libqblock".encode_utf16().enumerate() {
        id[8 + 2 * i..10 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    s.write_at(&id, 0)?;
    let regions = Regions {
        bat: bat_region,
        metadata: meta_region,
    };
    let table = header::region_table_bytes(&regions);
    for off in header::REGION_TABLE_OFFSETS {
        s.write_at(&table, off)?;
    }
    metadata::write_metadata(s, meta_region.offset, &meta)?;
    let mut bat = try_zeroed((layout.entries * 8) as usize, "the VHDX BAT")?;
    for block in 0..layout.payload_blocks {
        let e = if fixed {
            bat::entry(PAYLOAD_FULLY_PRESENT, data_start + block * bs)
        } else if zero_blocks && parent.is_none() {
            bat::entry(PAYLOAD_ZERO, 0)
        } else {
            bat::entry(PAYLOAD_NOT_PRESENT, 0)
        };
        let i = layout.payload_index(block) as usize * 8;
        bat[i..i + 8].copy_from_slice(&e.to_le_bytes());
    }
    s.write_at(&bat, bat_region.offset)?;
    let end = if fixed {
        data_start + layout.payload_blocks * bs
    } else {
        data_start
    };
    s.set_len(end)?;
    let mut h = Header {
        sequence: 0,
        file_write_guid: random_guid(),
        data_write_guid: random_guid(),
        log_guid: ZERO_GUID,
        log_version: 0,
        version: 1,
        log_length: log_size as u32,
        log_offset: log.offset,
    };
    s.flush()?;
    let mut slot = 1;
    Vhdx::write_headers(s, &mut h, &mut slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;
    use crate::error::Error;

    fn image(size: u64, bs: u64, fixed: bool) -> Vec<u8> {
        let s = MemoryStorage::new(Vec::new(), false);
        write_new(&s, size, bs, MIB, fixed, true).unwrap();
        s.into_inner()
    }

    fn open_bytes(b: Vec<u8>, read_only: bool) -> Result<Vhdx> {
        Vhdx::open(Arc::new(MemoryStorage::new(b, false)), read_only)
    }

    fn corrupt_msg(b: Vec<u8>) -> String {
        match open_bytes(b, true) {
            Err(Error::CorruptImage(m)) => m,
            Err(e) => panic!("expected CorruptImage, got {e:?}"),
            Ok(_) => panic!("expected CorruptImage, opened"),
        }
    }

    fn snapshot(v: &Vhdx) -> Vec<u8> {
        let mut b = vec![0u8; v.storage.len().unwrap() as usize];
        v.storage.read_at(&mut b, 0).unwrap();
        b
    }

    const BAT_AT: usize = 2 << 20; // 1 MiB header section + 1 MiB log

    #[test]
    fn create_open_write_reopen() {
        let v = open_bytes(image(20 << 20, MIB, false), false).unwrap();
        assert_eq!(v.virtual_size(), 20 << 20);
        assert_eq!(
            v.map(0, 20 << 20).unwrap(),
            Mapping {
                kind: Mapped::Zero { host: None },
                len: 20 << 20
            }
        );
        v.write_at(&[9u8; 3000], MIB - 1000, &NoBacking).unwrap();
        // Blocks 0 and 1 were allocated one after the other: one run.
        assert!(matches!(
            v.map(MIB - 1000, 3000).unwrap(),
            Mapping {
                kind: Mapped::Data { .. },
                len: 3000
            }
        ));
        assert_eq!(v.map(2 * MIB, 10).unwrap().kind, Mapped::Zero { host: None });
        let b = snapshot(&v);
        let v2 = open_bytes(b, true).unwrap();
        assert!(matches!(v2.map(MIB, 10).unwrap().kind, Mapped::Data { .. }));
        assert_eq!(v2.write.lock().header.sequence, 4);
    }

    #[test]
    fn fixed_maps_in_one_run() {
        let v = open_bytes(image(8 << 20, MIB, true), true).unwrap();
        let m = v.map(0, 8 << 20).unwrap();
        assert_eq!(m.len, 8 << 20);
        assert!(matches!(m.kind, Mapped::Data { .. }));
    }

    #[test]
    fn dirty_log_is_replayed_on_a_writable_open_only() {
        let mut b = image(4 << 20, MIB, false);
        let g = [5u8; 16];
        // A logged BAT update: block 1 becomes FULLY_PRESENT at 16 MiB.
        let mut sector = b[BAT_AT..BAT_AT + 4096].to_vec();
        sector[8..16].copy_from_slice(&bat::entry(PAYLOAD_FULLY_PRESENT, 16 << 20).to_le_bytes());
        let e = log::build_entry(&g, 1, 0, &[(BAT_AT as u64, sector)], &[]);
        b[MIB as usize..MIB as usize + e.len()].copy_from_slice(&e);
        b.resize(17 << 20, 0);
        b[(16 << 20) + 5] = 0x77;
        // Make the current header carry the log GUID.
        let (mut h, slot) = header::read_headers(&MemoryStorage::new(b.clone(), true)).unwrap();
        h.log_guid = g;
        h.sequence += 10;
        let at = HEADER_OFFSETS[slot] as usize;
        b[at..at + 4096].copy_from_slice(&h.to_bytes());
        assert!(matches!(open_bytes(b.clone(), true), Err(Error::Unsupported(_))));
        let v = open_bytes(b, false).unwrap();
        assert_eq!(
            v.map(MIB + 5, 1).unwrap().kind,
            Mapped::Data {
                file: 0,
                offset: (16 << 20) + 5
            }
        );
        // The log is gone afterwards: a read-only open works.
        let again = open_bytes(snapshot(&v), true).unwrap();
        assert!(matches!(again.map(MIB, 1).unwrap().kind, Mapped::Data { .. }));
    }

    #[test]
    fn a_replayed_log_is_logged_with_the_image_name() {
        use crate::events::capture;
        use crate::image::{Image, OpenOptions};
        capture::install();
        let mut b = image(4 << 20, MIB, false);
        let g = [6u8; 16];
        let e = log::build_entry(&g, 1, 0, &[(BAT_AT as u64, b[BAT_AT..BAT_AT + 4096].to_vec())], &[]);
        b[MIB as usize..MIB as usize + e.len()].copy_from_slice(&e);
        let (mut h, slot) = header::read_headers(&MemoryStorage::new(b.clone(), true)).unwrap();
        h.log_guid = g;
        h.sequence += 10;
        let at = HEADER_OFFSETS[slot] as usize;
        b[at..at + 4096].copy_from_slice(&h.to_bytes());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("logged.vhdx");
        std::fs::write(&p, &b).unwrap();
        let name = p.display().to_string();
        let loc = crate::Location::file(&p);
        let opts = OpenOptions::default();
        Image::open(&loc, None, &opts).unwrap().close().unwrap();
        let got = capture::records_naming(&name);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1.as_str()), (::log::Level::Warn, "libqblock.vhdx"));
        assert!(got[0].2.contains("log was replayed"), "{got:?}");
        // Replayed once: the next writable open has nothing to say.
        Image::open(&loc, None, &opts).unwrap().close().unwrap();
        assert_eq!(capture::records_naming(&name).len(), 1);
    }

    #[test]
    fn differencing_reads_through_its_parent() {
        use crate::image::{Image, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let (pp, cp) = (dir.path().join("parent.vhdx"), dir.path().join("child.vhdx"));
        let ps: Arc<dyn Storage> = Arc::new(crate::backend::file::FileStorage::create(&pp).unwrap());
        write_new(ps.as_ref(), 4 << 20, MIB, MIB, false, true).unwrap();
        let parent = Vhdx::open(ps.clone(), false).unwrap();
        parent.write_at(&vec![0x5a; 4 << 20], 0, &NoBacking).unwrap();
        let linkage = guid_text(&parent.write.lock().header.data_write_guid);
        drop(parent);
        drop(ps); // (its create lock too)
        let cs = crate::backend::file::FileStorage::create(&cp).unwrap();
        let loc = ParentLocator {
            linkage: Some(linkage),
            paths: vec![".\\parent.vhdx".into()],
        };
        write_image(&cs, 4 << 20, MIB, MIB, false, true, Some(&loc)).unwrap();
        // Block 1 partially present: sectors 0-3 here (0xcc), the rest the parent's.
        let end = cs.len().unwrap();
        cs.write_at(&vec![0xcc; MIB as usize], end).unwrap();
        cs.write_at(&vec![0u8; MIB as usize], end + MIB).unwrap();
        cs.write_at(&[0x0f], end + MIB + (MIB / 512) / 8).unwrap(); // bit 0 is the first sector
        let layout = Layout::new(4 << 20, MIB, (1 << 23) * 512 / MIB, true);
        let e = bat::entry(PAYLOAD_PARTIALLY_PRESENT, end);
        cs.write_at(&e.to_le_bytes(), BAT_AT as u64 + 8 * layout.payload_index(1))
            .unwrap();
        let sb = bat::entry(SB_PRESENT, end + MIB);
        cs.write_at(&sb.to_le_bytes(), BAT_AT as u64 + 8 * layout.bitmap_index(1))
            .unwrap();
        // Block 2 zero.
        let z = bat::entry(PAYLOAD_ZERO, 0);
        cs.write_at(&z.to_le_bytes(), BAT_AT as u64 + 8 * layout.payload_index(2))
            .unwrap();
        cs.flush().unwrap();
        drop(cs); // its create lock would keep readers out
        let img = Image::open(
            &Location::file(&cp),
            None,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(&mut buf, 0).unwrap();
        let mut want = vec![0x5au8; 4 << 20];
        want[MIB as usize..MIB as usize + 2048].fill(0xcc);
        want[2 * MIB as usize..3 * MIB as usize].fill(0);
        assert_eq!(buf, want);
        drop(img);
        // Writes: into the partial block, across the zero block into a block
        // not present, and at the end; then reopen and read.
        let rw = OpenOptions::default();
        let img = Image::open(&Location::file(&cp), None, &rw).unwrap();
        for (off, n, v) in [
            (MIB + 1000, 2000, 1u8),
            (3 * MIB - 10, 20, 2),
            ((4 << 20) - 5, 5, 3),
            (100, 1, 4),
        ] {
            img.write_at(&vec![v; n], off).unwrap();
            want[off as usize..off as usize + n].fill(v);
        }
        img.write_zeroes(2 * MIB + 7, 9).unwrap();
        want[2 * MIB as usize + 7..2 * MIB as usize + 16].fill(0);
        img.close().unwrap();
        let img = Image::open(&Location::file(&cp), None, &rw).unwrap();
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, want);
        drop(img);
        // A parent of another linkage is refused.
        let bad = ParentLocator {
            linkage: Some("{00000000-0000-0000-0000-000000000000}".into()),
            ..loc.clone()
        };
        let cs2 = crate::backend::file::FileStorage::create(&cp).unwrap();
        write_image(&cs2, 4 << 20, MIB, MIB, false, true, Some(&bad)).unwrap();
        drop(cs2);
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        assert!(matches!(
            Image::open(&Location::file(&cp), None, &ro),
            Err(Error::CorruptImage(_))
        ));
        // A missing parent: Unsupported, naming it.
        std::fs::remove_file(&pp).unwrap();
        match Image::open(&Location::file(&cp), None, &ro) {
            Err(Error::Unsupported(m)) => assert!(m.contains("parent.vhdx"), "{m}"),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[test]
    fn rejections() {
        let good = image(4 << 20, MIB, true);
        let mut b = good.clone();
        b[0] = b'X';
        assert!(corrupt_msg(b).contains("identifier"));
        let mut b = good.clone();
        b[64 << 10] ^= 1;
        b[128 << 10] ^= 1;
        assert!(corrupt_msg(b).contains("no valid VHDX header"));
        let mut b = good.clone();
        b[192 << 10] ^= 1;
        b[256 << 10] ^= 1;
        assert!(corrupt_msg(b).contains("region table"));
        // A block beyond the end of the file.
        let mut b = good.clone();
        b[BAT_AT..BAT_AT + 8].copy_from_slice(&bat::entry(PAYLOAD_FULLY_PRESENT, 1 << 40).to_le_bytes());
        assert!(corrupt_msg(b).contains("outside the file"));
        // A block on the BAT.
        let mut b = good.clone();
        b[BAT_AT..BAT_AT + 8].copy_from_slice(&bat::entry(PAYLOAD_FULLY_PRESENT, BAT_AT as u64).to_le_bytes());
        assert!(corrupt_msg(b).contains("overlaps"));
        // Two blocks at one place.
        let mut b = good.clone();
        let e1 = b[BAT_AT..BAT_AT + 8].to_vec();
        b[BAT_AT + 8..BAT_AT + 16].copy_from_slice(&e1);
        assert!(corrupt_msg(b).contains("overlap"));
        // Invalid states.
        let mut b = good.clone();
        b[BAT_AT] = (b[BAT_AT] & !7) | 5;
        assert!(corrupt_msg(b).contains("invalid state"));
        let mut b = good.clone();
        b[BAT_AT] = (b[BAT_AT] & !7) | 7;
        assert!(corrupt_msg(b).contains("PARTIALLY_PRESENT"));
        // Log outside the file.
        let mut b = good.clone();
        let (mut h, slot) = header::read_headers(&MemoryStorage::new(b.clone(), true)).unwrap();
        h.log_offset = 1 << 40;
        let at = HEADER_OFFSETS[slot] as usize;
        b[at..at + 4096].copy_from_slice(&h.to_bytes());
        assert!(corrupt_msg(b).contains("log"));
        assert!(corrupt_msg(b"vhdxfile".to_vec()).contains("too small"));
    }

    #[test]
    fn bat_in_pages_serves_a_64_tib_disk() {
        // 16 MiB blocks: 4 Mi payload entries, a 32 MiB BAT over 257 pages.
        let size = metadata::MAX_DISK_SIZE;
        let v = open_bytes(image(size, 16 * MIB, false), false).unwrap();
        assert!(v.layout.entries as usize > 32 * crate::format::paged::PAGE);
        let last = size - 16 * MIB;
        v.write_at(&[0xa5u8; 4096], last + 4096, &NoBacking).unwrap();
        let v2 = open_bytes(snapshot(&v), true).unwrap();
        assert!(matches!(v2.map(last + 4096, 4096).unwrap().kind, Mapped::Data { .. }));
        assert_eq!(v2.map(last - MIB, 10).unwrap().kind, Mapped::Zero { host: None });
    }

    #[test]
    fn bat_listing_more_blocks_than_the_file_holds_is_refused_early() {
        // 64 payload entries all naming the same 1 MiB block at 8 MiB, in a
        // file of 9 MiB: refused once the list outgrows the file (10
        // blocks), before any list of every entry is built.
        let mut b = image(64 * MIB, MIB, false);
        let data_at = 8 * MIB;
        b.resize((data_at + MIB) as usize, 0);
        for i in 0..64usize {
            let at = BAT_AT + 8 * i;
            b[at..at + 8].copy_from_slice(&bat::entry(PAYLOAD_FULLY_PRESENT, data_at).to_le_bytes());
        }
        let m = corrupt_msg(b);
        assert!(m.contains("more than 10 blocks"), "{m}");
    }
}
