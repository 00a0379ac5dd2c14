//! ESXi space-efficient sparse ("SESPARSE") extents, read-only, as QEMU
//! reads them (the format has no published specification; QEMU's checks
//! are strict and so are ours): a 512-byte constant header (magic
//! 0xcafebabe, version 2.1, 4 KiB grains, 4096-entry grain tables), a
//! volatile header that must not ask for a journal replay, a grain
//! directory of 64-bit entries (0x1 in the top nibble, a table index below)
//! and grain tables of 64-bit entries (top nibble: 0 unallocated, 1 or 2
//! zeroes, 3 allocated with a scrambled cluster number).

use super::header::SECTOR;
use crate::backend::Storage;
use crate::driver::{HostFile, Mapped};
use crate::error::{corrupt, try_zeroed, unsupported, Result};
use crate::format::bytes::le64;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

pub const MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
/// The only grain size QEMU accepts (sectors).
const GRAIN_SECTORS: u64 = 8;
/// The only grain table size QEMU accepts (sectors): 4096 entries.
const GT_SECTORS: u64 = 64;
const GT_ENTRIES: u64 = GT_SECTORS * SECTOR / 8;
/// "Slightly less than 64 TiB" is the format's limit (QEMU).
const MAX_CAPACITY: u64 = 64 << 40;
/// Grain table bytes kept in memory: 16 MiB (512 tables of 32 KiB).
const MAX_CACHED_TABLES: usize = 512;

type Table = Arc<Vec<u64>>;

pub struct SeSparseExtent {
    pub file: HostFile,
    storage: Arc<dyn Storage>,
    pub capacity: u64,
    gd: Vec<u64>,
    tables_offset: u64,
    grains_offset: u64,
    end: u64,
    cache: RwLock<HashMap<u32, Table>>,
}

impl SeSparseExtent {
    pub fn open(file: HostFile, storage: Arc<dyn Storage>, writable: bool) -> Result<SeSparseExtent> {
        if writable {
            return Err(unsupported("SESPARSE VMDK extents can only be opened read-only"));
        }
        let end = storage.len()?;
        let mut h = [0u8; 512];
        storage.read_at(&mut h, 0)?;
        let f = |i: usize| le64(&h, i * 8).unwrap_or(0);
        if f(0) != MAGIC {
            return Err(corrupt("SESPARSE extent has a bad magic"));
        }
        if f(1) != VERSION || f(3) != GRAIN_SECTORS || f(4) != GT_SECTORS || f(5) != 0 {
            return Err(unsupported(format!(
                "SESPARSE version {:#x}, grain size {}, table size {} or flags {:#x} not supported",
                f(1),
                f(3),
                f(4),
                f(5)
            )));
        }
        if (6..10).any(|i| f(i) != 0) || h[208..].iter().any(|&b| b != 0) {
            return Err(unsupported("SESPARSE reserved fields or padding are not zero"));
        }
        let capacity = f(2)
            .checked_mul(SECTOR)
            .filter(|&c| c <= MAX_CAPACITY)
            .ok_or_else(|| corrupt(format!("SESPARSE capacity of {} sectors is too large", f(2))))?;
        let sector = |i: usize, what: &str| {
            f(i).checked_mul(SECTOR)
                .filter(|&o| o < end)
                .ok_or_else(|| corrupt(format!("SESPARSE {what} is outside the file")))
        };
        let vol_at = sector(10, "volatile header")?;
        let mut v = [0u8; 512];
        storage.read_at(&mut v, vol_at)?;
        if le64(&v, 0) != Some(VOLATILE_MAGIC) {
            return Err(corrupt("SESPARSE volatile header has a bad magic"));
        }
        if le64(&v, 24) != Some(0) {
            return Err(unsupported("SESPARSE extent is dirty (its journal needs replaying)"));
        }
        if v[32..].iter().any(|&b| b != 0) {
            return Err(unsupported("SESPARSE volatile header padding is not zero"));
        }
        let gd_at = sector(16, "grain directory")?;
        let gd_entries = f(17).saturating_mul(SECTOR) / 8;
        let needed = capacity.div_ceil(GT_ENTRIES * GRAIN_SECTORS * SECTOR);
        if gd_entries < needed {
            return Err(corrupt("SESPARSE grain directory does not cover the capacity"));
        }
        let mut raw = try_zeroed((needed * 8) as usize, "the SESPARSE grain directory")?;
        storage.read_at(&mut raw, gd_at)?;
        let gd = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let tables_offset = f(18);
        let grains_offset = f(24);
        Ok(SeSparseExtent {
            file,
            storage,
            capacity,
            gd,
            tables_offset,
            grains_offset,
            end,
            cache: RwLock::new(HashMap::new()),
        })
    }

