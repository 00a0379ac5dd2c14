//! dmg: Apple's Universal Disk Image Format (UDIF), read-only, as QEMU's
//! block/dmg.c reads it.
//!
//! The file ends with a 512-byte trailer, the "koly" block (big-endian):
//!
//! | offset | size | field                                      |
//! |--------|------|--------------------------------------------|
//! | 0x000  | 4    | signature "koly"                           |
//! | 0x004  | 4    | version (4)                                |
//! | 0x008  | 4    | header size (512)                          |
//! | 0x018  | 8    | data fork offset                           |
//! | 0x020  | 8    | data fork length                           |
//! | 0x028  | 8    | resource fork offset                       |
//! | 0x030  | 8    | resource fork length                       |
//! | 0x0d8  | 8    | XML property list offset                   |
//! | 0x0e0  | 8    | XML property list length                   |
//! | 0x1ec  | 8    | sector count of the disk                   |
//!
//! The block map is a list of "mish" blocks (see [`blkx`]), taken from the
//! resource fork when it has a length, else from the XML property list.
//! Each maps a run of 512-byte guest sectors to a chunk of the data fork:
//! zeroes (UDZE), ignored = zeroes (UDIG), stored (UDRW), or compressed with
//! ADC (UDCO), zlib (UDZO), bzip2 (UDBZ) or LZFSE (ULFO); see [`codec`].
//!
//! Reads: stored chunks map straight to the file, zero chunks to zeroes,
//! compressed chunks decode whole (at most 64 MiB each, QEMU's cap) into a
//! per-thread cache of the last chunk, so sequential small reads decode a
//! chunk once. Sectors no chunk describes, and chunks of unknown type,
//! fail to read (QEMU fails them too) while the rest of the disk reads.
//!
//! Block status reports what the map says (zero chunks as zeroes, stored
//! chunks as data at their file offset, compressed chunks as compressed
//! data). QEMU has no block status for dmg and reports the whole disk as
//! data; the bytes read are the same.
//!
//! Differences from QEMU, all on images QEMU cannot read either: ADC chunks
//! decode (QEMU skips them); a blkx resource that is not a mish block,
//! overlapping chunks, stored or compressed bytes beyond the end of the
//! file, and a stored chunk shorter than its sectors are corrupt at open
//! (QEMU reads stale or zero bytes there). The trailer must be the last
//! 512 bytes (QEMU also searches three bytes around, because its file
//! length is rounded up to whole sectors; ours is exact).
//!
//! Writing: refused. A writable open fails with `Unsupported` (as QEMU's
//! dmg refuses read-write use), so no write lock is taken on the file.

pub mod blkx;
pub mod codec;
#[cfg(test)]
mod tests;

use super::bytes::{be32, be64, tail512};
use crate::backend::Storage;
use crate::driver::{Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::registry::{FormatEntry, OpenCtx};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Dmg,
    probe: Some(probe),
    open: Some(open),
    create: None,
};

pub const SECTOR: u64 = 512;
pub const KOLY_MAGIC: &[u8; 4] = b"koly";
pub const TRAILER_SIZE: u64 = 512;
const OFF_DATA_FORK: usize = 0x18;
const OFF_RSRC_FORK: usize = 0x28;
const OFF_RSRC_LEN: usize = 0x30;
const OFF_XML: usize = 0xd8;
const OFF_XML_LEN: usize = 0xe0;
const OFF_SECTORS: usize = 0x1ec;

/// QEMU's cap on a chunk's stored length and decoded size: "to prevent
/// unreasonable amounts of memory being used" for one chunk's buffers.
pub const DMG_LENGTHS_MAX: u64 = 64 << 20;
pub const DMG_SECTORCOUNTS_MAX: u64 = DMG_LENGTHS_MAX / SECTOR;
/// QEMU's cap on the XML property list ("a test sample had a XML length
/// of about 1 MiB").
pub const MAX_XML: u64 = 16 << 20;
/// The resource fork is read whole; 64 MiB holds over 1.5 million chunk
/// entries, far more than any image hdiutil writes in that form.
pub const MAX_RSRC_FORK: u64 = 64 << 20;
/// Chunks in the table (32 bytes each: 64 MiB at most). A chunk maps at
/// least one sector and QEMU's 16 MiB XML cap allows about 300 000.
pub const MAX_CHUNKS: usize = 1 << 21;
/// Disk size in sectors: byte offsets stay below 2^62, within a signed
/// 64-bit file offset.
pub const MAX_SECTORS: u64 = (1 << 62) / SECTOR;

fn probe(_h: &[u8], s: &dyn Storage) -> u32 {
    // QEMU probes dmg by the file name only; the trailer's signature,
    // version 4 and size 512 are as reliable as any leading magic.
    match tail512(s) {
        Some(t) if t.starts_with(KOLY_MAGIC) && be32(&t, 4) == Some(4) && be32(&t, 8) == Some(512) => 100,
        Some(t) if t.starts_with(KOLY_MAGIC) => 50,
        _ => 0,
    }
}

