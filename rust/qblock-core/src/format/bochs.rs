//! bochs: the growing redolog images of the Bochs emulator (bximage), read
//! only, as QEMU's block/bochs.c reads them.
//!
//! A 512-byte header, all integers little-endian:
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 32   | magic "Bochs Virtual HD Image", NUL-padded         |
//! | 32     | 16   | type "Redolog"                                     |
//! | 48     | 16   | subtype "Growing" (also "Undoable", "Volatile")     |
//! | 64     | 4    | version: 0x00020000, or 0x00010000 (version 1)     |
//! | 68     | 4    | header size: where the catalog starts (512)        |
//! | 72     | 4    | catalog entries                                    |
//! | 76     | 4    | bitmap size in bytes                               |
//! | 80     | 4    | extent size in bytes                               |
//! | 84     | 8    | disk size in bytes (version 1)                     |
//! | 84, 88 | 4, 8 | reserved, disk size in bytes (version 2)           |
//!
//! The catalog has one 32-bit entry per extent of the disk: 0xffffffff if
//! the extent is not allocated, else the extent's index `e` in the file.
//! Extent `e` is at `header + 4 * catalog + e * (bitmap_blocks +
//! extent_blocks) * 512` (sizes rounded up to 512-byte blocks): its bitmap
//! (one bit per sector, least significant bit first) and then its sectors.
//! A sector reads from the file when its bit is set, as zeroes otherwise.
//!
//! Checked at open, with QEMU's limits: at most 0x100000 catalog entries
//! ("what is needed for the largest image that bximage can create",
//! ~8 TB), an extent size that is a power of two from 512 to 8 MiB, a
//! catalog large enough for the disk. Checked beyond QEMU (which reads
//! zeroes or wrong bytes there): a header size of at least 512, a catalog
//! inside the file, a bitmap with a bit for every sector of an extent and
//! at most 8 MiB, and every catalog entry: below the catalog size (bximage
//! allocates extents in order), used once, its extent inside the file.
//!
//! Block status: unallocated extents and clear bitmap bits are not
//! allocated (they read as zeroes); set bits are data at their file
//! offset. QEMU has no block status for bochs and reports all data.
//!
//! Other redolog subtypes ("Undoable", "Volatile") and other versions are
//! recognised by the magic and refused as unsupported, as in QEMU. Writing
//! is refused; a writable open fails with `Unsupported` (QEMU's bochs is
//! read-only too).

use super::bytes::{le32, le64};
use crate::backend::Storage;
use crate::driver::{Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::registry::{FormatEntry, OpenCtx};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Bochs,
    probe: Some(probe),
    open: Some(open),
    create: None,
};

pub const HEADER_SIZE: usize = 512;
pub const MAGIC: &[u8] = b"Bochs Virtual HD Image";
pub const REDOLOG: &[u8] = b"Redolog";
pub const GROWING: &[u8] = b"Growing";
pub const VERSION_1: u32 = 0x0001_0000;
pub const VERSION_2: u32 = 0x0002_0000;
pub const SECTOR: u64 = 512;
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// QEMU's cap: 1M entries, enough for bximage's largest image (~8 TB).
pub const MAX_CATALOG: u32 = 0x10_0000;
/// QEMU's cap on the extent size.
pub const MAX_EXTENT: u32 = 0x80_0000;
/// A bitmap larger than the largest extent is nonsense; the cap also
/// bounds the stride between extents.
pub const MAX_BITMAP: u32 = MAX_EXTENT;

const OFF_VERSION: usize = 64;
const OFF_HEADER: usize = 68;
const OFF_CATALOG: usize = 72;
const OFF_BITMAP: usize = 76;
const OFF_EXTENT: usize = 80;
const OFF_DISK_V1: usize = 84;
const OFF_DISK_V2: usize = 88;

/// A NUL-terminated string in a fixed field equals `want` (C's strcmp
/// against the field, which must hold its NUL).
fn field_is(b: &[u8], at: usize, len: usize, want: &[u8]) -> bool {
    b.get(at..at + len)
        .is_some_and(|f| f.starts_with(want) && f.get(want.len()) == Some(&0))
}

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.len() < HEADER_SIZE || !field_is(h, 0, 32, MAGIC) {
        return 0;
    }
    let v = le32(h, OFF_VERSION).unwrap_or(0);
    if field_is(h, 32, 16, REDOLOG) && field_is(h, 48, 16, GROWING) && (v == VERSION_1 || v == VERSION_2) {
        100
    } else {
        // Another kind of Bochs image: claimed so that opening it says
        // "unsupported" rather than serving its header as a raw disk.
        50
    }
}