    fn table(&self, l1: usize) -> Result<Option<Table>> {
        let e = self.gd[l1];
        if e == 0 {
            return Ok(None);
        }
        if e & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(corrupt(format!(
                "SESPARSE grain directory entry {l1} is invalid ({e:#x})"
            )));
        }
        if let Some(t) = self.cache.read().get(&(l1 as u32)) {
            return Ok(Some(t.clone()));
        }
        let at = (e & 0xffff_ffff)
            .checked_mul(GT_SECTORS)
            .and_then(|s| s.checked_add(self.tables_offset))
            .filter(|&s| s <= 0xffff_ffff)
            .map(|s| s * SECTOR)
            .filter(|&o| o < self.end)
            .ok_or_else(|| corrupt(format!("SESPARSE grain table {l1} is outside the file")))?;
        let mut raw = try_zeroed((GT_ENTRIES * 8) as usize, "a SESPARSE grain table")?;
        self.storage.read_at(&mut raw, at)?;
        let t: Table = Arc::new(
            raw.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        );
        let mut c = self.cache.write();
        if c.len() >= MAX_CACHED_TABLES {
            c.clear();
        }
        c.insert(l1 as u32, t.clone());
        Ok(Some(t))
    }

    fn classify(&self, rel: u64) -> Result<Mapped> {
        let grain = GRAIN_SECTORS * SECTOR;
        let span = GT_ENTRIES * grain;
        let Some(t) = self.table((rel / span) as usize)? else {
            return Ok(Mapped::Unallocated);
        };
        let e = t[((rel % span) / grain) as usize];
        Ok(match e >> 60 {
            0 if e == 0 => Mapped::Unallocated,
            1 | 2 => Mapped::Zero { host: None },
            3 => {
                let cluster = ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12);
                let at = cluster
                    .checked_mul(GRAIN_SECTORS)
                    .and_then(|s| s.checked_add(self.grains_offset))
                    .and_then(|s| s.checked_mul(SECTOR))
                    .filter(|&o| o < self.end)
                    .ok_or_else(|| corrupt(format!("SESPARSE grain entry {e:#x} points outside the file")))?;
                Mapped::Data {
                    file: self.file,
                    offset: at + rel % grain,
                }
            }
            _ => return Err(corrupt(format!("SESPARSE grain table entry {e:#x} is invalid"))),
        })
    }

    /// How extent-relative `[rel, rel+len)` maps, as far as it maps one way.
    pub fn map(&self, rel: u64, len: u64) -> Result<(Mapped, u64)> {
        let grain = GRAIN_SECTORS * SECTOR;
        let first = self.classify(rel)?;
        let mut run = (grain - rel % grain).min(len);
        while run < len {
            let next = self.classify(rel + run)?;
            let same = match (first, next) {
                (Mapped::Data { offset: a, .. }, Mapped::Data { offset: b, .. }) => a + run == b,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run = (run + grain).min(len);
        }
        Ok((first, run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::error::ErrorKind;

    fn image() -> Vec<u8> {
        let mut d = vec![0u8; 64 * 512];
        let mut put = |i: usize, v: u64| d[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        put(0, MAGIC);
        put(1, VERSION);
        put(2, 2048); // 1 MiB
        put(3, GRAIN_SECTORS);
        put(4, GT_SECTORS);
        put(10, 1); // volatile header at sector 1
        put(16, 2); // grain directory at sector 2, one sector
        put(17, 1);
        put(18, 3); // tables from sector 3
        put(24, 3 + 64); // grains after one table
        d[512..520].copy_from_slice(&VOLATILE_MAGIC.to_le_bytes());
        d[1024..1032].copy_from_slice(&0x1000_0000_0000_0000u64.to_le_bytes());
        // grain 1 -> cluster 0, grain 2 zeroed
        d[1536 + 8..1536 + 16].copy_from_slice(&0x3000_0000_0000_0000u64.to_le_bytes());
        d[1536 + 16..1536 + 24].copy_from_slice(&0x2000_0000_0000_0000u64.to_le_bytes());
        d.resize((67 + 8) * 512, 0x5a);
        d
    }

    fn open(d: Vec<u8>) -> Result<SeSparseExtent> {
        SeSparseExtent::open(1, Arc::new(MemoryStorage::new(d, true)), false)
    }

    #[test]
    fn reads_and_checks() {
        let e = open(image()).unwrap();
        assert_eq!(e.capacity, 1 << 20);
        assert_eq!(e.map(0, 1 << 20).unwrap(), (Mapped::Unallocated, 4096));
        assert_eq!(
            e.map(4096, 1 << 20).unwrap(),
            (
                Mapped::Data {
                    file: 1,
                    offset: 67 * 512
                },
                4096
            )
        );
        assert_eq!(e.map(8192, 4096).unwrap(), (Mapped::Zero { host: None }, 4096));
        assert!(SeSparseExtent::open(1, Arc::new(MemoryStorage::new(image(), true)), true).is_err());
        let patch = |i: usize, v: u64| {
            let mut d = image();
            d[i..i + 8].copy_from_slice(&v.to_le_bytes());
            d
        };
        assert_eq!(open(patch(0, 1)).err().unwrap().kind(), ErrorKind::CorruptImage);
        assert_eq!(open(patch(8, 1)).err().unwrap().kind(), ErrorKind::Unsupported);
        assert_eq!(open(patch(16, u64::MAX)).err().unwrap().kind(), ErrorKind::CorruptImage);
        assert_eq!(open(patch(80, 1 << 40)).err().unwrap().kind(), ErrorKind::CorruptImage);
        assert_eq!(open(patch(512, 7)).err().unwrap().kind(), ErrorKind::CorruptImage);
        assert_eq!(open(patch(512 + 24, 1)).err().unwrap().kind(), ErrorKind::Unsupported);
        assert_eq!(open(patch(136, 0)).err().unwrap().kind(), ErrorKind::CorruptImage);
        let bad_gd = open(patch(1024, 0x2000_0000_0000_0000)).unwrap();
        assert_eq!(bad_gd.map(0, 4096).unwrap_err().kind(), ErrorKind::CorruptImage);
        let bad_gt = open(patch(1024, 0x1000_0000_ffff_ffff)).unwrap();
        assert_eq!(bad_gt.map(0, 4096).unwrap_err().kind(), ErrorKind::CorruptImage);
        let bad_gte = open(patch(1536 + 8, 0x4000_0000_0000_0000)).unwrap();
        assert_eq!(bad_gte.map(4096, 4096).unwrap_err().kind(), ErrorKind::CorruptImage);
        let far = open(patch(1536 + 8, 0x3000_ffff_ffff_ffff)).unwrap();
        assert_eq!(far.map(4096, 4096).unwrap_err().kind(), ErrorKind::CorruptImage);
        let nonzero_unalloc = open(patch(1536, 5)).unwrap();
        assert_eq!(
            nonzero_unalloc.map(0, 4096).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
    }
}
