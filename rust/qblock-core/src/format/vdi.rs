//! vdi: VirtualBox Virtual Disk Image, header version 1.1, as VirtualBox's
//! published `VDICore.h` layout describes it and QEMU's block/vdi.c reads it.
//!
//! Layout: a 0x40-byte text banner, the signature and version (0x40..0x48),
//! the v1.1 header proper (`cbHeader` = 0x180 bytes from 0x48), then a block
//! map (`bmap`) of little-endian u32 entries at `offset_bmap`, one per block
//! of the virtual disk, and the data blocks from `offset_data` on, in the
//! order they were allocated. A bmap entry is the index of a data block, or
//! 0xffffffff (never written) or 0xfffffffe (discarded: reads as zeroes).
//!
//! Supported: normal (dynamic) and fixed (static) images, read and write,
//! any power-of-two block size when reading (QEMU and we create 1 MiB).
//! Refused as `Unsupported`, as QEMU refuses them: undo and differencing
//! images (types 3 and 4, or a parent/link UUID), header versions other than
//! 1.1, `block_extra` (per-block prefix data), sector sizes other than 512,
//! unaligned map or data offsets.
//!
//! `check` reports what QEMU's vdi check reports: a header count of
//! allocated blocks that disagrees with the block map.
//!
//! Reading takes no lock: the bmap is a vector of atomics, and `map` returns
//! runs of consecutive blocks. Allocation is serialized by one mutex.

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
    format: Format::Vdi,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
/// The banner QEMU (and so we) write in the first 0x40 bytes.
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// The v1.1 header starts with its own size field at 0x48 ...
const HEADER_START: u64 = 0x48;
/// ... and is at least this long (VDIHEADER1PLUS is exactly this).
const HEADER_V1_1_SIZE: u32 = 0x180;
/// We read (and QEMU writes) the first sector: every v1.1 field is in it.
const HEADER_SECTOR: usize = 512;
const SECTOR: u64 = 512;

/// bmap markers (VirtualBox VDI_IMAGE_BLOCK_FREE / _ZERO).
const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;

/// Image types.
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;

/// Most blocks an image may have: QEMU's VDI_BLOCKS_IN_IMAGE_MAX, chosen so
/// the block map (4 bytes a block) stays below 2 GiB. The map must also fit
/// inside the file, which bounds what a small hostile file can make us read.
pub const MAX_BLOCKS: u32 = 0x1fff_ff80;
/// Block size QEMU creates and VirtualBox uses.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Block sizes we read: powers of two from one sector to 256 MiB (a block is
/// the unit of a copy-on-write buffer, so it must stay allocatable).
const MIN_BLOCK_SIZE: u32 = 512;
const MAX_BLOCK_SIZE: u32 = 1 << 28;

/// Header field offsets.
mod off {
    pub const SIGNATURE: usize = 0x40;
    pub const VERSION: usize = 0x44;
    pub const HEADER_SIZE: usize = 0x48;
    pub const IMAGE_TYPE: usize = 0x4c;
    pub const OFFSET_BMAP: usize = 0x154;
    pub const OFFSET_DATA: usize = 0x158;
    pub const SECTOR_SIZE: usize = 0x168;
    pub const DISK_SIZE: usize = 0x170;
    pub const BLOCK_SIZE: usize = 0x178;
    pub const BLOCK_EXTRA: usize = 0x17c;
    pub const BLOCKS_IN_IMAGE: usize = 0x180;
    pub const BLOCKS_ALLOCATED: usize = 0x184;
    pub const UUID_IMAGE: usize = 0x188;
    pub const UUID_LAST_SNAP: usize = 0x198;
    pub const UUID_LINK: usize = 0x1a8;
    pub const UUID_PARENT: usize = 0x1b8;
}

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    // A truncated file with the signature still claims VDI, so that opening
    // it says "corrupt" rather than serving it as raw.
    if le32(h, off::SIGNATURE) == Some(SIGNATURE) {
        100
    } else {
        0
    }
}

fn is_allocated(e: u32) -> bool {
    e < DISCARDED
}