/// The header fields, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub header_size: u32,
    pub catalog: u32,
    pub bitmap: u32,
    pub extent: u32,
    pub disk_size: u64,
}

fn c_str(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE || !field_is(b, 0, 32, MAGIC) {
            return Err(corrupt("not a bochs image (bad magic or short header)"));
        }
        if !field_is(b, 32, 16, REDOLOG) || !field_is(b, 48, 16, GROWING) {
            return Err(unsupported(format!(
                "bochs image of type '{}' subtype '{}' (only growing redologs are supported)",
                c_str(&b[32..48]),
                c_str(&b[48..64])
            )));
        }
        let version = le32(b, OFF_VERSION).unwrap_or(0);
        let disk_size = match version {
            VERSION_1 => le64(b, OFF_DISK_V1),
            VERSION_2 => le64(b, OFF_DISK_V2),
            v => return Err(unsupported(format!("bochs header version {v:#x}"))),
        }
        .unwrap_or(0);
        let h = Header {
            version,
            header_size: le32(b, OFF_HEADER).unwrap_or(0),
            catalog: le32(b, OFF_CATALOG).unwrap_or(0),
            bitmap: le32(b, OFF_BITMAP).unwrap_or(0),
            extent: le32(b, OFF_EXTENT).unwrap_or(0),
            disk_size,
        };
        if h.header_size < HEADER_SIZE as u32 {
            return Err(corrupt(format!(
                "header size {} is smaller than the header",
                h.header_size
            )));
        }
        if h.catalog > MAX_CATALOG {
            return Err(corrupt(format!(
                "catalog of {} entries is too large (the limit is {MAX_CATALOG})",
                h.catalog
            )));
        }
        if h.extent < SECTOR as u32 || !h.extent.is_power_of_two() || h.extent > MAX_EXTENT {
            return Err(corrupt(format!(
                "extent size {} is not a power of two from 512 to {MAX_EXTENT}",
                h.extent
            )));
        }
        let sectors_per_extent = h.extent / SECTOR as u32;
        if h.bitmap < sectors_per_extent.div_ceil(8) || h.bitmap > MAX_BITMAP {
            return Err(corrupt(format!(
                "bitmap of {} bytes does not fit the {sectors_per_extent} sectors of an extent (or exceeds {MAX_BITMAP})",
                h.bitmap
            )));
        }
        if (h.catalog as u64) < h.sectors().div_ceil(sectors_per_extent as u64) {
            return Err(corrupt(format!(
                "catalog of {} entries is too small for a disk of {} bytes",
                h.catalog, h.disk_size
            )));
        }
        Ok(h)
    }

    /// Whole sectors of the disk (QEMU drops a partial last sector).
    pub fn sectors(&self) -> u64 {
        self.disk_size / SECTOR
    }
    pub fn bitmap_blocks(&self) -> u64 {
        (self.bitmap as u64).div_ceil(SECTOR)
    }
    pub fn extent_blocks(&self) -> u64 {
        (self.extent as u64).div_ceil(SECTOR)
    }
    /// Bytes from one extent's bitmap to the next one's.
    pub fn stride(&self) -> u64 {
        (self.bitmap_blocks() + self.extent_blocks()) * SECTOR
    }
    pub fn data_offset(&self) -> u64 {
        self.header_size as u64 + 4 * self.catalog as u64
    }
}

pub struct Bochs {
    storage: Arc<dyn Storage>,
    size: u64,
    extent: u64,
    /// Bytes of each extent's bitmap that hold bits for its sectors.
    bitmap_bytes: usize,
    bitmap_blocks: u64,
    data_offset: u64,
    stride: u64,
    catalog: Vec<u32>,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    if !ctx.read_only {
        return Err(unsupported("bochs images are read-only: open the image read-only"));
    }
    Ok(Box::new(Bochs::open(storage)?))
}

