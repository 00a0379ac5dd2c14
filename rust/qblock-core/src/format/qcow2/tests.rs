//! Unit tests of the driver on in-memory images built byte by byte: a small
//! valid image, then one hostile variation per rejection. Each must fail
//! with the right error kind, quickly, without panicking or allocating by
//! what the image claims.

use super::types::*;
use super::Qcow2;
use crate::backend::memory::MemoryStorage;
use crate::backend::Storage;
use crate::driver::{Driver, Mapped, NoBacking};
use crate::error::{ErrorKind, Result};
use crate::location::Location;
use crate::registry::OpenCtx;
use std::sync::Arc;

const CS: usize = 512;
const SIZE: u64 = 1 << 20;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid v3 image with 512-byte clusters: header (0), refcount table (1),
/// refcount block (2), L1 (3), one L2 table (4), one data cluster (5) full
/// of 0xab mapped at guest offset 0.
pub(super) fn base() -> Vec<u8> {
    let mut b = vec![0u8; 6 * CS];
    b[0..4].copy_from_slice(MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 9);
    put64(&mut b, 24, SIZE);
    put32(&mut b, 36, 32); // 32 L1 entries of 32 KiB each
    put64(&mut b, 40, 3 * CS as u64);
    put64(&mut b, 48, CS as u64);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    put64(&mut b, CS, 2 * CS as u64);
    for c in 0..6 {
        b[2 * CS + 2 * c + 1] = 1;
    }
    put64(&mut b, 3 * CS, (4 * CS as u64) | COPIED);
    put64(&mut b, 4 * CS, (5 * CS as u64) | COPIED);
    b[5 * CS..6 * CS].fill(0xab);
    b
}

pub(super) fn open_bytes(b: Vec<u8>, read_only: bool) -> Result<Qcow2> {
    let loc = Location::file("/nonexistent/qcow2-unit-test.qcow2");
    let ctx = OpenCtx {
        location: &loc,
        read_only,
        direct: false,
        check: false,
        force_share: false,
        refs: crate::reference::RefRules::any(),
        inspect: None,
    };
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new(b, read_only));
    Qcow2::open(s, &ctx)
}

/// Open image bytes, keeping the storage to look at afterwards; `check` as
/// `qemu-img check` opens.
pub(super) fn open_bytes_ctx(b: Vec<u8>, read_only: bool, check: bool) -> Result<(Qcow2, Arc<MemoryStorage>)> {
    let loc = Location::file("/nonexistent/qcow2-unit-test.qcow2");
    let ctx = OpenCtx {
        location: &loc,
        read_only,
        direct: false,
        check,
        force_share: false,
        refs: crate::reference::RefRules::any(),
        inspect: None,
    };
    let m = Arc::new(MemoryStorage::new(b, read_only));
    let s: Arc<dyn Storage> = m.clone();
    Ok((Qcow2::open(s, &ctx)?, m))
}

pub(super) fn read(d: &Qcow2, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let pos = off + done as u64;
        let m = d.map(pos, (len - done) as u64)?;
        let n = m.len as usize;
        let chunk = &mut out[done..done + n];
        match m.kind {
            Mapped::Data { file, offset } => d.host_file(file).unwrap().read_at(chunk, offset)?,
            Mapped::Encoded => d.read_encoded(chunk, pos)?,
            _ => chunk.fill(0),
        }
        done += n;
    }
    Ok(out)
}

fn kind_of(r: Result<Qcow2>) -> ErrorKind {
    match r {
        Ok(_) => panic!("hostile image was accepted"),
        Err(e) => e.kind(),
    }
}

fn corrupt_open(f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = base();
    f(&mut b);
    assert_eq!(kind_of(open_bytes(b, true)), ErrorKind::CorruptImage);
}

fn corrupt_read(f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = base();
    f(&mut b);
    let d = open_bytes(b, true).expect("opens");
    let Err(e) = read(&d, 0, 4096) else {
        panic!("hostile entry was read")
    };
    assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
}

#[test]
fn valid_base_image_reads_and_writes() {
    let d = open_bytes(base(), false).unwrap();
    assert_eq!(read(&d, 0, CS).unwrap(), vec![0xab; CS]);
    assert_eq!(read(&d, CS as u64, 10).unwrap(), vec![0; 10]);
    d.write_at(&[7u8; 1000], 300, &NoBacking).unwrap();
    d.write_at(&[9u8; 3], SIZE - 3, &NoBacking).unwrap();
    let r = read(&d, 0, 2000).unwrap();
    assert_eq!(&r[..300], &[0xab; 300][..]);
    assert_eq!(&r[300..1300], &[7u8; 1000][..]);
    assert_eq!(&r[1300..], &vec![0u8; 700][..]);
    assert_eq!(read(&d, SIZE - 4, 4).unwrap(), vec![0, 9, 9, 9]);
    d.write_zeroes(0, 4096, &NoBacking).unwrap();
    assert_eq!(read(&d, 0, 4096).unwrap(), vec![0; 4096]);
    d.truncate(SIZE * 4).unwrap();
    d.write_at(&[1u8; 5], SIZE * 4 - 5, &NoBacking).unwrap();
    assert_eq!(read(&d, SIZE * 4 - 6, 6).unwrap(), vec![0, 1, 1, 1, 1, 1]);
}

#[test]
fn bad_magic() {
    corrupt_open(|b| b[0] = b'X');
}

#[test]
fn unsupported_version() {
    let mut b = base();
    put32(&mut b, 4, 4);
    assert_eq!(kind_of(open_bytes(b, true)), ErrorKind::Unsupported);
}