/// The checked v1.1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub image_type: u32,
    pub offset_bmap: u64,
    pub offset_data: u64,
    /// The disk size, rounded up to a sector as QEMU does for images
    /// `VBoxManage convertfromraw` wrote with odd sizes.
    pub disk_size: u64,
    pub block_size: u32,
    pub blocks_in_image: u32,
    pub blocks_allocated: u32,
}

impl Header {
    /// Check every field of the first sector against the file length.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_SECTOR || file_len < HEADER_SECTOR as u64 {
            return Err(corrupt(format!(
                "the file ({file_len} bytes) is shorter than a VDI header"
            )));
        }
        let f = |at| le32(b, at).expect("within the header sector");
        let signature = f(off::SIGNATURE);
        if signature != SIGNATURE {
            return Err(corrupt(format!("bad VDI signature {signature:#010x}")));
        }
        let version = f(off::VERSION);
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "VDI header version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            )));
        }
        let header_size = f(off::HEADER_SIZE);
        if header_size < HEADER_V1_1_SIZE {
            return Err(corrupt(format!(
                "VDI v1.1 header size {header_size:#x} is smaller than {HEADER_V1_1_SIZE:#x}"
            )));
        }
        let image_type = f(off::IMAGE_TYPE);
        match image_type {
            TYPE_NORMAL | TYPE_FIXED => {}
            TYPE_UNDO => return Err(unsupported("undo VDI images (image type 3) are not supported")),
            TYPE_DIFF => {
                return Err(unsupported(
                    "differencing VDI images (image type 4) are not supported (QEMU refuses them too)",
                ))
            }
            t => return Err(corrupt(format!("unknown VDI image type {t}"))),
        }
        let uuid_null = |at: usize| b[at..at + 16].iter().all(|&x| x == 0);
        if !uuid_null(off::UUID_LINK) || !uuid_null(off::UUID_PARENT) {
            return Err(unsupported(
                "VDI images linked to a parent (non-null link or parent UUID) are not supported",
            ));
        }
        let sector_size = f(off::SECTOR_SIZE);
        if sector_size != SECTOR as u32 {
            return Err(unsupported(format!(
                "VDI sector size {sector_size} is not supported (only 512)"
            )));
        }
        let offset_bmap = u64::from(f(off::OFFSET_BMAP));
        let offset_data = u64::from(f(off::OFFSET_DATA));
        if offset_bmap % SECTOR != 0 || offset_data % SECTOR != 0 {
            return Err(unsupported(format!(
                "VDI block map ({offset_bmap:#x}) or data ({offset_data:#x}) offsets not sector aligned"
            )));
        }
        let header_end = HEADER_START + u64::from(header_size);
        if offset_bmap < header_end {
            return Err(corrupt(format!(
                "VDI block map at {offset_bmap:#x} overlaps the header (ends {header_end:#x})"
            )));
        }
        let block_size = f(off::BLOCK_SIZE);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(corrupt(format!(
                "VDI block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        let block_extra = f(off::BLOCK_EXTRA);
        if block_extra != 0 {
            return Err(unsupported(format!(
                "VDI images with per-block extra data ({block_extra} bytes) are not supported"
            )));
        }
        let blocks_in_image = f(off::BLOCKS_IN_IMAGE);
        if blocks_in_image > MAX_BLOCKS {
            return Err(corrupt(format!(
                "VDI image has {blocks_in_image} blocks, more than the maximum {MAX_BLOCKS}"
            )));
        }
        let blocks_allocated = f(off::BLOCKS_ALLOCATED);
        if blocks_allocated > blocks_in_image {
            return Err(corrupt(format!(
                "VDI header counts {blocks_allocated} allocated blocks of only {blocks_in_image}"
            )));
        }
        let raw_size = le64(b, off::DISK_SIZE).expect("within the header sector");
        let capacity = u64::from(blocks_in_image) * u64::from(block_size);
        if raw_size > capacity {
            return Err(corrupt(format!(
                "VDI disk size {raw_size} exceeds its block map ({blocks_in_image} blocks of {block_size} bytes)"
            )));
        }
        // Cannot overflow: capacity < 2^29 * 2^28.
        let disk_size = raw_size.div_ceil(SECTOR) * SECTOR;
        let bmap_end = offset_bmap + 4 * u64::from(blocks_in_image);
        if bmap_end > file_len {
            return Err(corrupt(format!(
                "VDI block map ({blocks_in_image} entries at {offset_bmap:#x}) extends past the end of the file ({file_len} bytes)"
            )));
        }
        if offset_data < bmap_end {
            return Err(corrupt(format!(
                "VDI data offset {offset_data:#x} overlaps the block map (ends {bmap_end:#x})"
            )));
        }
        Ok(Header {
            image_type,
            offset_bmap,
            offset_data,
            disk_size,
            block_size,
            blocks_in_image,
            blocks_allocated,
        })
    }
}

/// The allocation state, behind one mutex.
struct Alloc {
    /// `blocks_allocated` as last written to the header.
    header_count: u32,
    /// The data block index the next allocation takes.
    next: u32,
}

pub struct Vdi {
    storage: Arc<dyn Storage>,
    header: Header,
    block_shift: u32,
    bmap: Vec<AtomicU32>,
    alloc: Mutex<Alloc>,
    /// One past the highest data block the map referenced at open.
    map_end: u32,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let vdi = Vdi::open(storage)?;
    if !ctx.read_only && !ctx.check && vdi.repair_count()? {
        crate::events::repaired_on_open(
            Format::Vdi,
            ctx.location,
            "its count of allocated blocks disagreed with the block map (an interrupted allocation): set from the map",
        );
    }
    Ok(Box::new(vdi))
}

impl Vdi {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Vdi> {
        let file_len = storage.len()?;
        let mut sector = [0u8; HEADER_SECTOR];
        storage.read_at(&mut sector, 0)?;
        let header = Header::parse(&sector, file_len)?;
        let n = header.blocks_in_image as usize;
        let mut bmap = Vec::new();
        bmap.try_reserve_exact(n)
            .map_err(|_| crate::Error::NoMemory(format!("cannot allocate the VDI block map ({n} entries)")))?;
        // One bit per data block, to find two guest blocks sharing one data
        // block (a write to one would change the other).
        let mut used = try_zeroed(n.div_ceil(8), "the VDI block map check")?;
        let mut max_ref: Option<u32> = None;
        // Read in 1 MiB pieces: the map itself is the only copy we keep.
        let mut chunk = vec![0u8; (n * 4).min(1 << 20)];
        let mut i = 0usize;
        while i < n {
            let k = (n - i).min(chunk.len() / 4);
            storage.read_at(&mut chunk[..4 * k], header.offset_bmap + 4 * i as u64)?;
            for e in chunk[..4 * k].chunks_exact(4) {
                let e = u32::from_le_bytes(e.try_into().expect("4 bytes"));
                if is_allocated(e) {
                    if e >= header.blocks_in_image {
                        return Err(corrupt(format!(
                            "VDI block map entry {i} points to data block {e}, beyond the {} blocks of the image",
                            header.blocks_in_image
                        )));
                    }
                    let (byte, bit) = ((e / 8) as usize, 1u8 << (e % 8));
                    if used[byte] & bit != 0 {
                        return Err(corrupt(format!(
                            "VDI data block {e} is used twice (again by block map entry {i})"
                        )));
                    }
                    used[byte] |= bit;
                    max_ref = Some(max_ref.map_or(e, |m| m.max(e)));
                }
                bmap.push(AtomicU32::new(e));
                i += 1;
            }
        }
        // After a crash between the bmap and the header update the header
        // count lags behind the map: never hand out a referenced block again.
        let next = header.blocks_allocated.max(max_ref.map_or(0, |m| m + 1));
        let map_end = max_ref.map_or(0, |m| m + 1);
        let alloc = Mutex::new(Alloc {
            header_count: header.blocks_allocated,
            next,
        });
        let block_shift = header.block_size.trailing_zeros();
        Ok(Vdi {
            storage,
            header,
            block_shift,
            bmap,
            alloc,
            map_end,
        })
    }

    /// A crash between an allocation's writes leaves the header's count of
    /// allocated blocks off by one from the map (which QEMU's check calls
    /// corruption): a writable open sets it to the end of what the map
    /// references, where allocation continues (a block written but never
    /// mapped is unreferenced and taken again). Returns whether the count
    /// had to be repaired.
    fn repair_count(&self) -> Result<bool> {
        let mut st = self.alloc.lock();
        if st.header_count == self.map_end {
            return Ok(false);
        }
        self.storage
            .write_at(&self.map_end.to_le_bytes(), off::BLOCKS_ALLOCATED as u64)?;
        self.storage.flush()?;
        st.header_count = self.map_end;
        st.next = self.map_end;
        Ok(true)
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    fn host_of(&self, entry: u32) -> u64 {
        self.header.offset_data + (u64::from(entry) << self.block_shift)
    }

    /// Allocate a data block for guest block `bi` and write `buf` at
    /// `within` into it; the rest of the block reads as what lies below.
    ///
    /// Crash order: the data block first (past every referenced block, so
    /// a crash leaves at most unreferenced bytes), then the bmap entry (the
    /// block becomes visible), then the header's `blocks_allocated` (a crash
    /// before it leaves the count one short; `open` takes the map's highest
    /// reference into account so the block is never handed out twice).
    fn allocate(&self, bi: usize, within: u64, buf: &[u8], below: &dyn Below) -> Result<()> {
        let mut st = self.alloc.lock();
        let e = self.bmap[bi].load(Ordering::Acquire);
        if is_allocated(e) {
            // Another writer allocated it meanwhile.
            return self.storage.write_at(buf, self.host_of(e) + within);
        }
        let idx = st.next;
        if idx >= self.header.blocks_in_image {
            return Err(corrupt(format!(
                "VDI image has no free data block left ({} blocks, next {idx})",
                self.header.blocks_in_image
            )));
        }
        let bs = self.block_size();
        let host = self.host_of(idx);
        let file_len = self.storage.len()?;
        let whole = within == 0 && buf.len() as u64 == bs;
        if whole {
            self.storage.write_at(buf, host)?;
        } else if host >= file_len && !below.has_backing() {
            // Beyond the end of the file: the untouched parts of the block
            // read as zeroes once the file covers them.
            self.storage.write_at(buf, host + within)?;
            if self.storage.len()? < host + bs {
                self.storage.set_len(host + bs)?;
            }
        } else {
            let mut block = try_zeroed(bs as usize, "a VDI block")?;
            below.read_below(&mut block, (bi as u64) << self.block_shift)?;
            block[within as usize..within as usize + buf.len()].copy_from_slice(buf);
            self.storage.write_at(&block, host)?;
        }
        self.storage
            .write_at(&idx.to_le_bytes(), self.header.offset_bmap + 4 * bi as u64)?;
        self.bmap[bi].store(idx, Ordering::Release);
        st.next = idx + 1;
        st.header_count = idx + 1;
        self.storage
            .write_at(&st.header_count.to_le_bytes(), off::BLOCKS_ALLOCATED as u64)?;
        Ok(())
    }

    /// Split `[offset, offset+len)` into per-block pieces: (block, within, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let bs = self.block_size();
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let within = pos & (bs - 1);
            let n = (bs - within).min(end - pos);
            let item = ((pos >> self.block_shift) as usize, within, n);
            pos += n;
            Some(item)
        })
    }
}

