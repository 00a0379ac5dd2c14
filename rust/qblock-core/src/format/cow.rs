//! cow: the User Mode Linux copy-on-write format, version 2, in the layout
//! of QEMU's former block/cow.c (QEMU <= 2.1, the seed's format), which is
//! the layout implemented here.
//!
//! The header is the C struct `cow_header_v2` as that driver wrote it on
//! LP64 hosts (x86-64), all integers big-endian:
//!
//! | offset | size | field                                    |
//! |--------|------|------------------------------------------|
//! | 0      | 4    | magic 0x4f4f4f4d ("OOOM")                |
//! | 4      | 4    | version, 2                               |
//! | 8      | 1024 | backing file name, NUL-terminated        |
//! | 1032   | 4    | mtime of the backing file (seconds)      |
//! | 1036   | 4    | (struct padding)                         |
//! | 1040   | 8    | virtual size in bytes                    |
//! | 1048   | 4    | sector size, 512                         |
//! | 1052   | 4    | (struct padding): header size 1056       |
//!
//! Then a bitmap with one bit per 512-byte sector (bit `n % 8` of byte
//! `n / 8`, least significant first), set when the sector is in this file;
//! then the sectors themselves, each at `data_offset + 512 * n`, where
//! `data_offset` rounds `1056 + bitmap bytes` up to 512. UML's own v2
//! header (cow_user.c) differs: a MAXPATHLEN (4096-byte) name, so UML v2
//! and v3 files are not this format (the version field cannot tell them
//! apart from QEMU's; their size field would not fit and they are refused).
//! A 32-bit QEMU wrote a packed variant (size at 1036) that we do not read.
//!
//! Supported: read, write (sector granularity; partial sectors are filled
//! from the backing file), create with a size and a backing file (its mtime
//! recorded as QEMU did). No backing format can be recorded: the backing
//! image is probed. Crash order of a write: data, flush, bitmap bits.
//!
//! The bitmap is read through the bounded chunk cache shared with qcow/qed
//! (as little-endian 64-bit words, which keeps the bit order), so memory
//! stays bounded whatever size the header claims.

use super::bytes::{be32, be64};
use super::qcow::table::TableCache;
use crate::backend::Storage;
use crate::driver::{BackingRef, Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::registry::{FormatEntry, OpenCtx};
use parking_lot::Mutex;
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Cow,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

pub const MAGIC: u32 = 0x4f4f_4f4d;
pub const VERSION: u32 = 2;
/// sizeof(struct cow_header_v2) with LP64 padding.
pub const HEADER_SIZE: u64 = 1056;
pub const BACKING_NAME_LEN: usize = 1024;
const OFF_MTIME: usize = 1032;
const OFF_SIZE: usize = 1040;
const OFF_SECTORSIZE: usize = 1048;
pub const SECTOR: u64 = 512;
/// Largest virtual size: data offsets (`data_offset + size`) must stay
/// within a signed 64-bit file offset.
pub const MAX_SIZE: u64 = 1 << 62;

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    // Magic "OOOM", then version 2 (both big-endian).
    if be32(h, 0) == Some(MAGIC) && be32(h, 4) == Some(VERSION) {
        100
    } else {
        0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub backing_file: String,
    pub mtime: u32,
    pub size: u64,
    pub sectorsize: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE as usize || be32(b, 0) != Some(MAGIC) {
            return Err(corrupt("not a cow image (bad magic or short header)"));
        }
        let version = be32(b, 4).unwrap_or(0);
        if version != VERSION {
            return Err(unsupported(format!(
                "cow version {version} (only version 2 is supported)"
            )));
        }
        let name = &b[8..8 + BACKING_NAME_LEN];
        let len = name
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| corrupt("backing file name is not NUL-terminated within 1024 bytes"))?;
        let backing_file =
            String::from_utf8(name[..len].to_vec()).map_err(|_| corrupt("backing file name is not UTF-8"))?;
        let h = Header {
            backing_file,
            mtime: be32(b, OFF_MTIME).unwrap_or(0),
            size: be64(b, OFF_SIZE).unwrap_or(0),
            sectorsize: be32(b, OFF_SECTORSIZE).unwrap_or(0),
        };
        if h.size > MAX_SIZE {
            return Err(corrupt(format!("virtual size {} is too large", h.size)));
        }
        if h.sectorsize != SECTOR as u32 {
            if h.sectorsize == 0 || !h.sectorsize.is_power_of_two() {
                return Err(corrupt(format!("sector size {} is invalid", h.sectorsize)));
            }
            return Err(unsupported(format!(
                "cow sector size {} (only 512 is supported)",
                h.sectorsize
            )));
        }
        Ok(h)
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }
    pub fn bitmap_bytes(&self) -> u64 {
        self.sectors().div_ceil(8)
    }
    pub fn data_offset(&self) -> u64 {
        (HEADER_SIZE + self.bitmap_bytes()).div_ceil(SECTOR) * SECTOR
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.backing_file.len() >= BACKING_NAME_LEN {
            return Err(invalid(format!(
                "backing file name is longer than {} bytes",
                BACKING_NAME_LEN - 1
            )));
        }
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..8 + self.backing_file.len()].copy_from_slice(self.backing_file.as_bytes());
        b[OFF_MTIME..OFF_MTIME + 4].copy_from_slice(&self.mtime.to_be_bytes());
        b[OFF_SIZE..OFF_SIZE + 8].copy_from_slice(&self.size.to_be_bytes());
        b[OFF_SECTORSIZE..OFF_SECTORSIZE + 4].copy_from_slice(&self.sectorsize.to_be_bytes());
        Ok(b)
    }
}