#[test]
fn cluster_bits_out_of_range() {
    corrupt_open(|b| put32(b, 20, 8));
    corrupt_open(|b| put32(b, 20, 22));
    corrupt_open(|b| put32(b, 20, 0xffff_ffff));
}

#[test]
fn header_length_too_short_or_too_long() {
    corrupt_open(|b| put32(b, 100, 100));
    corrupt_open(|b| put32(b, 100, 513));
}

#[test]
fn header_length_not_multiple_of_8() {
    corrupt_open(|b| put32(b, 100, 108));
}

#[test]
fn names_with_nul_bytes() {
    corrupt_open(|b| {
        put64(b, 8, 400);
        put32(b, 16, 8);
        b[400..408].copy_from_slice(b"base\0raw");
    });
    corrupt_open(|b| {
        put32(b, 112, EXT_BACKING_FORMAT);
        put32(b, 116, 4);
        b[120..124].copy_from_slice(b"r\0aw");
    });
}

#[test]
fn feature_table_not_multiple_of_48() {
    corrupt_open(|b| {
        put32(b, 112, EXT_FEATURE_TABLE);
        put32(b, 116, 50);
    });
}

#[test]
fn refcount_block_on_the_l1_table_found_before_writing() {
    let mut b = base();
    put64(&mut b, CS, 3 * CS as u64);
    let before = b.clone();
    let d = open_bytes(b, false).unwrap();
    let e = d.write_at(&[1u8; 10], 40000, &NoBacking).expect_err("accepted");
    assert_eq!(e.kind(), ErrorKind::CorruptImage);
    let mut after = vec![0u8; before.len()];
    d.file.read_at(&mut after, 0).unwrap();
    assert_eq!(after, before, "nothing may be written to such an image");
}

#[test]
fn absurd_l1_size() {
    corrupt_open(|b| put32(b, 36, 0x7fff_ffff));
    corrupt_open(|b| put32(b, 36, 4 << 20 | 1)); // just past the 32 MiB cap
}

#[test]
fn l1_too_small_for_virtual_size() {
    corrupt_open(|b| put32(b, 36, 31));
}

#[test]
fn virtual_size_beyond_63_bits() {
    corrupt_open(|b| put64(b, 24, u64::MAX));
}

#[test]
fn l1_table_unaligned_or_beyond_file() {
    corrupt_open(|b| put64(b, 40, 3 * CS as u64 + 8));
    corrupt_open(|b| put64(b, 40, 1 << 40));
    corrupt_open(|b| put64(b, 40, !511));
}

#[test]
fn refcount_table_beyond_file_or_too_big() {
    corrupt_open(|b| put64(b, 48, 1 << 30));
    corrupt_open(|b| put32(b, 56, 0x10_0000)); // 512 MiB > 8 MiB cap
    corrupt_open(|b| put32(b, 56, 0));
    corrupt_open(|b| put64(b, 48, 0));
}

#[test]
fn refcount_order_above_6() {
    corrupt_open(|b| put32(b, 96, 7));
}

#[test]
fn overlapping_metadata() {
    // L1 table on top of the refcount table.
    corrupt_open(|b| put64(b, 40, CS as u64));
    // Refcount table on top of the header.
    corrupt_open(|b| put64(b, 48, 0));
    // Snapshot table over the L1 table.
    corrupt_open(|b| {
        put32(b, 60, 1);
        put64(b, 64, 3 * CS as u64);
    });
}

#[test]
fn too_many_snapshots() {
    corrupt_open(|b| {
        put32(b, 60, MAX_SNAPSHOTS + 1);
        put64(b, 64, 5 * CS as u64);
    });
}

/// One snapshot whose header sits in cluster 5 (read-only opens only look
/// at it) with its own L1 table in cluster 4.
fn with_snapshot(b: &mut [u8], extra: u32, l1_size: u32) {
    put32(b, 60, 1);
    put64(b, 64, 5 * CS as u64);
    let s = 5 * CS;
    b[s..s + 64].fill(0);
    put64(b, s, 4 * CS as u64);
    put32(b, s + 8, l1_size);
    put32(b, s + 36, extra);
}

#[test]
fn snapshot_table_checks() {
    let mut b = base();
    with_snapshot(&mut b, 16, 32);
    open_bytes(b, true).expect("a plain snapshot table opens");
    corrupt_open(|b| with_snapshot(b, 1025, 32));
    corrupt_open(|b| with_snapshot(b, u32::MAX, 32));
    corrupt_open(|b| with_snapshot(b, 16, 4 << 20 | 1));
    corrupt_open(|b| with_snapshot(b, 16, 1 << 20)); // L1 past the end of the file
    corrupt_open(|b| {
        with_snapshot(b, 16, 32);
        put64(b, 5 * CS, 4 * CS as u64 + 8);
    });
}

#[test]
fn backing_name_too_long_or_outside_cluster() {
    corrupt_open(|b| {
        put64(b, 8, 200);
        put32(b, 16, 1024);
    });
    corrupt_open(|b| {
        put64(b, 8, 500);
        put32(b, 16, 100);
    });
    corrupt_open(|b| {
        put64(b, 8, u64::MAX - 3);
        put32(b, 16, 10);
    });
}

#[test]
fn extension_length_overflow() {
    corrupt_open(|b| {
        put32(b, 112, 0x1234_5678);
        put32(b, 116, 0xffff_ffff);
    });
    corrupt_open(|b| {
        put32(b, 112, 0x1234_5678);
        put32(b, 116, 512 - 112 - 8 + 1);
    });
}

