//! Header parsing, each rejection on a hand-built image, allocation order,
//! the in-use flag, and descriptor parsing.

use super::*;
use crate::backend::memory::MemoryStorage;
use crate::driver::NoBacking;
use crate::error::ErrorKind;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

fn image(size: u64, cluster: u64) -> Vec<u8> {
    let s = MemoryStorage::new(Vec::new(), false);
    create_on(&s, size, cluster).unwrap();
    s.into_inner()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn open_bytes(b: Vec<u8>, ro: bool) -> Result<Parallels> {
    Parallels::open(Arc::new(MemoryStorage::new(b, false)), ro)
}

fn kind_of(b: Vec<u8>) -> ErrorKind {
    match open_bytes(b, true) {
        Ok(_) => panic!("opened"),
        Err(e) => e.kind(),
    }
}

/// A v1 image: 64 KiB clusters, BAT in sectors, data at 4 KiB.
fn v1_image() -> Vec<u8> {
    let mut b = vec![0u8; 4096 + 2 * 64 * 1024];
    b[..16].copy_from_slice(MAGIC_V1);
    put32(&mut b, off::VERSION, 2);
    put32(&mut b, off::TRACKS, 128);
    put32(&mut b, off::BAT_ENTRIES, 4);
    // garbage in the high half of the sector count, ignored in v1
    b[off::NB_SECTORS..off::NB_SECTORS + 8].copy_from_slice(&(0xdead_0000_0000_0200u64).to_le_bytes());
    put32(&mut b, off::DATA_OFF, 8);
    put32(&mut b, 64, 8 + 128); // cluster 0 -> second data cluster
    put32(&mut b, 68, 8); // cluster 1 -> first data cluster
    b[4096 + 64 * 1024] = 0xaa;
    b[4096] = 0xbb;
    b
}

#[test]
fn created_header_matches_qemu_layout() {
    let b = image(5 * MIB, MIB);
    assert_eq!(b.len() as u64, MIB);
    assert!(b.starts_with(MAGIC_V2));
    let h = Header::parse(&b, b.len() as u64).unwrap();
    assert_eq!((h.tracks, h.bat_entries, h.size, h.data_start), (2048, 5, 5 * MIB, MIB));
    assert_eq!(le32(&b, off::CYLINDERS), Some(20));
    assert_eq!(le32(&b, off::HEADS), Some(16));
    assert_eq!(probe(&b, &MemoryStorage::new(Vec::new(), true)), 100);
}

#[test]
fn v1_entries_count_sectors() {
    let p = open_bytes(v1_image(), true).unwrap();
    assert_eq!(p.virtual_size(), 512 * 512);
    assert_eq!(
        p.map(0, 256 * KIB).unwrap(),
        Mapping {
            kind: Mapped::Data {
                file: 0,
                offset: 4096 + 64 * KIB
            },
            len: 64 * KIB
        }
    );
    assert_eq!(
        p.map(64 * KIB, 192 * KIB).unwrap(),
        Mapping {
            kind: Mapped::Data { file: 0, offset: 4096 },
            len: 64 * KIB
        }
    );
    assert_eq!(
        p.map(128 * KIB, 128 * KIB).unwrap(),
        Mapping {
            kind: Mapped::Unallocated,
            len: 128 * KIB
        }
    );
}

#[test]
fn disk_past_the_bat_reads_unallocated_and_refuses_writes() {
    let mut b = v1_image();
    put32(&mut b, off::NB_SECTORS, 1024);
    let p = open_bytes(b, false).unwrap();
    assert_eq!(
        p.map(256 * KIB, 256 * KIB).unwrap(),
        Mapping {
            kind: Mapped::Unallocated,
            len: 256 * KIB
        }
    );
    assert_eq!(
        p.write_at(&[1], 256 * KIB, &NoBacking).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn writes_allocate_after_the_last_cluster_and_close_clears_inuse() {
    let s = Arc::new(MemoryStorage::new(image(4 * MIB, 64 * KIB), false));
    let p = Parallels::open(s.clone(), false).unwrap();
    p.write_at(&[1u8; 10], 3 * 64 * KIB + 7, &NoBacking).unwrap();
    let b = s.snapshot();
    assert_eq!(le32(&b, off::INUSE), Some(INUSE_MAGIC));
    // data starts at 64 KiB (header + BAT rounded to a cluster): entry 1 (v2 counts clusters)
    assert_eq!(le32(&b, 64 + 12), Some(1));
    assert_eq!(b.len() as u64, 128 * KIB);
    p.write_at(&[2u8; 64 * 1024], 0, &NoBacking).unwrap();
    assert_eq!(le32(&s.snapshot(), 64), Some(2));
    p.close().unwrap();
    let b = s.snapshot();
    assert_eq!(le32(&b, off::INUSE), Some(0));
    assert_eq!(b.len() as u64, 192 * KIB);
    let p = open_bytes(b, true).unwrap();
    assert_eq!(
        p.map(0, 4 * MIB).unwrap().kind,
        Mapped::Data {
            file: 0,
            offset: 128 * KIB
        }
    );
}

#[test]
fn discard_drops_whole_clusters_only() {
    let s = Arc::new(MemoryStorage::new(image(MIB, 64 * KIB), false));
    let p = Parallels::open(s.clone(), false).unwrap();
    p.write_at(&[3u8; 200 * 1024], 0, &NoBacking).unwrap();
    p.discard(1000, 128 * KIB).unwrap(); // covers only cluster 1 entirely
    assert_eq!(
        p.map(0, MIB).unwrap().kind,
        Mapped::Data {
            file: 0,
            offset: 64 * KIB
        }
    );
    assert_eq!(
        p.map(64 * KIB, MIB - 64 * KIB).unwrap(),
        Mapping {
            kind: Mapped::Unallocated,
            len: 64 * KIB
        }
    );
    assert_eq!(
        p.map(128 * KIB, MIB - 128 * KIB).unwrap().kind,
        Mapped::Data {
            file: 0,
            offset: 192 * KIB
        }
    );
    let b = s.snapshot();
    assert_eq!(le32(&b, 64 + 4), Some(0));
    assert!(b[128 * 1024..192 * 1024].iter().all(|&x| x == 0));
    // A new write takes a fresh cluster at the end, not the freed one.
    p.write_at(&[4u8; 10], 64 * KIB, &NoBacking).unwrap();
    assert_eq!(
        p.map(64 * KIB, 1).unwrap().kind,
        Mapped::Data {
            file: 0,
            offset: 320 * KIB
        }
    );
}

#[test]
fn dirty_image_is_repaired_on_writable_close() {
    let mut b = image(MIB, 64 * KIB);
    put32(&mut b, off::INUSE, INUSE_MAGIC);
    b.resize(b.len() + 100 * 1024, 0x55); // leaked tail
    let s = Arc::new(MemoryStorage::new(b, false));
    let p = Parallels::open(s.clone(), false).unwrap();
    assert!(p.info().unwrap().dirty);
    p.close().unwrap();
    let b = s.snapshot();
    assert_eq!(le32(&b, off::INUSE), Some(0));
    assert_eq!(b.len() as u64, 64 * KIB);
}

#[test]
fn extension_images_read_but_refuse_writes() {
    let mut b = image(MIB, 64 * KIB);
    b.resize(128 * KIB as usize, 0);
    b[..16].copy_from_slice(MAGIC_V2);
    b[off::EXT_OFF..off::EXT_OFF + 8].copy_from_slice(&128u64.to_le_bytes());
    b[64 * KIB as usize..64 * KIB as usize + 8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    let p = open_bytes(b, false).unwrap();
    assert_eq!(
        p.write_at(&[1], 0, &NoBacking).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn hostile_headers_are_refused() {
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch)> = vec![
        ("truncated", Box::new(|b| b.truncate(40))),
        ("version", Box::new(|b| put32(b, off::VERSION, 3))),
        (
            "huge size",
            Box::new(|b| {
                b[..16].copy_from_slice(MAGIC_V2);
                b[off::NB_SECTORS..off::NB_SECTORS + 8].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
        ),
        ("zero tracks", Box::new(|b| put32(b, off::TRACKS, 0))),
        ("huge tracks", Box::new(|b| put32(b, off::TRACKS, u32::MAX))),
        ("huge BAT", Box::new(|b| put32(b, off::BAT_ENTRIES, u32::MAX))),
        ("BAT past eof", Box::new(|b| put32(b, off::BAT_ENTRIES, 1 << 20))),
        (
            "data_off in BAT",
            Box::new(|b| {
                put32(b, off::BAT_ENTRIES, 200);
                put32(b, off::DATA_OFF, 1)
            }),
        ),
        (
            "bad ext magic",
            Box::new(|b| {
                b.resize(b.len() + 64 * 1024, 0);
                b[off::EXT_OFF..off::EXT_OFF + 8].copy_from_slice(&264u64.to_le_bytes())
            }),
        ),
        ("data_off past eof", Box::new(|b| put32(b, off::DATA_OFF, 1 << 30))),
        ("entry in header", Box::new(|b| put32(b, 64, 1))),
        ("entry past eof", Box::new(|b| put32(b, 64, 1000))),
        (
            "duplicate",
            Box::new(|b| {
                put32(b, 64, 136);
                put32(b, 72, 136)
            }),
        ),
        ("overlap", Box::new(|b| put32(b, 72, 8 + 64))),
        (
            "ext past eof",
            Box::new(|b| b[off::EXT_OFF..off::EXT_OFF + 8].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
        (
            "ext in BAT",
            Box::new(|b| b[off::EXT_OFF..off::EXT_OFF + 8].copy_from_slice(&1u64.to_le_bytes())),
        ),
        (
            "ext on data",
            Box::new(|b| b[off::EXT_OFF..off::EXT_OFF + 8].copy_from_slice(&8u64.to_le_bytes())),
        ),
    ];
    for (name, patch) in cases {
        let mut b = v1_image();
        patch(&mut b);
        assert_eq!(kind_of(b), ErrorKind::CorruptImage, "{name}");
    }
}

#[test]
fn descriptor_parsing() {
    let xml = "<?xml version='1.0'?>\n<Parallels_disk_image Version=\"1.0\"><Disk_Parameters><Disk_size>4096</Disk_size>\
        </Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End><Blocksize>2048</Blocksize>\
        <Image><Type>Compressed</Type><File>a.hds</File></Image></Storage><Storage><Start>2048</Start>\
        <End>4096</End><Image><Type>Plain</Type><File>b.hds</File></Image></Storage></StorageData></Parallels_disk_image>";
    assert!(bundle::is_descriptor(xml.as_bytes()));
    let (size, ex) = bundle::parse(xml).unwrap();
    assert_eq!(size, 2 * MIB);
    assert_eq!(ex.len(), 2);
    assert!(ex[0].expanding && !ex[1].expanding);
    assert_eq!((ex[1].start, ex[1].end, ex[1].file.as_str()), (MIB, 2 * MIB, "b.hds"));
    let gap = xml.replace("<Start>2048</Start>", "<Start>2047</Start>");
    assert_eq!(bundle::parse(&gap).unwrap_err().kind(), ErrorKind::CorruptImage);
    let escape = xml.replace("b.hds", "../b.hds");
    assert_eq!(bundle::parse(&escape).unwrap_err().kind(), ErrorKind::CorruptImage);
    let short = xml.replace("<Disk_size>4096", "<Disk_size>4097");
    assert_eq!(bundle::parse(&short).unwrap_err().kind(), ErrorKind::CorruptImage);
    let snap = xml.replace(
        "</Image></Storage></StorageData>",
        "</Image><Image><Type>Plain</Type><File>c</File></Image></Storage></StorageData>",
    );
    assert_eq!(bundle::parse(&snap).unwrap_err().kind(), ErrorKind::Unsupported);
}

/// Random byte and word mutations of valid images (v1 and v2, with data):
/// opening, mapping the whole disk and writing must never panic.
#[test]
fn mutated_images_never_panic() {
    let mut v2 = image(2 * MIB, 64 * KIB);
    {
        let s = Arc::new(MemoryStorage::new(std::mem::take(&mut v2), false));
        let p = Parallels::open(s.clone(), false).unwrap();
        p.write_at(&[7u8; 5000], 100_000, &NoBacking).unwrap();
        p.close().unwrap();
        drop(p);
        v2 = s.snapshot();
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in [v1_image(), v2] {
        for _ in 0..1500 {
            let mut b = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % 128) as usize; // the header and the first BAT entries
                if next() % 2 == 0 {
                    b[at] = next() as u8;
                } else if at + 4 <= b.len() {
                    let v = [0u32, 1, u32::MAX, 0x7fff_ffff, 128, 8][(next() % 6) as usize];
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            let Ok(p) = open_bytes(b, false) else { continue };
            let size = p.virtual_size();
            let mut pos = 0;
            let mut steps = 0;
            while pos < size && steps < 10_000 {
                let m = p.map(pos, size - pos).unwrap();
                assert!(m.len >= 1);
                pos += m.len;
                steps += 1;
            }
            if size > 0 {
                let _ = p.write_at(&[1u8; 700], size / 2, &NoBacking);
            }
            let _ = p.close();
        }
    }
}