impl Driver for Vdi {
    /// `qemu-img check` for vdi, as QEMU's: the count of allocated blocks in
    /// the header must match the block map (entries beyond the image or
    /// used twice are refused at open already). QEMU repairs nothing here
    /// and refuses `-r` as "does not support checks"; so do we.
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None {
            return Err(unsupported(
                "This image format does not support checks (vdi cannot be repaired)",
            ));
        }
        let header_count = self.alloc.lock().header_count;
        let counted = self
            .bmap
            .iter()
            .filter(|e| is_allocated(e.load(Ordering::Acquire)))
            .count() as u64;
        let mut rep = CheckReport::default();
        if counted != u64::from(header_count) {
            rep.corruptions += 1;
            rep.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {counted}, should be {header_count}"
            ));
        }
        Ok(rep)
    }

    fn format(&self) -> Format {
        Format::Vdi
    }
    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let bs = self.block_size();
        let bi = (offset >> self.block_shift) as usize;
        let within = offset & (bs - 1);
        let first = self.bmap[bi].load(Ordering::Acquire);
        // Extend the run over following blocks that map the same way:
        // consecutive data blocks, or blocks that are all unallocated.
        let mut run = bs - within;
        let mut prev = first;
        let mut i = bi + 1;
        while run < len && i < self.bmap.len() {
            let e = self.bmap[i].load(Ordering::Acquire);
            let same = if is_allocated(first) {
                is_allocated(e) && e == prev + 1
            } else {
                !is_allocated(e)
            };
            if !same {
                break;
            }
            prev = e;
            run += bs;
            i += 1;
        }
        let kind = if is_allocated(first) {
            Mapped::Data {
                file: 0,
                offset: self.host_of(first) + within,
            }
        } else {
            // QEMU reports unallocated VDI blocks as allocated zeroes: the
            // format has no backing file, they read as zeroes by definition.
            Mapped::Zero { host: None }
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
        let mut done = 0usize;
        for (bi, within, n) in self.pieces(offset, buf.len() as u64) {
            let chunk = &buf[done..done + n as usize];
            let e = self.bmap[bi].load(Ordering::Acquire);
            if is_allocated(e) {
                self.storage.write_at(chunk, self.host_of(e) + within)?;
            } else {
                self.allocate(bi, within, chunk, below)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        for (bi, within, n) in self.pieces(offset, len) {
            let e = self.bmap[bi].load(Ordering::Acquire);
            if is_allocated(e) {
                self.storage.write_zeroes(self.host_of(e) + within, n)?;
            } else if below.has_backing() {
                let zero = try_zeroed(n as usize, "VDI zeroes")?;
                self.allocate(bi, within, &zero, below)?;
            }
            // An unallocated block already reads as zeroes.
        }
        Ok(())
    }

    /// QEMU's vdi driver has no discard; the data stays (a discard is a hint).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo {
            cluster_size: Some(self.block_size()),
            ..Default::default()
        })
    }
}