#[test]
fn backing_format_extension_too_long() {
    corrupt_open(|b| {
        put32(b, 112, EXT_BACKING_FORMAT);
        put32(b, 116, 40);
    });
}

#[test]
fn bitmaps_extension_malformed() {
    corrupt_open(|b| {
        put32(b, 112, EXT_BITMAPS);
        put32(b, 116, 16);
    });
    corrupt_open(|b| {
        put32(b, 112, EXT_BITMAPS);
        put32(b, 116, 24);
        put32(b, 120, 1);
        put64(b, 128, u64::MAX);
        put64(b, 136, 5 * CS as u64);
    });
}

/// A bitmaps extension whose directory (one entry, 32 bytes) is in cluster 5.
fn with_bitmap(b: &mut [u8], patch: impl FnOnce(&mut [u8])) {
    put32(b, 112, EXT_BITMAPS);
    put32(b, 116, 24);
    put32(b, 120, 1);
    put64(b, 128, 32);
    put64(b, 136, 5 * CS as u64);
    put64(b, 88, AUTOCLEAR_BITMAPS);
    let d = 5 * CS;
    b[d..d + 32].fill(0);
    put32(b, d + 12, 2); // auto
    b[d + 16] = 1; // dirty tracking
    b[d + 17] = 16; // 64 KiB granularity
    b[d + 19] = 3; // name size
    b[d + 24..d + 27].copy_from_slice(b"bm0");
    patch(&mut b[d..d + 32]);
}

#[test]
fn bitmap_directory_checks() {
    let mut b = base();
    with_bitmap(&mut b, |_| {});
    let d = open_bytes(b, true).expect("a plain bitmap directory opens");
    let fs = d.info().unwrap().format_specific;
    assert!(fs.iter().any(|(k, _)| k == "bitmaps"));
    corrupt_open(|b| with_bitmap(b, |e| e[16] = 2)); // unknown type
    corrupt_open(|b| with_bitmap(b, |e| e[17] = 40)); // granularity
    corrupt_open(|b| with_bitmap(b, |e| e[19] = 0)); // empty name
    corrupt_open(|b| with_bitmap(b, |e| put32(e, 12, 1 << 7))); // reserved flag
    corrupt_open(|b| with_bitmap(b, |e| put32(e, 20, 4096))); // extra data overruns
    corrupt_open(|b| {
        with_bitmap(b, |e| {
            put64(e, 0, 1 << 40);
            put32(e, 8, 1);
        })
    }); // table past EOF
    corrupt_open(|b| {
        with_bitmap(b, |_| {});
        put64(b, 128, 40); // directory size does not match its entries
    });
}

#[test]
fn unknown_extensions_are_skipped() {
    let mut b = base();
    put32(&mut b, 112, 0xdead_beef);
    put32(&mut b, 116, 5);
    // Next extension after 8 bytes of padded data: end marker.
    let d = open_bytes(b, true).unwrap();
    assert_eq!(d.hdr.unknown_extensions, vec![0xdead_beef]);
}

#[test]
fn unknown_extensions_survive_writes() {
    let mut b = base();
    put32(&mut b, 112, 0x0bad_cafe);
    put32(&mut b, 116, 12);
    b[120..132].copy_from_slice(b"opaque bytes");
    let before = b[..CS].to_vec();
    let d = open_bytes(b, false).unwrap();
    d.write_at(&[1u8; 3000], 70000, &NoBacking).unwrap();
    d.truncate(SIZE * 64).unwrap(); // moves the L1 table: header fields change
    let mut after = vec![0u8; CS];
    d.file.read_at(&mut after, 0).unwrap();
    assert_eq!(after[104..], before[104..], "extension area changed");
    assert_eq!(be64(&after, 24), SIZE * 64);
}

#[test]
fn l1_entry_unaligned_or_past_eof() {
    // Reserved bits (QEMU never sets them; an offset "inside" a 512-byte
    // cluster shows up there).
    corrupt_open(|b| put64(b, 3 * CS, (4 * CS as u64 + 16) | COPIED));
    corrupt_open(|b| put64(b, 3 * CS, (4 * CS as u64) | COPIED | (1 << 60)));
    corrupt_open(|b| put64(b, 3 * CS + 8, (1 << 40) | COPIED));
}

#[test]
fn l2_entry_unaligned_or_past_eof() {
    corrupt_read(|b| put64(b, 4 * CS, (5 * CS as u64 + 8) | COPIED));
    // Past the end of the file (a crash lost the write that extended it):
    // zeroes, as QEMU reads them.
    for e in [1 << 40, OFFSET_MASK] {
        let mut b = base();
        put64(&mut b, 4 * CS, e | COPIED);
        let d = open_bytes(b, true).expect("opens");
        assert_eq!(read(&d, 0, 4096).unwrap(), vec![0; 4096]);
    }
}

#[test]
fn compressed_cluster_outside_file_or_undecodable() {
    let g = Geometry::new(9, false);
    // Offset beyond the file.
    corrupt_read(|b| put64(b, 4 * CS, COMPRESSED | (1u64 << 40)));
    // Maximal size field at the end of the offset range: must not overflow.
    corrupt_read(|b| {
        put64(
            b,
            4 * CS,
            COMPRESSED | (g.csize_mask << g.csize_shift) | ((1u64 << g.csize_shift) - 1),
        )
    });
    // Garbage deflate data inside the file.
    corrupt_read(|b| put64(b, 4 * CS, COMPRESSED | (5 * CS as u64)));
    // Compressed with the copied flag and an external data file is corrupt
    // too, but needs a data file; covered by `decode` tests.
}