pub struct Cow {
    storage: Arc<dyn Storage>,
    size: u64,
    data_offset: u64,
    /// Bitmap words (64 sectors each), through the bounded cache.
    words: u64,
    bitmap: TableCache,
    backing: Option<String>,
    write_lock: Mutex<()>,
}

fn open(storage: Arc<dyn Storage>, _ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    Ok(Box::new(Cow::open(storage)?))
}

impl Cow {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Cow> {
        let file_len = storage.len()?;
        if file_len < HEADER_SIZE {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the cow header"
            )));
        }
        let mut hb = vec![0u8; HEADER_SIZE as usize];
        storage.read_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        // QEMU's create makes the file hold the whole bitmap; a shorter
        // file claims a size it has no bitmap for.
        if HEADER_SIZE + h.bitmap_bytes() > file_len {
            return Err(corrupt(format!(
                "file of {file_len} bytes cannot hold the bitmap of a {}-byte disk",
                h.size
            )));
        }
        Ok(Cow {
            storage,
            size: h.sectors() * SECTOR,
            data_offset: h.data_offset(),
            words: h.sectors().div_ceil(64),
            bitmap: TableCache::new(false),
            backing: (!h.backing_file.is_empty()).then_some(h.backing_file),
            write_lock: Mutex::new(()),
        })
    }

    /// Whether sector `s` is present, and how many sectors from `s` on
    /// (within one cache chunk, at most `max`) share that answer.
    fn run(&self, s: u64, max: u64) -> Result<(bool, u64)> {
        let chunk = self
            .bitmap
            .get(self.storage.as_ref(), HEADER_SIZE, self.words, s / 64)?;
        let words = &chunk.entries[chunk.index..];
        let first_bit = s % 64;
        let limit = max.min(words.len() as u64 * 64 - first_bit);
        let present = words[0] >> first_bit & 1 == 1;
        // A word at a time: the bits that differ from the first one end
        // the run.
        let mut n = 0u64;
        let mut at = first_bit;
        while n < limit {
            let w = words[(at / 64) as usize];
            let shift = at % 64;
            let differ = if present { !w } else { w } >> shift;
            let left = 64 - shift;
            let same = if differ == 0 {
                left
            } else {
                u64::from(differ.trailing_zeros()).min(left)
            };
            n += same;
            at += same;
            if same < left {
                break;
            }
        }
        Ok((present, n.min(limit)))
    }

    fn set_bits(&self, first: u64, count: u64) -> Result<()> {
        let mut s = first;
        let end = first + count;
        while s < end {
            let w = s / 64;
            let lo = s % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.bitmap.entry(self.storage.as_ref(), HEADER_SIZE, self.words, w)?;
            if old & mask != mask {
                self.bitmap
                    .set(self.storage.as_ref(), HEADER_SIZE, self.words, w, old | mask)?;
            }
            s = w * 64 + hi;
        }
        Ok(())
    }
}