/// 16 random bytes shaped as an RFC 4122 version 4 UUID.
fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
        .is_ok();
    if !ok {
        for (i, half) in u.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The first sector and the block map of a new image.
fn new_image(size: u64, fixed: bool, block_size: u32) -> Result<(Vec<u8>, Vec<u8>, u64)> {
    let bs = u64::from(block_size);
    let blocks = size.div_ceil(bs);
    if blocks > u64::from(MAX_BLOCKS) {
        return Err(invalid(format!(
            "VDI size {size} needs more than {MAX_BLOCKS} blocks of {block_size} bytes"
        )));
    }
    let blocks = blocks as u32;
    let bmap_size = (4 * u64::from(blocks)).div_ceil(SECTOR) * SECTOR;
    let offset_bmap = HEADER_SECTOR as u64;
    let offset_data = offset_bmap + bmap_size;
    let mut h = vec![0u8; HEADER_SECTOR];
    h[..TEXT.len()].copy_from_slice(TEXT);
    let put32 = |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut h, off::SIGNATURE, SIGNATURE);
    put32(&mut h, off::VERSION, VERSION_1_1);
    put32(&mut h, off::HEADER_SIZE, HEADER_V1_1_SIZE);
    put32(&mut h, off::IMAGE_TYPE, if fixed { TYPE_FIXED } else { TYPE_NORMAL });
    put32(&mut h, off::OFFSET_BMAP, offset_bmap as u32);
    put32(&mut h, off::OFFSET_DATA, offset_data as u32);
    put32(&mut h, off::SECTOR_SIZE, SECTOR as u32);
    h[off::DISK_SIZE..off::DISK_SIZE + 8].copy_from_slice(&size.to_le_bytes());
    put32(&mut h, off::BLOCK_SIZE, block_size);
    put32(&mut h, off::BLOCKS_IN_IMAGE, blocks);
    put32(&mut h, off::BLOCKS_ALLOCATED, if fixed { blocks } else { 0 });
    h[off::UUID_IMAGE..off::UUID_IMAGE + 16].copy_from_slice(&random_uuid());
    h[off::UUID_LAST_SNAP..off::UUID_LAST_SNAP + 16].copy_from_slice(&random_uuid());
    let mut bmap = try_zeroed(bmap_size as usize, "the VDI block map")?;
    for (i, e) in bmap.chunks_exact_mut(4).enumerate() {
        let v = if fixed && (i as u64) < u64::from(blocks) {
            i as u32
        } else if (i as u64) < u64::from(blocks) {
            UNALLOCATED
        } else {
            0
        };
        e.copy_from_slice(&v.to_le_bytes());
    }
    let end = offset_data + if fixed { u64::from(blocks) * bs } else { 0 };
    Ok((h, bmap, end))
}

