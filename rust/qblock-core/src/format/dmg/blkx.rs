//! The block map of a UDIF image: "mish" blocks (one per partition), found
//! either base64-encoded in the `<data>` elements of the `blkx` array of
//! the XML property list, or as resources in the classic resource fork.
//!
//! A mish block (all integers big-endian):
//!
//! | offset | size | field                                                   |
//! |--------|------|---------------------------------------------------------|
//! | 0      | 4    | signature "mish"                                        |
//! | 4      | 4    | version                                                 |
//! | 8      | 8    | first sector of the partition (chunk sectors add to it) |
//! | 16     | 8    | sector count                                            |
//! | 24     | 8    | data offset (chunk offsets add to it and to the data fork offset) |
//! | 32     | 168  | buffers needed, descriptor, reserved, checksum           |
//! | 200    | 4    | number of chunk entries                                 |
//! | 204    | 40·n | chunk entries                                           |
//!
//! A chunk entry: type (4), comment (4), sector number (8), sector count
//! (8), compressed offset (8), compressed length (8).
//!
//! Every entry is checked before it enters the table: sums must not
//! overflow, the stored bytes of data chunks must lie inside the file, and
//! QEMU's caps apply (a chunk stores at most 64 MiB and, unless it is a
//! zero chunk, decodes to at most 64 MiB). The table is sorted by guest
//! sector and chunks may not overlap.

use super::{
    Chunk, ChunkKind, DMG_LENGTHS_MAX, DMG_SECTORCOUNTS_MAX, MAX_CHUNKS, MAX_RSRC_FORK, MAX_SECTORS, MAX_XML, SECTOR,
};
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Result};
use crate::format::bytes::{be32, be64};

pub const MISH_MAGIC: &[u8; 4] = b"mish";
/// Size of a mish block before its chunk entries.
pub const MISH_HEADER: usize = 204;
pub const CHUNK_ENTRY: usize = 40;

pub const UDZE: u32 = 0x0000_0000;
pub const UDRW: u32 = 0x0000_0001;
pub const UDIG: u32 = 0x0000_0002;
pub const UDCO: u32 = 0x8000_0004;
pub const UDZO: u32 = 0x8000_0005;
pub const UDBZ: u32 = 0x8000_0006;
pub const ULFO: u32 = 0x8000_0007;
pub const UDCM: u32 = 0x7fff_fffe;
pub const UDLE: u32 = 0xffff_ffff;

/// Where the block map lives and how to reach the data.
pub struct MapSource {
    pub file_len: u64,
    pub data_fork_offset: u64,
}

/// Read the mish blocks of the XML property list at `[offset, offset+len)`.
pub fn from_xml(s: &dyn Storage, src: &MapSource, offset: u64, len: u64) -> Result<Vec<Chunk>> {
    if len == 0 || len > MAX_XML {
        // QEMU's cap: real plists are about 1 MiB at most.
        return Err(corrupt(format!(
            "XML property list of {len} bytes (the limit is {MAX_XML})"
        )));
    }
    let mut xml = try_zeroed(len as usize, "the dmg XML property list")?;
    s.read_at(&mut xml, offset)?;
    let mut chunks = Vec::new();
    for data in blkx_data(&xml)? {
        let mish = base64(data)?;
        parse_mish(&mish, src, &mut chunks)?;
    }
    Ok(chunks)
}