#[test]
fn unknown_incompatible_bit() {
    let mut b = base();
    put64(&mut b, 72, 1 << 33);
    assert_eq!(kind_of(open_bytes(b.clone(), true)), ErrorKind::Unsupported);
    // Named from the image's feature table.
    put32(&mut b, 112, EXT_FEATURE_TABLE);
    put32(&mut b, 116, 48);
    b[120] = 0;
    b[121] = 33;
    b[122..132].copy_from_slice(b"warp drive");
    let Err(e) = open_bytes(b, true) else {
        panic!("accepted")
    };
    assert!(e.to_string().contains("bit 33 (warp drive)"), "{e}");
}

#[test]
fn encryption_is_unsupported_and_unknown_method_corrupt() {
    let mut b = base();
    put32(&mut b, 32, 2);
    assert_eq!(kind_of(open_bytes(b, true)), ErrorKind::Unsupported);
    corrupt_open(|b| put32(b, 32, 5));
}

#[test]
fn compression_type_without_feature_bit() {
    corrupt_open(|b| b[104] = 1);
    corrupt_open(|b| put64(b, 72, INCOMPAT_COMPRESSION)); // bit set for zlib
    let mut b = base();
    put64(&mut b, 72, INCOMPAT_COMPRESSION);
    b[104] = 9;
    assert_eq!(kind_of(open_bytes(b, true)), ErrorKind::Unsupported);
}

#[test]
fn data_file_bit_without_name_or_raw_without_data_file() {
    corrupt_open(|b| put64(b, 72, INCOMPAT_DATA_FILE));
    corrupt_open(|b| put64(b, 88, AUTOCLEAR_DATA_FILE_RAW));
}

#[test]
fn data_file_that_is_the_image_or_its_backing_file() {
    let name = b"qcow2-unit-test.qcow2"; // the image's own name (see open_bytes)
    corrupt_open(|b| {
        put64(b, 72, INCOMPAT_DATA_FILE);
        put32(b, 112, EXT_DATA_FILE);
        put32(b, 116, name.len() as u32);
        b[120..120 + name.len()].copy_from_slice(name);
    });
    corrupt_open(|b| {
        put64(b, 72, INCOMPAT_DATA_FILE);
        put32(b, 112, EXT_DATA_FILE);
        put32(b, 116, 8);
        b[120..128].copy_from_slice(b"base.raw");
        put64(b, 8, 300);
        put32(b, 16, 8);
        b[300..308].copy_from_slice(b"base.raw");
    });
}

#[test]
fn extended_l2_needs_16k_clusters() {
    corrupt_open(|b| put64(b, 72, INCOMPAT_EXTL2));
}

#[test]
fn dirty_and_corrupt_bits() {
    let mut b = base();
    put64(&mut b, 72, INCOMPAT_DIRTY);
    // Stale refcount of the data cluster (as after a crash with lazy refcounts).
    b[2 * CS + 11] = 0;
    let d = open_bytes(b.clone(), true).unwrap();
    assert!(d.info().unwrap().dirty);
    // A writable open recounts, then clears the bit.
    let d = open_bytes(b, false).unwrap();
    assert!(!d.info().unwrap().dirty);
    let h = d.hdr.clone();
    let mut blk = vec![0u8; CS];
    d.file.read_at(&mut blk, h.refcount_table_offset).unwrap();
    let block = be64(&blk, 0);
    d.file.read_at(&mut blk, block).unwrap();
    // Header, L1, L2, data and the new table and block are in use; the old
    // table and block (clusters 1, 2) are not referenced any more.
    let counts: Vec<u16> = (0..9).map(|c| be16(&blk, 2 * c)).collect();
    assert_eq!(counts, vec![1, 0, 0, 1, 1, 1, 1, 1, 0]);
    d.write_at(&[1u8; 600], 100, &NoBacking).unwrap();
    let mut b = base();
    put64(&mut b, 72, INCOMPAT_CORRUPT);
    assert!(open_bytes(b.clone(), true).is_ok());
    assert_eq!(kind_of(open_bytes(b, false)), ErrorKind::CorruptImage);
}

#[test]
fn refcount_block_past_eof_found_at_first_write() {
    let mut b = base();
    put64(&mut b, CS, 1 << 40);
    let d = open_bytes(b, false).unwrap();
    let e = d.write_at(&[1u8; 10], 40000, &NoBacking).expect_err("accepted");
    assert_eq!(e.kind(), ErrorKind::CorruptImage);
}

#[test]
fn shared_cluster_is_copied_not_overwritten() {
    // Data cluster 5 with refcount 2 and no copied flag (as after a snapshot).
    let mut b = base();
    put64(&mut b, 4 * CS, 5 * CS as u64);
    b[2 * CS + 11] = 2;
    let d = open_bytes(b, false).unwrap();
    d.write_at(&[1u8; 4], 2, &NoBacking).unwrap();
    assert_eq!(read(&d, 0, 8).unwrap(), vec![0xab, 0xab, 1, 1, 1, 1, 0xab, 0xab]);
    let mut host = vec![0u8; CS];
    d.file.read_at(&mut host, 5 * CS as u64).unwrap();
    assert_eq!(host, vec![0xab; CS], "the shared cluster must stay untouched");
}

#[test]
fn data_write_onto_metadata_is_refused() {
    // Guest cluster 1 claims the L1 table's cluster as its own data.
    let mut b = base();
    put64(&mut b, 4 * CS + 8, (3 * CS as u64) | COPIED);
    let d = open_bytes(b, false).unwrap();
    let e = d
        .write_at(&[0xffu8; 16], CS as u64, &NoBacking)
        .expect_err("metadata overwritten");
    assert_eq!(e.kind(), ErrorKind::CorruptImage);
    let mut l1 = vec![0u8; 8];
    d.file.read_at(&mut l1, 3 * CS as u64).unwrap();
    assert_eq!(be64(&l1, 0), (4 * CS as u64) | COPIED);
}

