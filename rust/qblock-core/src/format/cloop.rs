//! cloop: compressed loop images (Knoppix's cloop, version 2.0), read
//! only, as QEMU's block/cloop.c reads them.
//!
//! | offset       | size      | field                                       |
//! |--------------|-----------|---------------------------------------------|
//! | 0            | 128       | shell preamble "#!/bin/sh\n#V2.0 Format\n…", NUL-padded |
//! | 128          | 4         | block size (big-endian), a multiple of 512  |
//! | 132          | 4         | number of blocks n (big-endian)             |
//! | 136          | 8·(n+1)   | block offsets (big-endian u64)              |
//!
//! Block i is a zlib stream at `[offsets[i], offsets[i+1])` that inflates
//! to exactly one block. The disk is n blocks long.
//!
//! Checked at open, with QEMU's limits: a block size from 512 to 64 MiB in
//! multiples of 512 (QEMU's buffer cap), an offset table of at most 512 MiB
//! (QEMU's cap: 16 TB at 256 KiB blocks), offsets that never decrease, no
//! compressed block above 128 MiB (QEMU's "unrealistic" bound). Checked
//! beyond QEMU (whose reads fail there): the table inside the file, the
//! first block after the table, the last offset inside the file, no empty
//! block.
//!
//! Every block is compressed, so block status reports the whole disk as
//! compressed data (QEMU reports data). A read decodes whole blocks; the
//! last block decoded is kept per thread so sequential small reads decode
//! each block once.
//!
//! Writing is refused; a writable open fails with `Unsupported` (QEMU's
//! cloop refuses read-write use too).

use super::bytes::be32;
use super::dmg::codec;
use super::paged::{Order, Paged};
use crate::backend::Storage;
use crate::driver::{Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, unsupported, Error, Result};
use crate::format_name::Format;
use crate::registry::{FormatEntry, OpenCtx};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Cloop,
    probe: Some(probe),
    open: Some(open),
    create: None,
};

/// The version 2.0 preamble QEMU probes for.
pub const MAGIC_V2: &[u8] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
pub const HEADER_SIZE: u64 = 136;
pub const SECTOR: u64 = 512;
/// QEMU's cap on the block size: one block is decoded into one buffer.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// QEMU's cap on a compressed block ("compression performed poorly").
pub const MAX_COMPRESSED: u64 = 2 * MAX_BLOCK_SIZE as u64;
/// QEMU's cap on the offset table.
pub const MAX_OFFSETS_BYTES: u64 = 512 << 20;

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.starts_with(MAGIC_V2) {
        100
    } else if other_version(h).is_some() {
        // Another cloop version (QEMU reads those as raw): claimed so that
        // opening says "unsupported" instead of serving the script as a disk.
        50
    } else {
        0
    }
}

/// The version of a cloop preamble other than 2.0 ("#!/bin/sh\n#V4.0 Format\n…modprobe cloop…").
fn other_version(h: &[u8]) -> Option<String> {
    let pre = h.get(..128)?;
    let rest = pre.strip_prefix(b"#!/bin/sh\n#V".as_slice())?;
    let end = rest.iter().position(|&c| c == b' ' || c == b'\n')?;
    if !rest[end..].starts_with(b" Format\n") || !pre.windows(14).any(|w| w == b"modprobe cloop") {
        return None;
    }
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Distinguishes driver instances in the per-thread block cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last block this thread inflated: (driver id, block, bytes).
    static DECODED: RefCell<(u64, u64, Vec<u8>)> = const { RefCell::new((0, 0, Vec::new())) };
}

pub struct Cloop {
    storage: Arc<dyn Storage>,
    block_size: u64,
    /// n + 1 offsets, checked.
    offsets: Paged<u64>,
    id: u64,
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    if !ctx.read_only {
        return Err(unsupported("cloop images are read-only: open the image read-only"));
    }
    Ok(Box::new(Cloop::open(storage)?))
}