impl Driver for Cow {
    fn format(&self) -> Format {
        Format::Cow
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn backing(&self) -> Option<BackingRef> {
        self.backing.as_ref().map(|b| BackingRef {
            filename: b.clone(),
            format: None,
        })
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let s = offset / SECTOR;
        let in_sector = offset % SECTOR;
        let want = (in_sector + len).div_ceil(SECTOR);
        let (present, n) = self.run(s, want)?;
        let run = (n * SECTOR - in_sector).min(len);
        let kind = if present {
            Mapped::Data {
                file: 0,
                offset: self.data_offset + offset,
            }
        } else {
            Mapped::Unallocated
        };
        Ok(Mapping { kind, len: run })
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }

    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let _g = self.write_lock.lock();
        let first = offset / SECTOR;
        let end = offset + buf.len() as u64;
        let last = (end - 1) / SECTOR;
        // Partial sectors at either end not yet in this file are completed
        // from below, so that the whole sector can be marked present.
        let head = offset % SECTOR;
        let tail = end % SECTOR;
        let mut edges: Vec<u64> = Vec::new();
        if head != 0 {
            edges.push(first);
        }
        if tail != 0 && (last != first || head == 0) {
            edges.push(last);
        }
        for &sec in &edges {
            let (present, _) = self.run(sec, 1)?;
            if !present {
                let mut sb = [0u8; SECTOR as usize];
                below.read_below(&mut sb, sec * SECTOR)?;
                self.storage.write_at(&sb, self.data_offset + sec * SECTOR)?;
            }
        }
        self.storage.write_at(buf, self.data_offset + offset)?;
        // Data first, then the bits that make it visible; sectors already
        // present need neither the flush nor a bitmap write (as QEMU).
        let count = last - first + 1;
        let mut s = first;
        while s <= last {
            let (present, n) = self.run(s, last + 1 - s)?;
            if !present {
                self.storage.flush()?;
                return self.set_bits(first, count);
            }
            s += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo::default())
    }
}

/// Create an empty image: the header, then the file extended to hold the
/// whole (zeroed) bitmap, as QEMU did.
fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let backing = opts.take_str("backing_file")?.filter(|s| !s.is_empty());
    opts.finish("cow")?;
    if size > MAX_SIZE {
        return Err(invalid(format!("cow size {size} is too large")));
    }
    // The backing file's mtime, as QEMU recorded it (0 when it cannot be read).
    let mtime = backing
        .as_ref()
        .and_then(|b| match location.relative(b) {
            Location::File(p) => std::fs::metadata(p).ok(),
            _ => None,
        })
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as u32);
    let h = Header {
        backing_file: backing.unwrap_or_default(),
        mtime,
        size: size / SECTOR * SECTOR,
        sectorsize: 512,
    };
    let bytes = h.encode()?;
    let storage = location.create_storage()?;
    storage.write_at(&bytes, 0)?;
    storage.set_len(HEADER_SIZE + h.bitmap_bytes())?;
    storage.flush()
}