#[test]
fn releasing_a_hostile_entry_never_touches_metadata_refcounts() {
    // A compressed cluster "stored" in the L1 table, and a data cluster that
    // is the L2 table itself: zeroing or discarding must not lower the
    // refcounts of those metadata clusters.
    for entry in [COMPRESSED | (3 * CS as u64), (4 * CS as u64)] {
        let mut b = base();
        put64(&mut b, 4 * CS + 8, entry);
        let before = b[2 * CS..3 * CS].to_vec();
        let d = open_bytes(b, false).unwrap();
        assert_eq!(
            d.discard(CS as u64, CS as u64).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
        assert_eq!(
            d.write_zeroes(CS as u64, CS as u64, &NoBacking).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
        let mut after = vec![0u8; CS];
        d.file.read_at(&mut after, 2 * CS as u64).unwrap();
        assert_eq!(after, before);
    }
}

#[test]
fn discard_releases_clusters() {
    let d = open_bytes(base(), false).unwrap();
    d.write_at(&[5u8; 2048], 4096, &NoBacking).unwrap();
    d.discard(0, 8192).unwrap();
    assert_eq!(read(&d, 0, 8192).unwrap(), vec![0; 8192]);
    assert!(matches!(d.map(0, 8192).unwrap().kind, Mapped::Unallocated));
    let mut rc = vec![0u8; 2];
    d.file.read_at(&mut rc, 2 * CS as u64 + 10).unwrap();
    assert_eq!(rc, [0, 0], "the data cluster's refcount was released");
}

/// Random corruption of a valid image's first clusters never panics.
#[test]
fn header_fuzz_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let mut b = base();
        for _ in 0..(next() % 6 + 1) {
            let at = (next() % (b.len() as u64)) as usize;
            b[at] = next() as u8;
        }
        if next() % 3 == 0 {
            b[79] |= 1; // dirty: a writable open recounts the hostile metadata
        }
        let ro = next() % 2 == 0;
        if let Ok(d) = open_bytes(b, ro) {
            let _ = read(&d, next() % SIZE, 4096.min((SIZE - 1) as usize));
            if !ro {
                let off = next() % (SIZE - 100);
                let _ = d.write_at(&[3u8; 100], off, &NoBacking);
                let _ = d.write_zeroes(off, 100, &NoBacking);
            }
        }
    }
}

/// Storage whose writes start failing after a budget, like a full disk.
struct Failing {
    inner: MemoryStorage,
    budget: std::sync::atomic::AtomicI64,
}

impl Storage for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.budget.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
            return Err(crate::error::Error::os(
                "write",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "<failing>".into()
    }
}

#[test]
fn failed_writes_leave_a_usable_image() {
    for budget in 0..60i64 {
        let s = Arc::new(Failing {
            inner: MemoryStorage::new(base(), false),
            budget: budget.into(),
        });
        let loc = Location::file("/nonexistent/x.qcow2");
        let ctx = OpenCtx {
            location: &loc,
            read_only: false,
            direct: false,
            check: false,
            force_share: false,
            refs: crate::reference::RefRules::any(),
            inspect: None,
        };
        let d = Qcow2::open(s.clone(), &ctx).unwrap();
        let mut failed = false;
        // Enough allocation to grow refcount blocks and the table.
        for i in 0..200u64 {
            if d.write_at(&[i as u8 + 1; 700], i * 5000, &NoBacking).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || budget >= 60);
        // The disk has room again: the state reloads from disk and works.
        s.budget.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        for i in 0..50u64 {
            d.write_at(&[0xee; 300], 600_000 + i * 3000, &NoBacking).unwrap();
        }
        drop(d);
        let d = Qcow2::open(s, &ctx).unwrap();
        for i in 0..50u64 {
            assert_eq!(
                read(&d, 600_000 + i * 3000, 300).unwrap(),
                vec![0xee; 300],
                "budget {budget}"
            );
        }
    }
}

/// One logged storage event: a write (offset, bytes) or a flush (None).
type Event = Option<(u64, Vec<u8>)>;

/// Storage that logs every write and flush, to replay power losses.
struct Recording {
    inner: MemoryStorage,
    log: parking_lot::Mutex<Vec<Event>>,
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.log.lock().push(Some((offset, buf.to_vec())));
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.log.lock().push(None);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        // A growth replays as an empty write at the new end. A shrink is
        // not logged: a replayed state keeps the longer file, as a crash
        // before the truncation reached the disk would.
        if len > self.inner.len()? {
            self.log.lock().push(Some((len, Vec::new())));
        }
        self.inner.set_len(len)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "<recording>".into()
    }
}

/// A recording storage holding `b`.
fn recording(b: &[u8]) -> Arc<Recording> {
    Arc::new(Recording {
        inner: MemoryStorage::new(b.to_vec(), false),
        log: Default::default(),
    })
}

/// Open the image in `s` for writing.
fn open_writable(s: Arc<dyn Storage>) -> Qcow2 {
    let loc = Location::file("/nonexistent/qcow2-unit-test.qcow2");
    let ctx = OpenCtx {
        location: &loc,
        read_only: false,
        direct: false,
        check: false,
        force_share: false,
        refs: crate::reference::RefRules::any(),
        inspect: None,
    };
    Qcow2::open(s, &ctx).unwrap()
}