/// Write a new image onto `storage` (any previous content is dropped).
pub fn create_on(storage: &dyn Storage, size: u64, fixed: bool, block_size: u32) -> Result<()> {
    let (h, bmap, end) = new_image(size, fixed, block_size)?;
    storage.set_len(0)?;
    storage.write_at(&h, 0)?;
    storage.write_at(&bmap, HEADER_SECTOR as u64)?;
    storage.set_len(end)?;
    storage.flush()
}

fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let fixed = opts.take_bool("static")?.unwrap_or(false);
    let block_size = opts.take_u64("cluster_size")?.unwrap_or(u64::from(DEFAULT_BLOCK_SIZE));
    opts.finish("vdi")?;
    if block_size != u64::from(DEFAULT_BLOCK_SIZE) {
        // QEMU reads only 1 MiB blocks: images we write must stay readable.
        return Err(invalid(format!("VDI block size must be 1 MiB, not {block_size}")));
    }
    if size % SECTOR != 0 {
        return Err(invalid(format!("VDI size {size} is not a multiple of 512")));
    }
    let max = u64::from(MAX_BLOCKS) * u64::from(DEFAULT_BLOCK_SIZE);
    if size > max {
        return Err(invalid(format!("VDI size {size} exceeds the maximum {max}")));
    }
    let storage = location.create_storage()?;
    create_on(storage.as_ref(), size, fixed, DEFAULT_BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;
    use crate::error::ErrorKind;

    const MIB: u64 = 1 << 20;

    fn image(size: u64, fixed: bool) -> Vec<u8> {
        let s = MemoryStorage::new(Vec::new(), false);
        create_on(&s, size, fixed, DEFAULT_BLOCK_SIZE).unwrap();
        s.into_inner()
    }

    fn open_bytes(b: Vec<u8>) -> Result<Vdi> {
        Vdi::open(Arc::new(MemoryStorage::new(b, false)))
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn kind_of(b: Vec<u8>) -> ErrorKind {
        match open_bytes(b) {
            Ok(_) => panic!("opened"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn created_image_parses() {
        let b = image(5 * MIB, false);
        assert_eq!(b.len(), 1024);
        let h = Header::parse(&b[..512], b.len() as u64).unwrap();
        assert_eq!(h.offset_bmap, 512);
        assert_eq!(h.offset_data, 1024);
        assert_eq!(h.blocks_in_image, 5);
        assert_eq!(h.blocks_allocated, 0);
        assert_eq!(h.disk_size, 5 * MIB);
        assert_eq!(probe(&b, &MemoryStorage::new(Vec::new(), true)), 100);
        let f = image(3 * MIB, true);
        assert_eq!(f.len() as u64, 1024 + 3 * MIB);
        let v = open_bytes(f).unwrap();
        assert_eq!(
            v.map(0, 3 * MIB).unwrap(),
            Mapping {
                kind: Mapped::Data { file: 0, offset: 1024 },
                len: 3 * MIB
            }
        );
    }

    #[test]
    fn write_allocates_in_order_and_reopens() {
        let s = Arc::new(MemoryStorage::new(image(4 * MIB, false), false));
        let v = Vdi::open(s.clone()).unwrap();
        assert_eq!(
            v.map(0, 4 * MIB).unwrap(),
            Mapping {
                kind: Mapped::Zero { host: None },
                len: 4 * MIB
            }
        );
        v.write_at(&[7u8; 100], 3 * MIB + 5, &NoBacking).unwrap();
        v.write_at(&[9u8; 10], MIB - 5, &NoBacking).unwrap();
        let b = s.snapshot();
        assert_eq!(le32(&b, off::BLOCKS_ALLOCATED), Some(3));
        assert_eq!(le32(&b, 512), Some(1));
        assert_eq!(le32(&b, 516), Some(2));
        assert_eq!(le32(&b, 524), Some(0));
        assert_eq!(b.len() as u64, 1024 + 3 * MIB);
        assert_eq!(b[1024 + 5], 7);
        assert_eq!(b[1024 + 2 * MIB as usize - 5], 9);
        let v2 = open_bytes(b).unwrap();
        assert_eq!(
            v2.map(MIB - 1, 2).unwrap(),
            Mapping {
                kind: Mapped::Data {
                    file: 0,
                    offset: 1024 + 2 * MIB - 1
                },
                len: 2
            }
        );
        assert_eq!(v2.alloc.lock().next, 3);
    }

    #[test]
    fn lagging_header_count_is_not_reused() {
        let mut b = image(4 * MIB, false);
        put32(&mut b, 512, 0);
        put32(&mut b, 516, 1);
        // blocks_allocated left at 0, as after a crash before the header write.
        let v = open_bytes(b).unwrap();
        assert_eq!(v.alloc.lock().next, 2);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let base = image(4 * MIB, false);
        type Patch = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Patch, ErrorKind)> = vec![
            ("truncated", Box::new(|b| b.truncate(300)), ErrorKind::CorruptImage),
            (
                "signature",
                Box::new(|b| put32(b, off::SIGNATURE, 1)),
                ErrorKind::CorruptImage,
            ),
            (
                "version 1.0",
                Box::new(|b| put32(b, off::VERSION, 0x0001_0000)),
                ErrorKind::Unsupported,
            ),
            (
                "header size",
                Box::new(|b| put32(b, off::HEADER_SIZE, 0x100)),
                ErrorKind::CorruptImage,
            ),
            (
                "type 0",
                Box::new(|b| put32(b, off::IMAGE_TYPE, 0)),
                ErrorKind::CorruptImage,
            ),
            (
                "type diff",
                Box::new(|b| put32(b, off::IMAGE_TYPE, TYPE_DIFF)),
                ErrorKind::Unsupported,
            ),
            (
                "parent uuid",
                Box::new(|b| b[off::UUID_PARENT] = 1),
                ErrorKind::Unsupported,
            ),
            (
                "bmap in header",
                Box::new(|b| put32(b, off::OFFSET_BMAP, 0)),
                ErrorKind::CorruptImage,
            ),
            (
                "bmap unaligned",
                Box::new(|b| put32(b, off::OFFSET_BMAP, 0x201)),
                ErrorKind::Unsupported,
            ),
            (
                "block size 0",
                Box::new(|b| put32(b, off::BLOCK_SIZE, 0)),
                ErrorKind::CorruptImage,
            ),
            (
                "block size 3M",
                Box::new(|b| put32(b, off::BLOCK_SIZE, 3 << 20)),
                ErrorKind::CorruptImage,
            ),
            (
                "block extra",
                Box::new(|b| put32(b, off::BLOCK_EXTRA, 512)),
                ErrorKind::Unsupported,
            ),
            (
                "sector size",
                Box::new(|b| put32(b, off::SECTOR_SIZE, 4096)),
                ErrorKind::Unsupported,
            ),
            (
                "too many blocks",
                Box::new(|b| put32(b, off::BLOCKS_IN_IMAGE, u32::MAX)),
                ErrorKind::CorruptImage,
            ),
            (
                "bmap past eof",
                Box::new(|b| put32(b, off::BLOCKS_IN_IMAGE, 1 << 20)),
                ErrorKind::CorruptImage,
            ),
            (
                "allocated > blocks",
                Box::new(|b| put32(b, off::BLOCKS_ALLOCATED, 5)),
                ErrorKind::CorruptImage,
            ),
            (
                "disk size > map",
                Box::new(|b| b[off::DISK_SIZE..off::DISK_SIZE + 8].copy_from_slice(&(5 * MIB).to_le_bytes())),
                ErrorKind::CorruptImage,
            ),
            (
                "huge disk size",
                Box::new(|b| b[off::DISK_SIZE..off::DISK_SIZE + 8].copy_from_slice(&u64::MAX.to_le_bytes())),
                ErrorKind::CorruptImage,
            ),
            (
                "data overlaps bmap",
                Box::new(|b| put32(b, off::OFFSET_DATA, 512)),
                ErrorKind::CorruptImage,
            ),
            (
                "entry too large",
                Box::new(|b| put32(b, 512, 4)),
                ErrorKind::CorruptImage,
            ),
            (
                "entry twice",
                Box::new(|b| {
                    put32(b, 512, 1);
                    put32(b, 520, 1)
                }),
                ErrorKind::CorruptImage,
            ),
        ];
        for (name, patch, kind) in cases {
            let mut b = base.clone();
            patch(&mut b);
            assert_eq!(kind_of(b), kind, "{name}");
        }
    }

    #[test]
    fn markers_read_as_zero_and_runs_merge() {
        let mut b = image(4 * MIB, false);
        put32(&mut b, 512, DISCARDED);
        put32(&mut b, 520, 0);
        put32(&mut b, 524, 1);
        put32(&mut b, off::BLOCKS_ALLOCATED, 2);
        let v = open_bytes(b).unwrap();
        assert_eq!(
            v.map(0, 4 * MIB).unwrap(),
            Mapping {
                kind: Mapped::Zero { host: None },
                len: 2 * MIB
            }
        );
        assert_eq!(
            v.map(2 * MIB, 2 * MIB).unwrap(),
            Mapping {
                kind: Mapped::Data { file: 0, offset: 1024 },
                len: 2 * MIB
            }
        );
    }

    /// Random byte and word mutations of a valid image with data: opening,
    /// mapping the whole disk and writing must never panic.
    #[test]
    fn mutated_images_never_panic() {
        let s = Arc::new(MemoryStorage::new(image(3 * MIB, false), false));
        let v = Vdi::open(s.clone()).unwrap();
        v.write_at(&[5u8; 3000], MIB + 10, &NoBacking).unwrap();
        v.write_at(&[6u8; 3000], 10, &NoBacking).unwrap();
        let base = s.snapshot();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let fields = [
            0x40usize, 0x44, 0x48, 0x4c, 0x154, 0x158, 0x168, 0x170, 0x174, 0x178, 0x17c, 0x180, 0x184, 0x200, 0x204,
            0x208,
        ];
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..(next() % 3 + 1) {
                let at = fields[(next() % fields.len() as u64) as usize];
                let v = [
                    0u32,
                    1,
                    2,
                    3,
                    512,
                    0x200,
                    0x400,
                    1 << 20,
                    u32::MAX,
                    0xffff_fffe,
                    0x1fff_ff80,
                ][(next() % 11) as usize];
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                if next() % 3 == 0 {
                    let at = (next() % 0x220) as usize;
                    b[at] = next() as u8;
                }
            }
            let Ok(v) = open_bytes(b) else { continue };
            let size = v.virtual_size();
            let mut pos = 0;
            let mut steps = 0;
            while pos < size && steps < 10_000 {
                let m = v.map(pos, size - pos).unwrap();
                assert!(m.len >= 1);
                pos += m.len;
                steps += 1;
            }
            if size > 0 {
                let _ = v.write_at(&[1u8; 700], size / 2, &NoBacking);
            }
        }
    }
}