impl Bochs {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Bochs> {
        let file_len = storage.len()?;
        if file_len < HEADER_SIZE as u64 {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the bochs header"
            )));
        }
        let mut hb = [0u8; HEADER_SIZE];
        storage.read_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        let cat_bytes = 4 * h.catalog as u64;
        if h.header_size as u64 + cat_bytes > file_len {
            return Err(corrupt(format!(
                "catalog of {} entries at {} does not fit the {file_len}-byte file",
                h.catalog, h.header_size
            )));
        }
        let mut raw = try_zeroed(cat_bytes as usize, "the bochs catalog")?;
        storage.read_at(&mut raw, h.header_size as u64)?;
        let catalog: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (data_offset, stride) = (h.data_offset(), h.stride());
        let mut used = vec![0u64; (h.catalog as usize).div_ceil(64)];
        for (i, &e) in catalog.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            if e >= h.catalog {
                return Err(corrupt(format!(
                    "catalog entry {i} names extent {e}, beyond the {} the catalog allows",
                    h.catalog
                )));
            }
            let (w, bit) = (e as usize / 64, 1u64 << (e % 64));
            if used[w] & bit != 0 {
                return Err(corrupt(format!(
                    "catalog entry {i} names extent {e}, which another entry uses"
                )));
            }
            used[w] |= bit;
            // e < 2^20 and stride <= 2 * 8 MiB: no overflow.
            let end = data_offset + (e as u64 + 1) * stride;
            if end > file_len {
                return Err(corrupt(format!(
                    "extent {e} (catalog entry {i}) ends at {end}, beyond the {file_len}-byte file"
                )));
            }
        }
        Ok(Bochs {
            storage,
            size: h.sectors() * SECTOR,
            extent: h.extent as u64,
            bitmap_bytes: (h.extent as usize / SECTOR as usize).div_ceil(8),
            bitmap_blocks: h.bitmap_blocks(),
            data_offset,
            stride,
            catalog,
        })
    }
}

/// The largest bitmap part one map call reads: 8 MiB extents have 16384
/// sectors, 2048 bytes of bits.
const MAX_BITMAP_READ: usize = (MAX_EXTENT as usize / SECTOR as usize) / 8;