/// Power loss at any point: everything before some flush reached the disk,
/// and any subset of the writes after it. In every such state the image
/// must open and no cluster may have fewer references counted than it is
/// referenced (leaks are fine, QEMU's rule).
#[test]
fn crash_at_any_point_leaves_refcounts_covering_references() {
    let start = base();
    let rec = recording(&start);
    let d = open_writable(rec.clone());
    for i in 0..40u64 {
        d.write_at(&[i as u8; 700], (i * 24571) % (SIZE - 700), &NoBacking)
            .unwrap();
    }
    d.truncate(64 << 20).unwrap(); // the L1 table moves
                                   // 9 MiB of clusters: past the 8 MiB the first refcount table covers.
    for i in 0..120u64 {
        let len = if i % 3 == 0 { 600 } else { 115 << 10 };
        d.write_at(
            &vec![0x80 | i as u8; len],
            SIZE + (i * 523_927) % ((63 << 20) - len as u64),
            &NoBacking,
        )
        .unwrap();
        if i % 40 == 39 {
            d.flush().unwrap(); // pools are given back and retaken
        }
    }
    d.write_zeroes(0, 8192, &NoBacking).unwrap();
    d.discard(SIZE, 1 << 20).unwrap();
    d.close().unwrap();
    drop(d);
    let log = rec.log.lock().clone();
    let table_moved = {
        let now = rec.inner.snapshot();
        be64(&now, 48) != CS as u64
    };
    assert!(table_moved, "the scenario should move the refcount table");

    // Each check recounts the whole image: about 40 crash points.
    let (checked, windows) = crash_states(&start, &log, 40, 120, |img, what| {
        refcounts_cover_references(img, what, false);
    });
    assert!(
        checked >= 40 && windows >= 10,
        "only {checked} crash states of {windows} windows"
    );
}

/// Replay power losses over `log` (the writes and flushes made since the
/// image was `start`): for about `points` points spread over the run,
/// always the last, everything before a flush and several random subsets
/// of the writes after it (about `budget` states in all, 2 to 12 per
/// point). Calls `check` on each state; returns how many states were
/// checked and how many flush windows the log has.
fn crash_states(
    start: &[u8],
    log: &[Event],
    points: usize,
    budget: usize,
    mut check: impl FnMut(&MemoryStorage, &str),
) -> (usize, usize) {
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut windows: Vec<(usize, usize)> = Vec::new();
    let mut prev = 0;
    for (i, _) in log.iter().enumerate().filter(|(_, e)| e.is_none()) {
        windows.push((prev, i));
        prev = i + 1;
    }
    windows.push((prev, log.len()));
    let mut checked = 0;
    let step = (windows.len() / points).max(1);
    // Several random subsets per crash point (the first: all writes).
    let trials = (budget / windows.len()).clamp(2, 12);
    let last = windows.len() - 1;
    for (wi, &(a, b)) in windows.iter().enumerate() {
        if wi % step != 0 && wi != last {
            continue;
        }
        for trial in 0..trials {
            let img = MemoryStorage::new(start.to_vec(), false);
            for e in log[..a].iter().flatten() {
                img.write_at(&e.1, e.0).unwrap();
            }
            for e in log[a..b].iter().flatten() {
                if trial == 0 || rnd() % 2 == 0 {
                    img.write_at(&e.1, e.0).unwrap();
                }
            }
            check(&img, &format!("window {a}..{b} trial {trial}"));
            checked += 1;
        }
    }
    (checked, windows.len())
}

/// No cluster of `img` has fewer references counted than it is referenced
/// (by the active tables, every snapshot, bitmaps and the refcount
/// structure itself); with `exact`, none has more either (no leak). Returns
/// the refcounts and the references, to check more.
fn refcounts_cover_references(img: &MemoryStorage, what: &str, exact: bool) -> (super::refcount::Refcounts, Vec<u32>) {
    let bytes = img.snapshot();
    let d = match open_bytes(bytes, true) {
        Ok(d) => d,
        Err(e) => panic!("{what}: does not open: {e}"),
    };
    let h = d.hdr.clone();
    let bits = h.cluster_bits;
    let (l1_off, l1_len) = {
        let l1 = d.l1.read();
        (l1.offset, l1.entries.len() as u64)
    };
    let mut refs = super::repair::count_references(img, &h, l1_off, l1_len).unwrap();
    let len = img.len().unwrap();
    let mut rc = super::refcount::Refcounts::load(
        img,
        bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        len,
    )
    .unwrap();
    // The refcount structure references itself too.
    for c in 0..u64::from(h.refcount_table_clusters) {
        refs[((h.refcount_table_offset >> bits) + c) as usize] += 1;
    }
    for &blk in rc.table.clone().iter().filter(|&&o| o != 0) {
        refs[(blk >> bits) as usize] += 1;
    }
    for (c, &r) in refs.iter().enumerate() {
        let have = rc.get(img, c as u64).unwrap();
        assert!(
            have >= u64::from(r) && (!exact || have == u64::from(r)),
            "{what}: cluster {c} has refcount {have} but {r} references"
        );
    }
    (rc, refs)
}