/// How one chunk of the block map decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Zero,
    Ignore,
    Raw,
    Adc,
    Zlib,
    Bzip2,
    Lzfse,
    Unknown(u32),
}

impl ChunkKind {
    pub fn is_zero(self) -> bool {
        matches!(self, ChunkKind::Zero | ChunkKind::Ignore)
    }
}

/// One entry of the block map, checked: `sectors >= 1`, and for stored or
/// compressed chunks `[offset, offset+length)` lies inside the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First guest sector.
    pub start: u64,
    pub sectors: u64,
    /// Absolute file offset of the stored bytes.
    pub offset: u64,
    pub length: u64,
    pub kind: ChunkKind,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.sectors
    }
}

/// The fields of the koly trailer that locate everything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub data_fork_offset: u64,
    pub rsrc_offset: u64,
    pub rsrc_len: u64,
    pub xml_offset: u64,
    pub xml_len: u64,
    pub sectors: u64,
}

impl Trailer {
    /// Parse the trailer found at `koly_at`; the forks must lie before it
    /// (QEMU's checks), the disk size below [`MAX_SECTORS`].
    pub fn parse(t: &[u8], koly_at: u64) -> Result<Trailer> {
        if t.len() < TRAILER_SIZE as usize || !t.starts_with(KOLY_MAGIC) {
            return Err(corrupt("no koly trailer in the last 512 bytes"));
        }
        let f = |at| be64(t, at).unwrap_or(0);
        let tr = Trailer {
            data_fork_offset: f(OFF_DATA_FORK),
            rsrc_offset: f(OFF_RSRC_FORK),
            rsrc_len: f(OFF_RSRC_LEN),
            xml_offset: f(OFF_XML),
            xml_len: f(OFF_XML_LEN),
            sectors: f(OFF_SECTORS),
        };
        if tr.data_fork_offset > koly_at {
            return Err(corrupt(format!(
                "data fork offset {} is past the trailer at {koly_at}",
                tr.data_fork_offset
            )));
        }
        if tr.rsrc_offset >= koly_at || tr.rsrc_len > koly_at - tr.rsrc_offset {
            return Err(corrupt(format!(
                "resource fork at {} of {} bytes does not end before the trailer at {koly_at}",
                tr.rsrc_offset, tr.rsrc_len
            )));
        }
        if tr.xml_offset >= koly_at || tr.xml_len > koly_at - tr.xml_offset {
            return Err(corrupt(format!(
                "XML property list at {} of {} bytes does not end before the trailer at {koly_at}",
                tr.xml_offset, tr.xml_len
            )));
        }
        if tr.sectors > MAX_SECTORS {
            return Err(corrupt(format!("sector count {} is too large", tr.sectors)));
        }
        if tr.rsrc_len == 0 && tr.xml_len == 0 {
            return Err(corrupt(
                "the trailer locates neither a resource fork nor an XML property list",
            ));
        }
        Ok(tr)
    }
}

/// Distinguishes driver instances in the per-thread chunk cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last chunk this thread decoded: (driver id, chunk index, bytes).
    static DECODED: RefCell<(u64, usize, Vec<u8>)> = const { RefCell::new((0, 0, Vec::new())) };
}

pub struct Dmg {
    storage: Arc<dyn Storage>,
    size: u64,
    chunks: Vec<Chunk>,
    id: u64,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    if !ctx.read_only {
        return Err(unsupported("dmg images are read-only: open the image read-only"));
    }
    Ok(Box::new(Dmg::open(storage)?))
}

