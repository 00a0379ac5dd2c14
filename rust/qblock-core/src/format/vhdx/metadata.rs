//! The VHDX metadata region (section 2.6): a 64 KiB table of items, then
//! the items — file parameters, virtual disk size, page 83 data, logical
//! and physical sector size, and the parent locator of differencing disks.

use super::guid::*;
use super::header::{Region, KIB, MIB};
use crate::backend::Storage;
use crate::error::{corrupt, unsupported, Result};
use crate::format::bytes::{le16, le32, le64};

pub const TABLE_SIGNATURE: &[u8; 8] = b"metadata";
/// The table occupies the first 64 KiB of the region; items follow.
pub const TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: u16 = 2047;
const FLAG_IS_USER: u32 = 1;
const FLAG_IS_VIRTUAL_DISK: u32 = 2;
const FLAG_IS_REQUIRED: u32 = 4;
/// File parameter flags.
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub const HAS_PARENT: u32 = 2;
/// Payload block sizes the spec allows (section 2.6.2.1).
pub const MIN_BLOCK_SIZE: u64 = MIB;
pub const MAX_BLOCK_SIZE: u64 = 256 * MIB;
/// The spec's (and QEMU's) largest virtual disk: 64 TiB.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Parent locators are small key/value lists; bound what we read.
const MAX_LOCATOR: u32 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u64,
    pub flags: u32,
    pub disk_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub page83: Guid,
}

impl Metadata {
    /// Payload blocks per sector bitmap block (section 2.5.1).
    pub fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector_size as u64 / self.block_size
    }
}

struct Item {
    offset: u32,
    length: u32,
}