/// The bytes of a new image (for tests and fuzz seeds).
pub fn build_image(size: u64, backing: &str, mtime: u32) -> Result<Vec<u8>> {
    let h = Header {
        backing_file: backing.into(),
        mtime,
        size: size / SECTOR * SECTOR,
        sectorsize: 512,
    };
    let header = h.encode()?;
    let mut out = try_zeroed((HEADER_SIZE + h.bitmap_bytes()) as usize, "a new cow image")?;
    out[..header.len()].copy_from_slice(&header);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;
    use crate::error::ErrorKind;

    fn open_bytes(v: Vec<u8>) -> Result<Cow> {
        Cow::open(Arc::new(MemoryStorage::new(v, false)))
    }

    fn kind(r: Result<Cow>) -> ErrorKind {
        r.err().expect("must fail").kind()
    }

    struct Pattern;
    impl Below for Pattern {
        fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
        fn has_backing(&self) -> bool {
            true
        }
    }

    #[test]
    fn header_bytes() {
        let v = build_image(1 << 20, "base.raw", 0x01020304).unwrap();
        assert_eq!(v.len(), 1056 + 256);
        assert_eq!(&v[..8], &[0x4f, 0x4f, 0x4f, 0x4d, 0, 0, 0, 2]);
        assert_eq!(&v[8..16], b"base.raw");
        assert_eq!(v[16], 0);
        assert_eq!(&v[1032..1036], &[1, 2, 3, 4]);
        assert_eq!(&v[1040..1048], &[0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(&v[1048..1052], &[0, 0, 2, 0]);
        let c = open_bytes(v).unwrap();
        assert_eq!(c.data_offset, 1536);
        assert_eq!(c.backing().unwrap().filename, "base.raw");
    }

    #[test]
    fn writes_and_bitmap() {
        let c = open_bytes(build_image(1 << 20, "b", 0).unwrap()).unwrap();
        assert_eq!(
            c.map(0, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 1 << 20
            }
        );
        c.write_at(&[7u8; 1000], 700, &Pattern).unwrap();
        // Sectors 1..=3 present: 512..2048.
        assert_eq!(
            c.map(0, 4096).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 512
            }
        );
        assert_eq!(
            c.map(512, 4096).unwrap(),
            Mapping {
                kind: Mapped::Data {
                    file: 0,
                    offset: 1536 + 512
                },
                len: 1536
            }
        );
        let mut b = vec![0u8; 1536];
        c.storage.read_at(&mut b, 1536 + 512).unwrap();
        let want: Vec<u8> = (512..2048u64)
            .map(|o| if (700..1700).contains(&o) { 7 } else { (o % 251) as u8 })
            .collect();
        assert_eq!(b, want);
        // Bit order: sector 1..3 are bits 1..3 of byte 0.
        let mut bm = [0u8; 1];
        c.storage.read_at(&mut bm, 1056).unwrap();
        assert_eq!(bm[0], 0b1110);
        // Long runs and word boundaries.
        c.write_at(&vec![1u8; 200 * 512], 60 * 512, &NoBacking).unwrap();
        assert_eq!(c.map(60 * 512, 1 << 20).unwrap().len, 200 * 512);
        let c2 = Cow::open(c.storage.clone()).unwrap();
        assert_eq!(
            c2.map(59 * 512, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 512
            }
        );
        assert_eq!(c2.map(60 * 512 + 3, 1 << 20).unwrap().len, 200 * 512 - 3);
    }

    #[test]
    fn runs_match_a_bit_by_bit_count() {
        // 4096 sectors of pseudo-random runs.
        let mut v = build_image(4096 * 512, "", 0).unwrap();
        let mut x = 12345u64;
        let mut bits = vec![false; 4096];
        let mut i = 0;
        while i < 4096 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = ((x >> 33) % 150 + 1) as usize;
            let on = (x >> 20) & 1 == 1;
            for b in bits.iter_mut().skip(i).take(len) {
                *b = on;
            }
            i += len;
        }
        for (n, &b) in bits.iter().enumerate() {
            if b {
                v[1056 + n / 8] |= 1 << (n % 8);
            }
        }
        let c = open_bytes(v).unwrap();
        for s in (0..4096u64).step_by(7) {
            for max in [1u64, 5, 64, 200, 5000] {
                let (p, n) = c.run(s, max).unwrap();
                assert_eq!(p, bits[s as usize]);
                let want = bits[s as usize..]
                    .iter()
                    .take(max as usize)
                    .take_while(|&&b| b == p)
                    .count() as u64;
                assert_eq!(n, want, "at {s} max {max}");
            }
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let ok = build_image(1 << 20, "", 0).unwrap();
        assert!(open_bytes(ok.clone()).is_ok());
        assert_eq!(kind(open_bytes(ok[..1000].to_vec())), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[7] = 3;
        assert_eq!(kind(open_bytes(v)), ErrorKind::Unsupported);
        let mut v = ok.clone();
        v[8..8 + 1024].fill(b'a');
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[8..10].copy_from_slice(&[0xff, 0]);
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[1040..1048].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        // A size whose bitmap the file does not hold.
        let mut v = ok.clone();
        v[1040..1048].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[1048..1052].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[1048..1052].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        let mut v = ok;
        v[1048..1052].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::Unsupported);
    }
}