/// Every copied flag of the active L1 and L2 tables is on a cluster that
/// nothing else references (else a write in place would reach a snapshot);
/// with `exact`, it is set exactly where the refcount is 1 (as `qemu-img
/// check` wants).
fn copied_flags_are_safe(
    img: &MemoryStorage,
    counted: (super::refcount::Refcounts, Vec<u32>),
    what: &str,
    exact: bool,
) {
    let (mut rc, refs) = counted;
    let d = open_bytes(img.snapshot(), true).unwrap();
    let g = d.g;
    let entries = d.l1.read().entries.clone();
    let mut check = |e: u64, host: u64, kind: &str| {
        let r = rc.get(img, host >> g.cluster_bits).unwrap();
        let n = refs[(host >> g.cluster_bits) as usize];
        let copied = e & COPIED != 0;
        assert!(
            !copied || n == 1,
            "{what}: {kind} at {host:#x} is marked copied with {n} references"
        );
        assert!(
            !exact || copied == (r == 1),
            "{what}: {kind} at {host:#x}: copied {copied}, refcount {r}"
        );
    };
    for &l1e in &entries {
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        check(l1e, off, "L2 table");
        let mut raw = vec![0u8; g.cluster_size as usize];
        img.read_at(&mut raw, off).unwrap();
        for e in raw.chunks_exact(8 * g.words()).map(|c| be64(c, 0)) {
            if e & COMPRESSED == 0 && e & OFFSET_MASK != 0 {
                check(e, e & OFFSET_MASK, "data cluster");
            }
        }
    }
}

/// Snapshots share clusters with the active image; writes after one copy
/// what they change; apply and delete give every cluster back exactly;
/// each step leaves refcounts and copied flags as `qemu-img check` wants.
#[test]
fn snapshots_share_clusters_and_writes_copy_them() {
    let mem = Arc::new(MemoryStorage::new(base(), false));
    let d = open_writable(mem.clone());
    let consistent = |what: &str| {
        d.flush().unwrap(); // gives the reserved clusters back
        let counted = refcounts_cover_references(&mem, what, true);
        copied_flags_are_safe(&mem, counted, what, true);
    };
    let s1 = d.snapshot_create("one").unwrap();
    assert_eq!((s1.id.as_str(), s1.name.as_str(), s1.vm_state_size), ("1", "one", 0));
    consistent("after create");
    d.write_at(&[7u8; 700], 100, &NoBacking).unwrap(); // copies the shared cluster and its L2 table
    d.write_at(&[5u8; 10], 600_000, &NoBacking).unwrap();
    consistent("after writes");
    assert_eq!(d.snapshot_create("two").unwrap().id, "2");
    assert_eq!(d.snapshot_create("two").unwrap_err().kind(), ErrorKind::InvalidParam);
    d.write_zeroes(0, 4096, &NoBacking).unwrap();
    d.truncate(SIZE * 2).unwrap();
    d.write_at(&[6u8; 512], SIZE + 512, &NoBacking).unwrap();
    consistent("after zeroes and a resize");
    d.snapshot_apply("one").unwrap();
    assert_eq!(d.virtual_size(), SIZE, "the snapshot's size comes back");
    assert_eq!(
        read(&d, 0, 1024).unwrap(),
        vec![0xab; 512].into_iter().chain([0; 512]).collect::<Vec<_>>()
    );
    assert_eq!(read(&d, 600_000, 10).unwrap(), vec![0; 10]);
    consistent("after applying one");
    d.write_at(&[8u8; 3], 0, &NoBacking).unwrap();
    d.snapshot_apply("2").unwrap();
    let r = read(&d, 0, 1000).unwrap();
    assert_eq!(
        (&r[..100], &r[100..800], &r[800..]),
        (&[0xab; 100][..], &[7; 700][..], &[0; 200][..])
    );
    assert_eq!(read(&d, 600_000, 10).unwrap(), vec![5; 10]);
    consistent("after applying two");
    assert_eq!(d.snapshot_apply("three").unwrap_err().kind(), ErrorKind::InvalidParam);
    d.snapshot_delete("one").unwrap();
    consistent("after deleting one");
    d.snapshot_delete("two").unwrap();
    consistent("after deleting two");
    assert!(d.snapshots().unwrap().is_empty());
    assert_eq!(be32(&mem.snapshot(), 60), 0);
    assert_eq!(read(&d, 600_000, 10).unwrap(), vec![5; 10]);
}

/// Power loss at any point of snapshot operations: the image opens,
/// refcounts cover every reference (of the active tables and of every
/// snapshot the header names), and no copied flag claims a shared cluster.
#[test]
fn crash_during_snapshot_operations_is_safe() {
    let start = base();
    let rec = recording(&start);
    let d = open_writable(rec.clone());
    for i in 0..12u64 {
        d.write_at(&[i as u8 + 1; 700], (i * 73_331) % (SIZE - 700), &NoBacking)
            .unwrap();
    }
    d.snapshot_create("a").unwrap();
    for i in 0..12u64 {
        d.write_at(&[0x40 | i as u8; 600], (i * 91_019) % (SIZE - 600), &NoBacking)
            .unwrap();
    }
    d.snapshot_create("b").unwrap();
    d.snapshot_apply("a").unwrap();
    d.write_at(&[0x77; 512], 4096, &NoBacking).unwrap();
    d.snapshot_delete("b").unwrap();
    d.snapshot_delete("a").unwrap();
    d.close().unwrap();
    drop(d);
    let log = rec.log.lock().clone();
    // Every flush window.
    let (checked, windows) = crash_states(&start, &log, usize::MAX, 600, |img, what| {
        let counted = refcounts_cover_references(img, what, false);
        copied_flags_are_safe(img, counted, what, false);
    });
    assert!(
        checked >= 40 && windows >= 10,
        "only {checked} crash states of {windows} windows"
    );
}

