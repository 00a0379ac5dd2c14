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
    /// Where a differencing disk's parent is (file parameter `has_parent`).
    pub parent: Option<ParentLocator>,
}

/// A VHDX parent locator (section 2.6.2.6): the parent's expected data
/// write GUID and the paths it may be found at, most specific first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// `parent_linkage`: the parent's data write GUID, as "{...}" text.
    pub linkage: Option<String>,
    /// `relative_path`, `volume_path`, `absolute_win32_path`, in that order.
    pub paths: Vec<String>,
}

impl ParentLocator {
    pub fn describe(&self) -> String {
        self.paths
            .first()
            .cloned()
            .unwrap_or_else(|| "(no path recorded)".into())
    }
}

/// The locator type of a VHDX parent (the only type the spec defines).
pub const VHDX_PARENT_TYPE: Guid = guid(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);
const PATH_KEYS: [&str; 3] = ["relative_path", "volume_path", "absolute_win32_path"];

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
    let parent = if flags & HAS_PARENT != 0 {
        if found[5].is_none() {
            return Err(corrupt("differencing VHDX (has_parent) without a parent locator"));
        }
        Some(parse_locator(&val(5)?)?)
    } else {
        None
    };
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
        parent,
    })
}

/// Parse a parent locator: a header (type GUID, key/value count), then
/// entries of offsets and lengths of UTF-16LE keys and values.
fn parse_locator(loc: &[u8]) -> Result<ParentLocator> {
    if loc.len() < 20 {
        return Err(corrupt("VHDX parent locator is shorter than its header"));
    }
    if loc[..16] != VHDX_PARENT_TYPE {
        return Err(unsupported("VHDX parent locator of a type other than VHDX"));
    }
    let count = le16(loc, 18).unwrap_or(0) as usize;
    let text = |off: u32, len: u16| -> Result<String> {
        let b = loc
            .get(off as usize..off as usize + len as usize)
            .ok_or_else(|| corrupt("VHDX parent locator entry points outside the locator"))?;
        let u: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Ok(String::from_utf16_lossy(&u))
    };
    let mut out = ParentLocator::default();
    let mut paths: [Option<String>; 3] = Default::default();
    for i in 0..count {
        let at = 20 + 12 * i;
        let (Some(ko), Some(vo), Some(kl), Some(vl)) =
            (le32(loc, at), le32(loc, at + 4), le16(loc, at + 8), le16(loc, at + 10))
        else {
            return Err(corrupt("VHDX parent locator has more entries than bytes"));
        };
        let key = text(ko, kl)?;
        if key == "parent_linkage" {
            out.linkage = Some(text(vo, vl)?);
        } else if let Some(r) = PATH_KEYS.iter().position(|k| *k == key) {
            paths[r] = Some(text(vo, vl)?);
        }
    }
    out.paths = paths.into_iter().flatten().collect();
    Ok(out)
}

/// Serialize a parent locator (tests, and images made as children).
pub fn locator_bytes(p: &ParentLocator) -> Vec<u8> {
    let mut kv: Vec<(&str, String)> = Vec::new();
    if let Some(l) = &p.linkage {
        kv.push(("parent_linkage", l.clone()));
    }
    if let Some(r) = p.paths.first() {
        kv.push(("relative_path", r.clone()));
    }
    let mut b = vec![0u8; 20 + 12 * kv.len()];
    b[..16].copy_from_slice(&VHDX_PARENT_TYPE);
    b[18..20].copy_from_slice(&(kv.len() as u16).to_le_bytes());
    for (i, (k, v)) in kv.iter().enumerate() {
        let enc = |s: &str| s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect::<Vec<u8>>();
        let (k, v) = (enc(k), enc(v));
        let at = 20 + 12 * i;
        let ko = b.len() as u32;
        b.extend_from_slice(&k);
        let vo = b.len() as u32;
        b.extend_from_slice(&v);
        b[at..at + 4].copy_from_slice(&ko.to_le_bytes());
        b[at + 4..at + 8].copy_from_slice(&vo.to_le_bytes());
        b[at + 8..at + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        b[at + 10..at + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
    }
    b
}

/// Write a new metadata region at `at` (QEMU's layout: the table, then the
/// five items from 64 KiB on).
pub fn write_metadata(storage: &dyn Storage, at: u64, m: &Metadata) -> Result<()> {
    let mut t = vec![0u8; TABLE_SIZE];
    t[0..8].copy_from_slice(TABLE_SIGNATURE);
    t[10..12].copy_from_slice(&(5u16 + m.parent.is_some() as u16).to_le_bytes());
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
    if let Some(p) = &m.parent {
        items.push((PARENT_LOCATOR, locator_bytes(p), FLAG_IS_REQUIRED));
    }
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
            parent: None,
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
        assert!(msg(region_with(&m, |_| {})).contains("without a parent locator"));
        m.parent = Some(ParentLocator {
            linkage: Some("{x}".into()),
            paths: vec!["p.vhdx".into()],
        });
        assert_eq!(region_with(&m, |_| {}).unwrap().parent, m.parent);
        // An unknown required item.
        let e = region_with(&sample(), |b| b[32] ^= 0xff).unwrap_err();
        assert!(matches!(e, crate::error::Error::Unsupported(_)));
    }
}