/// The contents of the `<data>` elements of the `blkx` array.
fn blkx_data(xml: &[u8]) -> Result<Vec<&[u8]>> {
    let key = find(xml, b"<key>blkx</key>", 0).ok_or_else(|| corrupt("the XML property list has no blkx resource"))?;
    let mut at = key + b"<key>blkx</key>".len();
    while xml.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
        at += 1;
    }
    if xml[at..].starts_with(b"<array/>") {
        return Ok(Vec::new());
    }
    if !xml[at..].starts_with(b"<array>") {
        return Err(corrupt(
            "the blkx key of the XML property list is not followed by an array",
        ));
    }
    let start = at + b"<array>".len();
    let end = find(xml, b"</array>", start)
        .ok_or_else(|| corrupt("the blkx array of the XML property list is not closed"))?;
    let mut out = Vec::new();
    let mut pos = start;
    while let Some(b) = find(&xml[..end], b"<data>", pos) {
        let d = b + b"<data>".len();
        let e = find(&xml[..end], b"</data>", d)
            .ok_or_else(|| corrupt("a <data> element of the blkx array is not closed"))?;
        out.push(&xml[d..e]);
        pos = e + b"</data>".len();
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Decode base64 (standard alphabet), skipping the whitespace property
/// lists put between lines; anything else outside the alphabet is corrupt.
pub fn base64(text: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits, mut pad) = (0u32, 0u32, 0usize);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                pad += 1;
                continue;
            }
            c if c.is_ascii_whitespace() => continue,
            c => return Err(corrupt(format!("byte {c:#04x} in the base64 of a blkx resource"))),
        };
        if pad > 0 {
            return Err(corrupt("base64 data continues after its padding in a blkx resource"));
        }
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Read the mish blocks of the resource fork at `[offset, offset+len)`, as
/// QEMU reads it: the fork's data area is a sequence of resources, each a
/// 32-bit length and its bytes; those that are mish blocks are the map.
pub fn from_resource_fork(s: &dyn Storage, src: &MapSource, offset: u64, len: u64) -> Result<Vec<Chunk>> {
    if len > MAX_RSRC_FORK {
        return Err(corrupt(format!(
            "resource fork of {len} bytes (the limit is {MAX_RSRC_FORK})"
        )));
    }
    let mut fork = try_zeroed(len as usize, "the dmg resource fork")?;
    s.read_at(&mut fork, offset)?;
    let data_off = be32(&fork, 0).ok_or_else(|| corrupt("resource fork is too short for its header"))? as usize;
    let data_len = be32(&fork, 8).ok_or_else(|| corrupt("resource fork is too short for its header"))? as usize;
    if data_off > fork.len() || data_len == 0 || data_len > fork.len() - data_off {
        return Err(corrupt(format!(
            "resource data at {data_off} of {data_len} bytes does not fit the {}-byte resource fork",
            fork.len()
        )));
    }
    let area = &fork[data_off..data_off + data_len];
    let mut chunks = Vec::new();
    let mut at = 0usize;
    while at < area.len() {
        let n =
            be32(area, at).ok_or_else(|| corrupt("resource length cut off at the end of the resource data"))? as usize;
        at += 4;
        if n == 0 || n > area.len() - at {
            return Err(corrupt(format!(
                "resource of {n} bytes at {at} overruns the resource data"
            )));
        }
        let res = &area[at..at + n];
        // Other resources (plst, cSum, ...) share the data area.
        if res.starts_with(MISH_MAGIC) {
            parse_mish(res, src, &mut chunks)?;
        }
        at += n;
    }
    Ok(chunks)
}