impl Driver for Bochs {
    fn format(&self) -> Format {
        Format::Bochs
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let idx = offset / self.extent;
        let within = offset % self.extent;
        let e = self.catalog[idx as usize];
        if e == UNALLOCATED {
            // Unallocated extents: extend over the following ones.
            let mut run = self.extent - within;
            let mut next = idx as usize + 1;
            while run < len && self.catalog.get(next) == Some(&UNALLOCATED) {
                run += self.extent;
                next += 1;
            }
            return Ok(Mapping {
                kind: Mapped::Unallocated,
                len: run.min(len),
            });
        }
        let bitmap_at = self.data_offset + e as u64 * self.stride;
        let first = within / SECTOR;
        let last = (within + len.min(self.extent - within) - 1) / SECTOR;
        // The bitmap bytes for sectors first..=last of this extent.
        let (b0, b1) = ((first / 8) as usize, (last / 8) as usize);
        let mut bits = [0u8; MAX_BITMAP_READ];
        let bits = &mut bits[..(b1 - b0 + 1).min(self.bitmap_bytes)];
        self.storage.read_at(bits, bitmap_at + b0 as u64)?;
        let bit = |s: u64| bits[(s / 8) as usize - b0] >> (s % 8) & 1 == 1;
        let set = bit(first);
        let mut s = first + 1;
        while s <= last && bit(s) == set {
            s += 1;
        }
        let run = (s * SECTOR - within).min(len);
        let kind = if set {
            Mapped::Data {
                file: 0,
                offset: bitmap_at + self.bitmap_blocks * SECTOR + within,
            }
        } else {
            Mapped::Unallocated
        };
        Ok(Mapping { kind, len: run })
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("bochs images are read-only"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("bochs images are read-only"))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn info(&self) -> Result<DriverInfo> {
        // As `qemu-img info`: no cluster size, no format-specific data.
        Ok(DriverInfo::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::error::ErrorKind;
    use crate::location::Location;

    pub struct Params {
        pub version: u32,
        pub header: u32,
        pub catalog: u32,
        pub bitmap: u32,
        pub extent: u32,
        pub disk: u64,
    }

    pub const D: Params = Params {
        version: VERSION_2,
        header: 512,
        catalog: 8,
        bitmap: 512,
        extent: 4096,
        disk: 8 * 4096,
    };

    pub fn header(p: &Params) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[32..32 + REDOLOG.len()].copy_from_slice(REDOLOG);
        h[48..48 + GROWING.len()].copy_from_slice(GROWING);
        h[64..68].copy_from_slice(&p.version.to_le_bytes());
        h[68..72].copy_from_slice(&p.header.to_le_bytes());
        h[72..76].copy_from_slice(&p.catalog.to_le_bytes());
        h[76..80].copy_from_slice(&p.bitmap.to_le_bytes());
        h[80..84].copy_from_slice(&p.extent.to_le_bytes());
        let at = if p.version == VERSION_1 { 84 } else { 88 };
        h[at..at + 8].copy_from_slice(&p.disk.to_le_bytes());
        h
    }

    /// An image of `p` whose catalog maps extent index i to `cat[i]`; every
    /// allocated extent has the sectors in `set` (sector numbers within the
    /// extent) present, filled with a pattern.
    pub fn image(p: &Params, cat: &[u32], set: &[u64]) -> (Vec<u8>, Vec<u8>) {
        let mut img = header(p);
        img.resize(p.header as usize, 0);
        let mut catalog = vec![UNALLOCATED; p.catalog as usize];
        catalog[..cat.len()].copy_from_slice(cat);
        for c in &catalog {
            img.extend_from_slice(&c.to_le_bytes());
        }
        let n_alloc = catalog
            .iter()
            .filter(|&&c| c != UNALLOCATED)
            .map(|&c| c + 1)
            .max()
            .unwrap_or(0);
        let bb = (p.bitmap as usize).div_ceil(512) * 512;
        let stride = bb + p.extent as usize;
        let data_at = img.len();
        img.resize(data_at + n_alloc as usize * stride, 0);
        let mut model = vec![0u8; (p.disk / 512 * 512) as usize];
        for (i, &c) in catalog.iter().enumerate() {
            if c == UNALLOCATED {
                continue;
            }
            let base = data_at + c as usize * stride;
            for &s in set {
                img[base + s as usize / 8] |= 1 << (s % 8);
                let sec = base + bb + s as usize * 512;
                let guest = i * p.extent as usize + s as usize * 512;
                for k in 0..512 {
                    let v = (guest + k * 7) as u8 ^ 0x5a;
                    img[sec + k] = v;
                    if guest + k < model.len() {
                        model[guest + k] = v;
                    }
                }
            }
        }
        (img, model)
    }

    fn open_bytes(b: Vec<u8>) -> Result<Bochs> {
        Bochs::open(Arc::new(MemoryStorage::new(b, true)))
    }

    fn read_all(d: &Bochs) -> Vec<u8> {
        let mut out = vec![0u8; d.virtual_size() as usize];
        let mut pos = 0;
        while pos < d.virtual_size() {
            let m = d.map(pos, d.virtual_size() - pos).unwrap();
            let b = &mut out[pos as usize..(pos + m.len) as usize];
            match m.kind {
                Mapped::Data { offset, .. } => d.storage.read_at(b, offset).unwrap(),
                Mapped::Unallocated => b.fill(0),
                k => panic!("{k:?}"),
            }
            pos += m.len;
        }
        out
    }

    #[test]
    fn reads_extents_bitmaps_and_holes() {
        let (img, model) = image(&D, &[1, UNALLOCATED, 0, UNALLOCATED, UNALLOCATED, 2], &[0, 1, 2, 5, 7]);
        let d = open_bytes(img).unwrap();
        assert_eq!(d.virtual_size(), 8 * 4096);
        assert_eq!(read_all(&d), model);
        // Sectors 0..3 of extent 0 are one data run; 3..5 a hole.
        let m = d.map(100, 1 << 20).unwrap();
        assert_eq!(m.len, 3 * 512 - 100);
        assert!(matches!(m.kind, Mapped::Data { .. }));
        assert_eq!(
            d.map(3 * 512, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 1024
            }
        );
        // Extent 1 unallocated: one run up to extent 2.
        assert_eq!(
            d.map(4096 + 10, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 4086
            }
        );
        // Extents 3, 4 unallocated merge.
        assert_eq!(
            d.map(3 * 4096, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 2 * 4096
            }
        );
        assert_eq!(d.map(3 * 4096, 5).unwrap().len, 5);
    }

    #[test]
    fn version_1_and_odd_disk_sizes() {
        let p = Params {
            version: VERSION_1,
            disk: 3 * 4096 + 700,
            ..D
        };
        let (img, model) = image(&p, &[0, 1, 2, 3], &[0, 7]);
        let d = open_bytes(img).unwrap();
        assert_eq!(d.virtual_size(), 3 * 4096 + 512);
        assert_eq!(read_all(&d), model);
    }

    #[test]
    fn large_extents_and_bitmaps() {
        let p = Params {
            catalog: 2,
            bitmap: 2048,
            extent: MAX_EXTENT,
            disk: 2 * MAX_EXTENT as u64,
            ..D
        };
        let (img, model) = image(&p, &[UNALLOCATED, 0], &[0, 8, 9, 16383]);
        let d = open_bytes(img).unwrap();
        assert_eq!(read_all(&d), model);
    }

    #[test]
    fn writes_and_writable_opens_are_refused() {
        let (img, _) = image(&D, &[0], &[0]);
        let loc = Location::File("x.bochs".into());
        let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new(img, false));
        let e = open(
            s.clone(),
            &OpenCtx {
                location: &loc,
                read_only: false,
                direct: false,
                check: false,
                force_share: false,
                refs: crate::reference::RefRules::any(),
                inspect: None,
            },
        )
        .err()
        .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let d = open(
            s,
            &OpenCtx {
                location: &loc,
                read_only: true,
                direct: false,
                check: false,
                force_share: false,
                refs: crate::reference::RefRules::any(),
                inspect: None,
            },
        )
        .unwrap();
        assert_eq!(
            d.write_at(b"x", 0, &crate::driver::NoBacking).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            d.write_zeroes(0, 1, &crate::driver::NoBacking).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn probe_and_other_subtypes() {
        let (img, _) = image(&D, &[], &[]);
        assert_eq!(probe(&img, &MemoryStorage::new(vec![], true)), 100);
        let mut undo = img.clone();
        undo[48..64].copy_from_slice(b"Undoable\0\0\0\0\0\0\0\0");
        assert_eq!(probe(&undo, &MemoryStorage::new(vec![], true)), 50);
        let e = open_bytes(undo).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("Undoable"), "{e}");
        let mut v3 = img.clone();
        v3[64..68].copy_from_slice(&0x30000u32.to_le_bytes());
        assert_eq!(open_bytes(v3).err().unwrap().kind(), ErrorKind::Unsupported);
        let mut nonul = img.clone();
        nonul[22..32].fill(b'x');
        assert_eq!(probe(&nonul, &MemoryStorage::new(vec![], true)), 0);
    }

    fn corrupt_msg(b: Vec<u8>) -> String {
        let e = open_bytes(b).err().expect("hostile image opened");
        assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
        e.to_string()
    }

    #[test]
    fn hostile_headers_are_corrupt() {
        let (good, _) = image(&D, &[0, 1], &[0]);
        let h = |p: Params| {
            let mut b = good.clone();
            b[..HEADER_SIZE].copy_from_slice(&header(&p));
            b
        };
        for (want, img) in [
            ("shorter", good[..300].to_vec()),
            ("header size", h(Params { header: 100, ..D })),
            (
                "too large",
                h(Params {
                    catalog: MAX_CATALOG + 1,
                    ..D
                }),
            ),
            ("extent size", h(Params { extent: 0, ..D })),
            ("extent size", h(Params { extent: 256, ..D })),
            (
                "extent size",
                h(Params {
                    extent: 4096 + 512,
                    ..D
                }),
            ),
            (
                "extent size",
                h(Params {
                    extent: MAX_EXTENT * 2,
                    ..D
                }),
            ),
            ("bitmap", h(Params { bitmap: 0, ..D })),
            (
                "bitmap",
                h(Params {
                    bitmap: 1,
                    extent: 65536,
                    ..D
                }),
            ),
            ("bitmap", h(Params { bitmap: u32::MAX, ..D })),
            (
                "too small",
                h(Params {
                    disk: 8 * 4096 + 512,
                    ..D
                }),
            ),
            ("too small", h(Params { disk: u64::MAX, ..D })),
            ("does not fit", h(Params { header: 1 << 30, ..D })),
            (
                "does not fit",
                h(Params {
                    catalog: MAX_CATALOG,
                    disk: 4096,
                    ..D
                }),
            ),
        ] {
            let m = corrupt_msg(img);
            assert!(m.contains(want), "{want}: {m}");
        }
    }

    #[test]
    fn hostile_catalogs_are_corrupt() {
        for (want, cat) in [
            ("beyond the 8", vec![8u32]),
            ("beyond the 8", vec![0xffff_fffe]),
            ("another entry", vec![0, 1, 0]),
            ("beyond the", vec![0, 1, 5]),
        ] {
            let (mut img, _) = image(&D, &[0, 1], &[0]);
            for (i, c) in cat.iter().enumerate() {
                img[512 + 4 * i..516 + 4 * i].copy_from_slice(&c.to_le_bytes());
            }
            let m = corrupt_msg(img);
            assert!(m.contains(want), "{want}: {m}");
        }
        // The last extent cut short.
        let (img, _) = image(&D, &[0, 1], &[0]);
        let m = corrupt_msg(img[..img.len() - 1].to_vec());
        assert!(m.contains("beyond the"), "{m}");
    }
}