/// Many small allocating writes between two flushes pay few flush barriers:
/// each pool refill doubles the reservation (64 KiB clusters: 4 MiB, 8 MiB,
/// ... up to 256 MiB), and a flush starts it small again. Every write reads
/// back and the pool's unused rest is given back (no leak) at the flush.
#[test]
fn allocation_pool_doubles_between_flushes() {
    use crate::options::{CreateOptions, OptValue};
    let dir = std::env::temp_dir().join(format!("qblock-pool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pool.qcow2");
    let loc = Location::file(path.to_str().unwrap());
    let mut opts = CreateOptions::new().with("size", OptValue::Int(2 << 30));
    super::create::create(&loc, &mut opts).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let rec = Arc::new(Recording {
        inner: MemoryStorage::new(bytes, false),
        log: Default::default(),
    });
    let ctx = OpenCtx {
        location: &loc,
        read_only: false,
        direct: false,
        check: false,
        force_share: false,
        refs: crate::reference::RefRules::any(),
        inspect: None,
    };
    let d = Qcow2::open(rec.clone(), &ctx).unwrap();
    let flushes = |r: &Recording| r.log.lock().iter().filter(|e| e.is_none()).count();
    // 2000 clusters at 64 pools of 4 MiB would be 32 barriers; doubling
    // needs 64 + 128 + 256 + 512 + 1024 + 2048 clusters: 6 refills.
    for i in 0..2000u64 {
        d.write_at(&[(i % 251) as u8 + 1; 4096], i * 65536 + 512, &NoBacking)
            .unwrap();
    }
    let during = flushes(&rec);
    assert!(during <= 12, "{during} flushes for 2000 allocating writes");
    d.flush().unwrap();
    // After a flush the pool starts again at 4 MiB: the next 64 clusters
    // take one refill.
    let before = flushes(&rec);
    for i in 0..64u64 {
        d.write_at(&[7; 512], (3000 + i) * 65536, &NoBacking).unwrap();
    }
    assert!(flushes(&rec) - before <= 2);
    d.close().unwrap();
    for i in (0..2000u64).step_by(97) {
        assert_eq!(
            read(&d, i * 65536 + 512, 4096).unwrap(),
            vec![(i % 251) as u8 + 1; 4096]
        );
        assert_eq!(read(&d, i * 65536, 512).unwrap(), vec![0; 512]);
    }
    // No leak: every cluster with a refcount is referenced.
    let img = rec.inner.snapshot();
    let d2 = open_bytes(img.clone(), true).unwrap();
    let h = d2.hdr.clone();
    let (l1_off, l1_len) = {
        let l1 = d2.l1.read();
        (l1.offset, l1.entries.len() as u64)
    };
    let store = MemoryStorage::new(img, true);
    let refs = super::repair::count_references(&store, &h, l1_off, l1_len).unwrap();
    let mut rc = super::refcount::Refcounts::load(
        &store,
        16,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        store.len().unwrap(),
    )
    .unwrap();
    let table: Vec<u64> = rc.table.iter().copied().filter(|&o| o != 0).collect();
    for c in 0..(store.len().unwrap() >> 16) + 4096 {
        let mut want = u64::from(refs.get(c as usize).copied().unwrap_or(0));
        let reft = h.refcount_table_offset >> 16;
        if (reft..reft + u64::from(h.refcount_table_clusters)).contains(&c) || table.contains(&(c << 16)) {
            want += 1;
        }
        assert_eq!(rc.get(&store, c).unwrap(), want, "cluster {c}");
    }
}

/// `base()` with one snapshot "1" (table in cluster 6, its L1 in cluster 7,
/// one L2 table in cluster 8, all counted) whose L2 entry 0 is `entry`.
fn with_hostile_snapshot(entry: u64) -> Vec<u8> {
    let mut b = base();
    b.resize(9 * CS, 0);
    for c in 6..9 {
        b[2 * CS + 2 * c + 1] = 1;
    }
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 6 * CS as u64);
    let s = 6 * CS;
    put64(&mut b, s, 7 * CS as u64);
    put32(&mut b, s + 8, 32);
    b[s + 13] = 1; // id of 1 byte, no name
    put32(&mut b, s + 36, 16);
    put64(&mut b, s + 48, SIZE); // disk size
    b[s + 56] = b'1';
    put64(&mut b, 7 * CS, 8 * CS as u64);
    put64(&mut b, 8 * CS, entry);
    b
}

/// A snapshot whose tree points outside the file or onto metadata (the
/// active L1 table as data, a refcount block as an L2 table: delete would
/// otherwise free them) is refused by apply and delete before anything
/// changes.
#[test]
fn hostile_snapshot_trees_change_nothing() {
    let mut l2_on_refblock = with_hostile_snapshot(0);
    put64(&mut l2_on_refblock, 7 * CS, 2 * CS as u64);
    let cases = [
        0x10_0000 | COPIED,
        (3 * CS as u64) | COPIED,
        COMPRESSED | 0x3f_ffff_ffff,
    ]
    .map(|e| (e, with_hostile_snapshot(e)));
    for (entry, b) in cases.into_iter().chain([(0, l2_on_refblock)]) {
        let mem = Arc::new(MemoryStorage::new(b, false));
        let d = open_writable(mem.clone());
        assert_eq!(d.snapshots().unwrap()[0].id, "1");
        let before = mem.snapshot();
        for r in [d.snapshot_apply("1"), d.snapshot_delete("1")] {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::CorruptImage, "entry {entry:#x}");
            assert!(entry != 0 || e.to_string().contains("lies on other metadata"), "{e}");
            assert_eq!(mem.snapshot(), before, "entry {entry:#x}: the image changed");
        }
        assert_eq!(read(&d, 0, CS).unwrap(), vec![0xab; CS]);
    }
}