impl Cloop {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Cloop> {
        let file_len = storage.len()?;
        if file_len < HEADER_SIZE {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the cloop header"
            )));
        }
        let mut h = [0u8; HEADER_SIZE as usize];
        storage.read_at(&mut h, 0)?;
        if !h.starts_with(MAGIC_V2) {
            return Err(match other_version(&h) {
                Some(v) => unsupported(format!("cloop version {v} (only version 2.0 is supported)")),
                None => corrupt("not a cloop image (no version 2.0 preamble)"),
            });
        }
        let block_size = be32(&h, 128).unwrap_or(0);
        let n = be32(&h, 132).unwrap_or(0);
        if block_size == 0 || !block_size.is_multiple_of(SECTOR as u32) || block_size > MAX_BLOCK_SIZE {
            return Err(corrupt(format!(
                "block size {block_size} is not a multiple of 512 from 512 to {MAX_BLOCK_SIZE}"
            )));
        }
        let table = (n as u64 + 1) * 8;
        if table > MAX_OFFSETS_BYTES {
            return Err(corrupt(format!(
                "{n} blocks need an offset table of {table} bytes (the limit is {MAX_OFFSETS_BYTES})"
            )));
        }
        let table_end = HEADER_SIZE + table;
        if table_end > file_len {
            return Err(corrupt(format!(
                "offset table of {n} blocks does not fit the {file_len}-byte file"
            )));
        }
        // In 1 MiB pages: the table may be 512 MiB (QEMU's cap).
        let offsets = Paged::read(
            storage.as_ref(),
            HEADER_SIZE,
            n as usize + 1,
            Order::Big,
            "the cloop offset table",
            |v| v,
        )?;
        if offsets[0] < table_end {
            return Err(corrupt(format!(
                "block 0 starts at {}, inside the header or offset table (which end at {table_end})",
                offsets[0]
            )));
        }
        for i in 0..n as usize {
            let (a, b) = (offsets[i], offsets[i + 1]);
            if b < a {
                return Err(corrupt(format!("offsets decrease at block {i}: {a} then {b}")));
            }
            if b == a {
                return Err(corrupt(format!("block {i} is empty (offset {a})")));
            }
            if b - a > MAX_COMPRESSED {
                return Err(corrupt(format!(
                    "block {i} has {} compressed bytes (the limit is {MAX_COMPRESSED})",
                    b - a
                )));
            }
        }
        if offsets[n as usize] > file_len {
            return Err(corrupt(format!(
                "the last block ends at {}, beyond the {file_len}-byte file",
                offsets[n as usize]
            )));
        }
        Ok(Cloop {
            storage,
            block_size: block_size as u64,
            offsets,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn blocks(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    fn inflate(&self, block: u64, out: &mut [u8]) -> Result<()> {
        let (a, b) = (self.offsets[block as usize], self.offsets[block as usize + 1]);
        // Read in pieces: a block may store up to MAX_COMPRESSED (128 MiB).
        let mut input = codec::Stored::new(self.storage.as_ref(), a, b - a)?;
        codec::zlib_pieces(&mut input, out).map_err(|e| e.context(format!("cloop block {block}")))
    }
}

impl Drop for Cloop {
    fn drop(&mut self) {
        let _ = DECODED.try_with(|d| {
            if let Ok(mut d) = d.try_borrow_mut() {
                if d.0 == self.id {
                    *d = (0, 0, Vec::new());
                }
            }
        });
    }
}

impl Driver for Cloop {
    fn format(&self) -> Format {
        Format::Cloop
    }
    fn virtual_size(&self) -> u64 {
        self.blocks() * self.block_size
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let run = self.block_size - offset % self.block_size;
        Ok(Mapping {
            kind: Mapped::Encoded,
            len: run.min(len),
        })
    }
    fn map_status(&self, offset: u64, len: u64) -> Result<Mapping> {
        // Every block is compressed: one answer for the whole range.
        let _ = offset;
        Ok(Mapping {
            kind: Mapped::Encoded,
            len,
        })
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }
    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let block = offset / self.block_size;
        let from = (offset % self.block_size) as usize;
        let size = self.block_size as usize;
        let to = from + buf.len();
        if to > size {
            return Err(Error::Internal(format!("cloop read at {offset} crosses its block")));
        }
        if buf.len() == size {
            return self.inflate(block, buf);
        }
        DECODED.with(|d| {
            let mut d = d.borrow_mut();
            if d.0 != self.id || d.1 != block || d.2.len() != size {
                d.0 = 0;
                if d.2.capacity() > 2 * size.max(1 << 20) {
                    d.2 = Vec::new();
                }
                d.2.clear();
                d.2.try_reserve_exact(size)
                    .map_err(|_| Error::NoMemory(format!("cannot allocate {size} bytes for a cloop block")))?;
                d.2.resize(size, 0);
                self.inflate(block, &mut d.2)?;
                d.0 = self.id;
                d.1 = block;
            }
            buf.copy_from_slice(&d.2[from..to]);
            Ok(())
        })
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("cloop images are read-only"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _below: &dyn Below) -> Result<()> {
        Err(unsupported("cloop images are read-only"))
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
    use std::io::Write;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// An image of the given blocks (already compressed), and its header fields.
    fn build(block_size: u32, blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut img = MAGIC_V2.to_vec();
        img.resize(128, 0);
        img.extend_from_slice(&block_size.to_be_bytes());
        img.extend_from_slice(&(blocks.len() as u32).to_be_bytes());
        let mut off = HEADER_SIZE + 8 * (blocks.len() as u64 + 1);
        for b in blocks {
            img.extend_from_slice(&off.to_be_bytes());
            off += b.len() as u64;
        }
        img.extend_from_slice(&off.to_be_bytes());
        for b in blocks {
            img.extend_from_slice(b);
        }
        img
    }

    fn sample() -> (Vec<u8>, Vec<u8>) {
        let model: Vec<u8> = (0..3 * 4096).map(|i| (i * 13 / 7) as u8).collect();
        let blocks: Vec<Vec<u8>> = model.chunks(4096).map(zlib).collect();
        (build(4096, &blocks), model)
    }

    fn open_bytes(b: Vec<u8>) -> Result<Cloop> {
        Cloop::open(Arc::new(MemoryStorage::new(b, true)))
    }

    #[test]
    fn reads_whole_and_partial_blocks() {
        let (img, model) = sample();
        assert_eq!(probe(&img, &MemoryStorage::new(vec![], true)), 100);
        let d = open_bytes(img).unwrap();
        assert_eq!(d.virtual_size(), model.len() as u64);
        assert_eq!(
            d.map(100, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Encoded,
                len: 3996
            }
        );
        assert_eq!(d.map_status(100, 9000).unwrap().len, 9000);
        let mut all = vec![0u8; 4096];
        d.read_encoded(&mut all, 4096).unwrap();
        assert_eq!(all, model[4096..8192]);
        for (off, n) in [(0u64, 1usize), (1, 4095), (8192 + 7, 100), (4096 + 4000, 96), (5, 10)] {
            let mut b = vec![0u8; n];
            d.read_encoded(&mut b, off).unwrap();
            assert_eq!(b, model[off as usize..off as usize + n]);
        }
    }

    #[test]
    fn other_versions_are_unsupported() {
        let (img, _) = sample();
        let mut v4 = img.clone();
        v4[12] = b'4';
        let s = MemoryStorage::new(vec![], true);
        assert_eq!(probe(&v4, &s), 50);
        let e = open_bytes(v4).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("version 4.0"), "{e}");
        let mut junk = img.clone();
        junk[..9].copy_from_slice(b"#!/bin/ba");
        assert_eq!(probe(&junk, &s), 0);
        assert_eq!(open_bytes(junk).err().unwrap().kind(), ErrorKind::CorruptImage);
        assert_eq!(probe(b"#!/bin/sh\n#V2.0 Format\n", &s), 0);
    }

    #[test]
    fn an_empty_disk_opens() {
        let d = open_bytes(build(512, &[])).unwrap();
        assert_eq!(d.virtual_size(), 0);
    }

    #[test]
    fn writes_and_writable_opens_are_refused() {
        let (img, _) = sample();
        let loc = Location::File("x.cloop".into());
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
    }

    #[test]
    fn hostile_headers_and_tables_are_corrupt() {
        let (img, _) = sample();
        let set32 = |at: usize, v: u32| {
            let mut b = img.clone();
            b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            b
        };
        let set64 = |i: usize, v: u64| {
            let mut b = img.clone();
            let at = HEADER_SIZE as usize + 8 * i;
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            b
        };
        for (want, b) in [
            ("shorter", img[..100].to_vec()),
            ("block size", set32(128, 0)),
            ("block size", set32(128, 1000)),
            ("block size", set32(128, MAX_BLOCK_SIZE + 512)),
            ("limit", set32(132, u32::MAX)),
            ("does not fit", set32(132, 1 << 20)),
            ("inside the header", set64(0, 0)),
            ("decrease", set64(1, 100)),
            ("empty", build(512, &[zlib(&[0u8; 512]), vec![], zlib(&[1u8; 512])])),
            ("beyond", set64(3, img.len() as u64 + 1)),
            ("limit is", set64(3, u64::MAX)),
        ] {
            let e = open_bytes(b).err().unwrap_or_else(|| panic!("{want}: opened"));
            assert_eq!(e.kind(), ErrorKind::CorruptImage, "{want}: {e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        // A compressed block over QEMU's 128 MiB bound.
        let mut big = build(512, &[vec![1u8; 10]]);
        let end = HEADER_SIZE as usize + 8;
        big[end..end + 8].copy_from_slice(&(MAX_COMPRESSED + 200).to_be_bytes());
        let e = open_bytes(big).err().unwrap();
        assert!(e.to_string().contains("compressed bytes"), "{e}");
    }

    #[test]
    fn bad_block_data_fails_the_read() {
        let data = vec![7u8; 1024];
        for stored in [
            zlib(&data[..512]),
            zlib(&[7u8; 1536]),
            vec![0x78, 0x9c, 1, 2, 3],
            zlib(&(0..1024u32).map(|i| (i * i * 31 % 251) as u8).collect::<Vec<u8>>())[..30].to_vec(),
        ] {
            let d = open_bytes(build(1024, &[stored])).unwrap();
            let mut b = vec![0u8; 10];
            assert_eq!(d.read_encoded(&mut b, 0).unwrap_err().kind(), ErrorKind::CorruptImage);
        }
    }
}