impl Dmg {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Dmg> {
        let file_len = storage.len()?;
        if file_len < TRAILER_SIZE {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the 512-byte koly trailer"
            )));
        }
        let koly_at = file_len - TRAILER_SIZE;
        let mut t = [0u8; TRAILER_SIZE as usize];
        storage.read_at(&mut t, koly_at)?;
        let tr = Trailer::parse(&t, koly_at)?;
        let src = blkx::MapSource {
            file_len,
            data_fork_offset: tr.data_fork_offset,
        };
        let chunks = if tr.rsrc_len != 0 {
            blkx::from_resource_fork(storage.as_ref(), &src, tr.rsrc_offset, tr.rsrc_len)?
        } else {
            blkx::from_xml(storage.as_ref(), &src, tr.xml_offset, tr.xml_len)?
        };
        let chunks = blkx::finish(chunks, tr.sectors)?;
        Ok(Dmg {
            storage,
            size: tr.sectors * SECTOR,
            chunks,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Index of the chunk holding `sector`, or Err(index of the next chunk)
    /// when no chunk does.
    fn find(&self, sector: u64) -> std::result::Result<usize, usize> {
        let i = self.chunks.partition_point(|c| c.end() <= sector);
        match self.chunks.get(i) {
            Some(c) if c.start <= sector => Ok(i),
            _ => Err(i),
        }
    }

    fn decode(&self, c: &Chunk, out: &mut [u8]) -> Result<()> {
        // The streaming decoders read the stored bytes in pieces; ADC (at
        // most DMG_LENGTHS_MAX stored bytes) takes them whole.
        let stored = || codec::Stored::new(self.storage.as_ref(), c.offset, c.length);
        let r = match c.kind {
            ChunkKind::Zlib => codec::zlib_pieces(&mut stored()?, out),
            ChunkKind::Bzip2 => codec::bzip2_pieces(&mut stored()?, out),
            ChunkKind::Lzfse => codec::lzfse_stored(stored()?, out),
            ChunkKind::Adc => {
                let mut input = try_zeroed(c.length as usize, "a compressed dmg chunk")?;
                self.storage.read_at(&mut input, c.offset)?;
                codec::adc(&input, out)
            }
            k => {
                return Err(crate::error::Error::Internal(format!(
                    "dmg chunk of kind {k:?} is not encoded"
                )))
            }
        };
        r.map_err(|e| e.context(format!("chunk at sector {}", c.start)))
    }
}

impl Drop for Dmg {
    fn drop(&mut self) {
        // Free this thread's decoded chunk if it is ours (other threads
        // free theirs when they next decode, or exit).
        let _ = DECODED.try_with(|d| {
            if let Ok(mut d) = d.try_borrow_mut() {
                if d.0 == self.id {
                    *d = (0, 0, Vec::new());
                }
            }
        });
    }
}

impl Driver for Dmg {
    fn format(&self) -> Format {
        Format::Dmg
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let sector = offset / SECTOR;
        let i = match self.find(sector) {
            Ok(i) => i,
            Err(next) => {
                // Undescribed sectors: read_encoded reports them.
                let end = self.chunks.get(next).map_or(self.size, |c| c.start * SECTOR);
                return Ok(Mapping {
                    kind: Mapped::Encoded,
                    len: (end - offset).min(len),
                });
            }
        };
        let c = &self.chunks[i];
        let within = offset - c.start * SECTOR;
        let mut run = c.sectors * SECTOR - within;
        let kind = match c.kind {
            k if k.is_zero() => Mapped::Zero { host: None },
            ChunkKind::Raw => Mapped::Data {
                file: 0,
                offset: c.offset + within,
            },
            _ => {
                return Ok(Mapping {
                    kind: Mapped::Encoded,
                    len: run.min(len),
                })
            }
        };
        // Extend over following chunks that continue the same mapping.
        let mut prev = c;
        for n in &self.chunks[i + 1..] {
            if run >= len || n.start != prev.end() {
                break;
            }
            let continues = match kind {
                Mapped::Zero { .. } => n.kind.is_zero(),
                _ => n.kind == ChunkKind::Raw && n.offset == prev.offset + prev.sectors * SECTOR,
            };
            if !continues {
                break;
            }
            run += n.sectors * SECTOR;
            prev = n;
        }
        Ok(Mapping {
            kind,
            len: run.min(len),
        })
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }

    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let sector = offset / SECTOR;
        let i = self
            .find(sector)
            .map_err(|_| corrupt(format!("no chunk of the dmg block map describes sector {sector}")))?;
        let c = &self.chunks[i];
        if let ChunkKind::Unknown(t) = c.kind {
            return Err(unsupported(format!(
                "dmg chunk type {t:#010x} (at sector {}) cannot be read",
                c.start
            )));
        }
        let size = (c.sectors * SECTOR) as usize;
        let from = (offset - c.start * SECTOR) as usize;
        let to = from + buf.len();
        if to > size {
            return Err(crate::error::Error::Internal(format!(
                "dmg read at {offset} crosses its chunk"
            )));
        }
        if buf.len() == size {
            // The whole chunk: decode in place, leave the cache alone.
            return self.decode(c, buf);
        }
        DECODED.with(|d| {
            let mut d = d.borrow_mut();
            if d.0 != self.id || d.1 != i || d.2.len() != size {
                d.0 = 0;
                if d.2.capacity() > 2 * size.max(1 << 20) {
                    d.2 = Vec::new();
                }
                d.2.clear();
                d.2.try_reserve_exact(size).map_err(|_| {
                    crate::error::Error::NoMemory(format!("cannot allocate {size} bytes for a dmg chunk"))
                })?;
                d.2.resize(size, 0);
                self.decode(c, &mut d.2)?;
                d.0 = self.id;
                d.1 = i;
            }
            buf.copy_from_slice(&d.2[from..to]);
            Ok(())
        })
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("dmg images are read-only"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("dmg images are read-only"))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn info(&self) -> Result<DriverInfo> {
        // As `qemu-img info`: no cluster size, no format-specific data.
        Ok(DriverInfo::default())
    }
}