/// Parse the metadata region. A differencing disk is `Unsupported`, naming
/// its parent as recorded.
pub fn read_metadata(storage: &dyn Storage, region: Region) -> Result<Metadata> {
    let mut t = vec![0u8; TABLE_SIZE];
    storage.read_at(&mut t, region.offset)?;
    if !t.starts_with(TABLE_SIGNATURE) {
        return Err(corrupt("VHDX metadata table has no 'metadata' signature"));
    }
    let count = le16(&t, 10).unwrap_or(0);
    if count > MAX_ENTRIES {
        return Err(corrupt(format!(
            "VHDX metadata table has {count} entries (at most {MAX_ENTRIES})"
        )));
    }
    let known: [(Guid, u32, &str); 6] = [
        (FILE_PARAMETERS, 8, "file parameters"),
        (VIRTUAL_DISK_SIZE, 8, "virtual disk size"),
        (PAGE83_DATA, 16, "page 83 data"),
        (LOGICAL_SECTOR_SIZE, 4, "logical sector size"),
        (PHYSICAL_SECTOR_SIZE, 4, "physical sector size"),
        (PARENT_LOCATOR, 20, "parent locator"),
    ];
    let mut found: [Option<Item>; 6] = Default::default();
    for i in 0..count as usize {
        let at = 32 + 32 * i;
        let id: Guid = t[at..at + 16].try_into().unwrap_or(ZERO_GUID);
        let offset = le32(&t, at + 16).unwrap_or(0);
        let length = le32(&t, at + 20).unwrap_or(0);
        let flags = le32(&t, at + 24).unwrap_or(0);
        let Some(k) = known.iter().position(|(g, _, _)| *g == id) else {
            if flags & FLAG_IS_REQUIRED != 0 {
                return Err(unsupported(
                    "VHDX file has a required metadata item this reader does not know",
                ));
            }
            continue;
        };
        let (_, min_len, name) = known[k];
        // An empty item may sit at offset 0; any other lies after the table.
        if length < min_len || (offset as u64) < TABLE_SIZE as u64 || offset as u64 + length as u64 > region.length {
            return Err(corrupt(format!(
                "VHDX metadata item '{name}' at {offset} of {length} bytes is outside the metadata region"
            )));
        }
        let _ = (FLAG_IS_USER, FLAG_IS_VIRTUAL_DISK);
        if found[k].replace(Item { offset, length }).is_some() {
            return Err(corrupt(format!("VHDX metadata item '{name}' is listed twice")));
        }
    }
    let val = |k: usize| -> Result<Vec<u8>> {
        let Some(it) = &found[k] else {
            return Err(corrupt(format!(
                "VHDX metadata lacks the required '{}' item",
                known[k].2
            )));
        };
        let mut b = vec![0u8; it.length.min(MAX_LOCATOR) as usize];
        storage.read_at(&mut b, region.offset + it.offset as u64)?;
        Ok(b)
    };
    let fp = val(0)?;
    let block_size = le32(&fp, 0).unwrap_or(0) as u64;
    let flags = le32(&fp, 4).unwrap_or(0);
    if flags & HAS_PARENT != 0 {
        let parent = if found[5].is_some() {
            parent_name(&val(5)?)
        } else {
            None
        };
        return Err(unsupported(match parent {
            Some(p) => format!("differencing VHDX images are not supported yet (parent '{p}')"),
            None => "differencing VHDX images are not supported yet (no parent locator)".to_string(),
        }));
    }
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(corrupt(format!(
            "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let disk_size = le64(&val(1)?, 0).unwrap_or(0);
    let page83: Guid = val(2)?[..16].try_into().unwrap_or(ZERO_GUID);
    let logical_sector_size = le32(&val(3)?, 0).unwrap_or(0);
    let physical_sector_size = le32(&val(4)?, 0).unwrap_or(0);
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(corrupt(format!(
            "VHDX logical sector size {logical_sector_size} is not 512 or 4096"
        )));
    }
    if physical_sector_size != 512 && physical_sector_size != 4096 {
        return Err(corrupt(format!(
            "VHDX physical sector size {physical_sector_size} is not 512 or 4096"
        )));
    }
    if disk_size > MAX_DISK_SIZE || !disk_size.is_multiple_of(logical_sector_size as u64) {
        return Err(corrupt(format!(
            "VHDX virtual disk size {disk_size} is above 64 TiB or not a multiple of the sector size"
        )));
    }
    Ok(Metadata {
        block_size,
        flags,
        disk_size,
        logical_sector_size,
        physical_sector_size,
        page83,
    })
}

/// The parent's path from a parent locator (section 2.6.2.6): the relative
/// path, else an absolute one, as UTF-16LE keys and values.
fn parent_name(loc: &[u8]) -> Option<String> {
    let count = le16(loc, 18)? as usize;
    let text = |off: u32, len: u16| -> Option<String> {
        let b = loc.get(off as usize..off as usize + len as usize)?;
        let u: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Some(String::from_utf16_lossy(&u))
    };
    let mut best: Option<(usize, String)> = None;
    for i in 0..count.min(256) {
        let at = 20 + 12 * i;
        let (ko, vo) = (le32(loc, at)?, le32(loc, at + 4)?);
        let (kl, vl) = (le16(loc, at + 8)?, le16(loc, at + 10)?);
        let key = text(ko, kl)?;
        let rank = ["relative_path", "absolute_win32_path", "volume_path"]
            .iter()
            .position(|k| *k == key);
        if let Some(r) = rank {
            if best.as_ref().is_none_or(|(br, _)| r < *br) {
                best = Some((r, text(vo, vl)?));
            }
        }
    }
    best.map(|(_, v)| v)
}

/// Write a new metadata region at `at` (QEMU's layout: the table, then the
/// five items from 64 KiB on).
pub fn write_metadata(storage: &dyn Storage, at: u64, m: &Metadata) -> Result<()> {
    let mut t = vec![0u8; TABLE_SIZE];
    t[0..8].copy_from_slice(TABLE_SIGNATURE);
    t[10..12].copy_from_slice(&5u16.to_le_bytes());
    let mut items = Vec::new();
    let mut fp = m.block_size.to_le_bytes()[..4].to_vec();
    fp.extend_from_slice(&m.flags.to_le_bytes());
    items.push((FILE_PARAMETERS, fp, FLAG_IS_REQUIRED));
    items.push((
        VIRTUAL_DISK_SIZE,
        m.disk_size.to_le_bytes().to_vec(),
        FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
    ));
    items.push((PAGE83_DATA, m.page83.to_vec(), FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK));
    let lss = m.logical_sector_size.to_le_bytes().to_vec();
    items.push((LOGICAL_SECTOR_SIZE, lss, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK));
    let pss = m.physical_sector_size.to_le_bytes().to_vec();
    items.push((PHYSICAL_SECTOR_SIZE, pss, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK));
    let mut data = Vec::new();
    for (i, (g, v, flags)) in items.iter().enumerate() {
        let at = 32 + 32 * i;
        t[at..at + 16].copy_from_slice(g);
        t[at + 16..at + 20].copy_from_slice(&((64 * KIB) as u32 + data.len() as u32).to_le_bytes());
        t[at + 20..at + 24].copy_from_slice(&(v.len() as u32).to_le_bytes());
        t[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
        data.extend_from_slice(v);
    }
    storage.write_at(&t, at)?;
    storage.write_at(&data, at + 64 * KIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    fn sample() -> Metadata {
        Metadata {
            block_size: 8 * MIB,
            flags: 0,
            disk_size: 100 * MIB,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            page83: [9; 16],
        }
    }

    fn region_with(m: &Metadata, patch: impl FnOnce(&mut Vec<u8>)) -> Result<Metadata> {
        let s = MemoryStorage::new(Vec::new(), false);
        write_metadata(&s, 0, m).unwrap();
        let mut b = s.into_inner();
        b.resize(MIB as usize, 0);
        patch(&mut b);
        read_metadata(&MemoryStorage::new(b, true), Region { offset: 0, length: MIB })
    }

    fn msg(r: Result<Metadata>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn round_trip() {
        assert_eq!(region_with(&sample(), |_| {}).unwrap(), sample());
        assert_eq!(sample().chunk_ratio(), 512);
    }

    #[test]
    fn rejections() {
        assert!(msg(region_with(&sample(), |b| b[0] = b'X')).contains("signature"));
        assert!(msg(region_with(&sample(), |b| b[10..12].copy_from_slice(&3000u16.to_le_bytes()))).contains("entries"));
        // Item offset beyond the region.
        assert!(msg(region_with(&sample(), |b| b[48..52]
            .copy_from_slice(&(2 * MIB as u32).to_le_bytes())))
        .contains("outside"));
        // The virtual size item listed twice (its GUID over the page 83 entry).
        assert!(msg(region_with(&sample(), |b| {
            let g = b[64..80].to_vec();
            b[96..112].copy_from_slice(&g);
        }))
        .contains("twice"));
        // Missing item: the table says four entries.
        assert!(msg(region_with(&sample(), |b| b[10..12].copy_from_slice(&4u16.to_le_bytes()))).contains("lacks"));
        let mut m = sample();
        m.block_size = 3 * MIB;
        assert!(msg(region_with(&m, |_| {})).contains("block size"));
        m = sample();
        m.logical_sector_size = 1024;
        assert!(msg(region_with(&m, |_| {})).contains("logical sector"));
        m = sample();
        m.physical_sector_size = 0;
        assert!(msg(region_with(&m, |_| {})).contains("physical sector"));
        m = sample();
        m.disk_size = 65 << 40;
        assert!(msg(region_with(&m, |_| {})).contains("64 TiB"));
        m = sample();
        m.flags = HAS_PARENT;
        let e = region_with(&m, |_| {}).unwrap_err();
        assert!(matches!(e, crate::error::Error::Unsupported(_)));
        // An unknown required item.
        let e = region_with(&sample(), |b| b[32] ^= 0xff).unwrap_err();
        assert!(matches!(e, crate::error::Error::Unsupported(_)));
    }
}