/// Append the chunks of one mish block to `out`.
pub fn parse_mish(b: &[u8], src: &MapSource, out: &mut Vec<Chunk>) -> Result<()> {
    if b.len() < MISH_HEADER || !b.starts_with(MISH_MAGIC) {
        return Err(corrupt(format!(
            "blkx resource of {} bytes is not a mish block",
            b.len()
        )));
    }
    let first = be64(b, 8).unwrap_or(0);
    let data_offset = be64(b, 24).unwrap_or(0);
    let n = be32(b, 200).unwrap_or(0) as usize;
    if n > (b.len() - MISH_HEADER) / CHUNK_ENTRY {
        return Err(corrupt(format!(
            "mish block of {} bytes cannot hold its {n} chunk entries",
            b.len()
        )));
    }
    let base = src
        .data_fork_offset
        .checked_add(data_offset)
        .ok_or_else(|| corrupt(format!("mish data offset {data_offset} overflows")))?;
    for k in 0..n {
        let e = &b[MISH_HEADER + k * CHUNK_ENTRY..MISH_HEADER + (k + 1) * CHUNK_ENTRY];
        let ty = be32(e, 0).unwrap_or(0);
        let (rel, sectors) = (be64(e, 8).unwrap_or(0), be64(e, 16).unwrap_or(0));
        let (off, length) = (be64(e, 24).unwrap_or(0), be64(e, 32).unwrap_or(0));
        let kind = match ty {
            // Comments and the terminator describe no sectors.
            UDCM | UDLE => continue,
            UDZE => ChunkKind::Zero,
            UDIG => ChunkKind::Ignore,
            UDRW => ChunkKind::Raw,
            UDCO => ChunkKind::Adc,
            UDZO => ChunkKind::Zlib,
            UDBZ => ChunkKind::Bzip2,
            ULFO => ChunkKind::Lzfse,
            // QEMU skips unknown types and fails reads of their sectors;
            // we keep them so that such a read names the type.
            other => ChunkKind::Unknown(other),
        };
        let what = || format!("chunk {k} (type {ty:#010x}) of the mish block at sector {first}");
        let start = first
            .checked_add(rel)
            .filter(|s| *s <= MAX_SECTORS)
            .ok_or_else(|| corrupt(format!("{}: sector {first} + {rel} is out of range", what())))?;
        if sectors > MAX_SECTORS - start {
            return Err(corrupt(format!(
                "{}: {sectors} sectors from {start} are out of range",
                what()
            )));
        }
        if sectors == 0 {
            continue;
        }
        let mut chunk = Chunk {
            start,
            sectors,
            offset: 0,
            length: 0,
            kind,
        };
        if let ChunkKind::Unknown(_) = kind {
            push(out, chunk)?;
            continue;
        }
        if length > DMG_LENGTHS_MAX {
            return Err(corrupt(format!(
                "{}: stored length {length} exceeds {DMG_LENGTHS_MAX}",
                what()
            )));
        }
        if kind.is_zero() {
            push(out, chunk)?;
            continue;
        }
        if sectors > DMG_SECTORCOUNTS_MAX {
            return Err(corrupt(format!(
                "{}: {sectors} sectors exceed the {DMG_SECTORCOUNTS_MAX} a data chunk may hold",
                what()
            )));
        }
        let at = base
            .checked_add(off)
            .ok_or_else(|| corrupt(format!("{}: data offset {off} overflows", what())))?;
        if at > src.file_len || length > src.file_len - at {
            return Err(corrupt(format!(
                "{}: {length} bytes at {at} lie beyond the end of the {}-byte file",
                what(),
                src.file_len
            )));
        }
        if kind == ChunkKind::Raw {
            if length < sectors * SECTOR {
                return Err(corrupt(format!(
                    "{}: raw chunk of {sectors} sectors stores only {length} bytes",
                    what()
                )));
            }
        } else if length == 0 {
            return Err(corrupt(format!("{}: compressed chunk stores no bytes", what())));
        }
        chunk.offset = at;
        chunk.length = length;
        push(out, chunk)?;
    }
    Ok(())
}

fn push(out: &mut Vec<Chunk>, c: Chunk) -> Result<()> {
    if out.len() >= MAX_CHUNKS {
        return Err(corrupt(format!("the block map has more than {MAX_CHUNKS} chunks")));
    }
    out.try_reserve(1)
        .map_err(|_| crate::error::Error::NoMemory("cannot grow the dmg chunk table".into()))?;
    out.push(c);
    Ok(())
}

/// Sort the chunks by guest sector and refuse overlaps; drop what lies past
/// the disk's last sector (QEMU never reads it).
pub fn finish(mut chunks: Vec<Chunk>, total_sectors: u64) -> Result<Vec<Chunk>> {
    chunks.sort_by_key(|c| c.start);
    for w in chunks.windows(2) {
        if w[0].start + w[0].sectors > w[1].start {
            return Err(corrupt(format!(
                "chunks overlap: sectors {}..{} and {}..{}",
                w[0].start,
                w[0].start + w[0].sectors,
                w[1].start,
                w[1].start + w[1].sectors
            )));
        }
    }
    chunks.retain(|c| c.start < total_sectors);
    chunks.shrink_to_fit();
    Ok(chunks)
}
