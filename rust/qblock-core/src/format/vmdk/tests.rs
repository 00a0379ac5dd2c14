//! Driver-level tests: images built byte by byte in memory (each rejection
//! at open or at read), and round trips through files we create.

use super::header::*;
use super::*;
use crate::backend::memory::MemoryStorage;
use crate::driver::NoBacking;
use crate::error::ErrorKind;
use crate::image::{Image, OpenOptions};
use crate::options::{CreateOptions, OptValue};

const MIB: u64 = 1 << 20;

/// A 1 MiB monolithicSparse image as QEMU lays it out, with `desc` embedded.
fn sparse_image(desc: &str) -> Vec<u8> {
    let s = MemoryStorage::new(Vec::new(), false);
    create::init_sparse(&s, MIB, false, false).unwrap();
    s.write_at(desc.as_bytes(), 512).unwrap();
    s.into_inner()
}

fn open_mem(data: Vec<u8>, read_only: bool) -> Result<Box<dyn Driver>> {
    let loc = Location::file("/nonexistent-dir/x.vmdk");
    open(
        Arc::new(MemoryStorage::new(data, read_only)),
        &OpenCtx {
            location: &loc,
            read_only,
            direct: false,
            check: false,
            force_share: false,
            refs: crate::reference::RefRules::any(),
            inspect: None,
        },
    )
}

fn kind_of(data: Vec<u8>) -> ErrorKind {
    match open_mem(data, true) {
        Ok(d) => {
            // Lazy checks: read everything.
            let mut buf = vec![0u8; 65536];
            let mut pos = 0;
            while pos < d.virtual_size() {
                let m = match d.map(pos, d.virtual_size() - pos) {
                    Ok(m) => m,
                    Err(e) => return e.kind(),
                };
                if m.kind == Mapped::Encoded {
                    let n = m.len.min(buf.len() as u64) as usize;
                    if let Err(e) = d.read_encoded(&mut buf[..n], pos) {
                        return e.kind();
                    }
                    pos += n as u64;
                } else {
                    pos += m.len;
                }
            }
            panic!("image opened and read without error")
        }
        Err(e) => e.kind(),
    }
}

fn put32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn probe_matches_qemus_rules() {
    let s = MemoryStorage::new(Vec::new(), true);
    assert_eq!(probe(b"KDMV\x01\0\0\0", &s), 100);
    assert_eq!(probe(b"COWD", &s), 100);
    assert_eq!(probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n", &s), 100);
    assert_eq!(probe(b"# c\r\n  \r\n\nversion=3\r\n", &s), 100);
    assert_eq!(probe(b"version=4\n", &s), 0);
    assert_eq!(probe(b"# Disk DescriptorFile\ngarbage\n", &s), 0);
    assert_eq!(probe(b"  x\nversion=1\n", &s), 0);
    assert_eq!(probe(b"\xbe\xba\xfe\xca", &s), 0); // a bare SEsparse extent stays raw
    assert_eq!(probe(b"", &s), 0);
}

#[test]
fn embedded_extent_lines_are_ignored() {
    // FreeBSD's mkimg writes `RW 2048 SPARSE ""`.
    let d = open_mem(
        sparse_image("createType=\"monolithicSparse\"\nRW 2048 SPARSE \"\"\n"),
        true,
    )
    .unwrap();
    assert_eq!(d.virtual_size(), MIB);
}

#[test]
fn fresh_image_reads_zeroes_and_writes_back() {
    let d = open_mem(
        sparse_image("createType=\"monolithicSparse\"\nCID=abc\nparentCID=ffffffff\n"),
        false,
    )
    .unwrap();
    assert_eq!(d.virtual_size(), MIB);
    assert_eq!(
        d.map(0, MIB).unwrap(),
        Mapping {
            kind: Mapped::Unallocated,
            len: MIB
        }
    );
    d.write_at(b"hello", 70000, &NoBacking).unwrap();
    let m = d.map(65536, MIB - 65536).unwrap();
    let Mapped::Data { file: 0, offset } = m.kind else {
        panic!("{m:?}")
    };
    assert_eq!(m.len, 65536);
    let mut b = [0u8; 5];
    d.host_file(0).unwrap().read_at(&mut b, offset + 70000 - 65536).unwrap();
    assert_eq!(&b, b"hello");
    d.flush().unwrap();
    let info = d.info().unwrap();
    assert_eq!(info.cluster_size, Some(65536));
    // The first write gave the image a new CID of the same width.
    let cid = info.format_specific.iter().find(|(k, _)| k == "cid").unwrap().1.clone();
    let InfoValue::UInt(cid) = cid else { panic!() };
    assert!(cid <= 0xfff);
    let mut text = [0u8; 40];
    d.host_file(0).unwrap().read_at(&mut text, 512).unwrap();
    assert_eq!(
        &text[..38],
        format!("createType=\"monolithicSparse\"\nCID={cid:03x}\n").as_bytes()
    );
}

#[test]
fn zero_writes_use_zeroed_grains_when_enabled() {
    for zeroed in [false, true] {
        let s = MemoryStorage::new(Vec::new(), false);
        create::init_sparse(&s, MIB, zeroed, false).unwrap();
        s.write_at(b"createType=\"monolithicSparse\"\nCID=1\n", 512).unwrap();
        let d = open_mem(s.into_inner(), false).unwrap();
        d.write_at(&[9u8; 200000], 0, &NoBacking).unwrap();
        let before = d.host_file(0).unwrap().len().unwrap();
        d.write_zeroes(65536, 65536, &NoBacking).unwrap();
        d.write_zeroes(300000, 100000, &NoBacking).unwrap(); // unallocated: nothing to do
        assert_eq!(d.host_file(0).unwrap().len().unwrap(), before);
        let m = d.map(65536, 65536).unwrap();
        if zeroed {
            assert_eq!(m.kind, Mapped::Zero { host: None });
        } else {
            let Mapped::Data { offset, .. } = m.kind else {
                panic!("{m:?}")
            };
            let mut b = vec![1u8; 65536];
            d.host_file(0).unwrap().read_at(&mut b, offset).unwrap();
            assert!(b.iter().all(|&x| x == 0));
        }
        // A zeroed grain written again is allocated afresh.
        d.write_at(&[3u8; 10], 65536 + 5, &NoBacking).unwrap();
        let Mapped::Data { offset, .. } = d.map(65536, 1).unwrap().kind else {
            panic!()
        };
        let mut b = vec![1u8; 20];
        d.host_file(0).unwrap().read_at(&mut b, offset).unwrap();
        assert_eq!(&b[..15], &[0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
    }
}

#[test]
fn tables_are_written_on_flush_to_both_copies() {
    let s = Arc::new(MemoryStorage::new(
        sparse_image("createType=\"monolithicSparse\"\n"),
        false,
    ));
    let loc = Location::file("/x.vmdk");
    let d = open(
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
    .unwrap();
    d.write_at(&[7u8; 512], 0, &NoBacking).unwrap();
    let h = SparseHeader::parse(&s.snapshot()[..512]).unwrap();
    let gte_at = |dir: u64| {
        let img = s.snapshot();
        let gt = u32::from_le_bytes(img[(dir * 512) as usize..][..4].try_into().unwrap()) as usize;
        u32::from_le_bytes(img[gt * 512..][..4].try_into().unwrap())
    };
    assert_eq!(gte_at(h.gd_offset), 0, "the table entry waits for flush");
    d.flush().unwrap();
    let g = gte_at(h.gd_offset);
    assert!(u64::from(g) >= h.grain_offset);
    assert_eq!(gte_at(h.rgd_offset), g);
    // Reopened: the data is there.
    let d2 = open_mem(s.snapshot(), true).unwrap();
    assert!(matches!(d2.map(0, 512).unwrap().kind, Mapped::Data { .. }));
}

#[test]
fn hostile_headers_are_refused() {
    let base = sparse_image("createType=\"monolithicSparse\"\n");
    let c = ErrorKind::CorruptImage;
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, ErrorKind)> = vec![
        ("version 4", Box::new(|d| put32(d, 4, 4)), ErrorKind::Unsupported),
        ("huge capacity", Box::new(|d| put64(d, 12, 2233785398448881665)), c),
        ("granularity 0", Box::new(|d| put64(d, 20, 0)), c),
        ("granularity 1 GiB+", Box::new(|d| put64(d, 20, 0x200001)), c),
        ("gtes 0", Box::new(|d| put32(d, 44, 0)), c),
        ("gtes 4096", Box::new(|d| put32(d, 44, 4096)), c),
        ("rgd outside", Box::new(|d| put64(d, 48, 1 << 40)), c),
        ("gd outside", Box::new(|d| put64(d, 56, 1 << 40)), c),
        ("gd at 0", Box::new(|d| put64(d, 56, 0)), c),
        ("grain_offset beyond end", Box::new(|d| put64(d, 64, 1 << 30)), c),
        ("compression 9", Box::new(|d| d[77] = 9), ErrorKind::Unsupported),
        (
            "gt outside",
            Box::new(|d| {
                let gd = u64::from_le_bytes(d[56..64].try_into().unwrap()) as usize * 512;
                put32(d, gd, 0x7fff_ffff);
            }),
            c,
        ),
        (
            "grain beyond end",
            Box::new(|d| {
                let gd = u64::from_le_bytes(d[56..64].try_into().unwrap()) as usize * 512;
                let gt = u32::from_le_bytes(d[gd..gd + 4].try_into().unwrap()) as usize * 512;
                put32(d, gt + 8, 0x00ff_ffff);
            }),
            c,
        ),
        ("truncated", Box::new(|d| d.truncate(300)), c),
        ("gd at end without footer", Box::new(|d| put64(d, 56, u64::MAX)), c),
    ];
    for (name, f, want) in cases {
        let mut d = base.clone();
        f(&mut d);
        assert_eq!(kind_of(d), want, "{name}");
    }
}

/// A stream-optimized extent with one compressed grain and the directory
/// found through the footer.
fn stream_image(grain_payload: &[u8], marker_size: Option<u32>) -> Vec<u8> {
    let h = SparseHeader {
        version: 3,
        flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
        capacity: 256, // two grains
        granularity: 128,
        desc_offset: 0,
        desc_size: 0,
        gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        grain_offset: 1,
        compress: COMPRESSION_DEFLATE,
    };
    let mut img = h.serialize().to_vec();
    // grain 0 at sector 1: marker (lba, size) + zlib data
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, grain_payload).unwrap();
    let comp = z.finish().unwrap();
    img.extend_from_slice(&0u64.to_le_bytes());
    img.extend_from_slice(&marker_size.unwrap_or(comp.len() as u32).to_le_bytes());
    img.extend_from_slice(&comp);
    img.resize(img.len().next_multiple_of(512), 0);
    let gt_sector = img.len() / 512;
    let mut gt = vec![0u8; 2048];
    put32(&mut gt, 0, 1);
    img.extend_from_slice(&gt);
    let gd_sector = img.len() / 512;
    let mut gd = vec![0u8; 512];
    put32(&mut gd, 0, gt_sector as u32);
    img.extend_from_slice(&gd);
    // footer marker, footer, end-of-stream marker
    let mut fm = vec![0u8; 512];
    put32(&mut fm, 12, MARKER_FOOTER);
    img.extend_from_slice(&fm);
    let mut f = h.clone();
    f.gd_offset = gd_sector as u64;
    img.extend_from_slice(&f.serialize());
    img.extend_from_slice(&[0u8; 512]);
    img
}

#[test]
fn stream_optimized_reads_and_refuses_writes() {
    let payload: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let d = open_mem(stream_image(&payload, None), true).unwrap();
    assert_eq!(d.virtual_size(), 131072);
    assert_eq!(
        d.map(0, 131072).unwrap(),
        Mapping {
            kind: Mapped::Encoded,
            len: 65536
        }
    );
    assert_eq!(d.map(65536, 65536).unwrap().kind, Mapped::Unallocated);
    let mut b = vec![0u8; 1000];
    d.read_encoded(&mut b, 4000).unwrap();
    assert_eq!(b, payload[4000..5000]);
    let info = d.info().unwrap();
    assert!(info
        .format_specific
        .contains(&("create-type".into(), "streamOptimized".into())));
    let w = open_mem(stream_image(&payload, None), false).unwrap();
    assert_eq!(
        w.write_at(&[1], 70000, &NoBacking).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn hostile_compressed_grains() {
    let payload = vec![5u8; 65536];
    assert_eq!(kind_of(stream_image(&payload, Some(0))), ErrorKind::CorruptImage);
    assert_eq!(kind_of(stream_image(&payload, Some(u32::MAX))), ErrorKind::CorruptImage);
    assert_eq!(kind_of(stream_image(&payload, Some(3))), ErrorKind::CorruptImage);
    // Decompresses to more than one grain.
    assert_eq!(kind_of(stream_image(&vec![5u8; 200000], None)), ErrorKind::CorruptImage);
    // Decompresses short.
    assert_eq!(kind_of(stream_image(&[5u8; 100], None)), ErrorKind::CorruptImage);
    let mut bad_footer = stream_image(&payload, None);
    let n = bad_footer.len();
    bad_footer[n - 1024] = b'X';
    assert_eq!(kind_of(bad_footer), ErrorKind::CorruptImage);
}

#[test]
fn descriptor_files_need_a_known_type_and_extents() {
    let d = |t: &str| kind_of(t.as_bytes().to_vec());
    assert_eq!(d("version=1\n"), ErrorKind::CorruptImage);
    assert_eq!(
        d("version=1\ncreateType=\"custom\"\nRW 8 ZERO\n"),
        ErrorKind::Unsupported
    );
    assert_eq!(d("version=1\ncreateType=\"monolithicFlat\"\n"), ErrorKind::CorruptImage);
    assert_eq!(
        d("version=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"x\"\n"),
        ErrorKind::CorruptImage
    );
    // Zero extents need no file.
    let z = open_mem(
        b"version=1\ncreateType=\"monolithicFlat\"\nRW 8 ZERO\nRW 16 ZERO\n".to_vec(),
        true,
    )
    .unwrap();
    assert_eq!(z.virtual_size(), 24 * 512);
    assert_eq!(
        z.map(0, 24 * 512).unwrap(),
        Mapping {
            kind: Mapped::Zero { host: None },
            len: 8 * 512
        }
    );
    assert_eq!(z.map(8 * 512, 16 * 512).unwrap().len, 16 * 512);
}

fn create_opts(sub: &str, size: u64) -> CreateOptions {
    CreateOptions::new()
        .with("size", OptValue::Int(size))
        .with("subformat", OptValue::Str(sub.into()))
}

#[test]
fn create_every_subformat_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let loc = Location::file(dir.path().join(format!("{sub}.vmdk")));
        Image::create(&loc, Format::Vmdk, create_opts(sub, 3 * MIB)).unwrap();
        let img = Image::open(&loc, None, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Vmdk, "{sub}");
        assert_eq!(img.virtual_size(), 3 * MIB);
        img.write_at(b"abcdef", MIB + 3).unwrap();
        img.close().unwrap();
        let img = Image::open(
            &loc,
            None,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = [0u8; 8];
        img.read_at(&mut b, MIB + 2).unwrap();
        assert_eq!(&b, b"\0abcdef\0", "{sub}");
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for n in [
        "monolithicFlat-flat.vmdk",
        "twoGbMaxExtentSparse-s001.vmdk",
        "twoGbMaxExtentFlat-f001.vmdk",
    ] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
}

#[test]
fn an_empty_monolithic_sparse_image_opens() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::file(dir.path().join("z.vmdk"));
    Image::create(&loc, Format::Vmdk, create_opts("monolithicSparse", 0)).unwrap();
    let img = Image::open(&loc, None, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), 0);
    assert!(img.map().unwrap().is_empty());
}

#[test]
fn create_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::file(dir.path().join("x.vmdk"));
    let e = Image::create(&loc, Format::Vmdk, create_opts("bogus", MIB)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam);
    let o = create_opts("monolithicSparse", MIB)
        .with("compat6", OptValue::Bool(true))
        .with("hwversion", OptValue::Str("7".into()));
    assert_eq!(
        Image::create(&loc, Format::Vmdk, o).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
    let o = create_opts("monolithicFlat", MIB).with("zeroed_grain", OptValue::Bool(true));
    assert_eq!(
        Image::create(&loc, Format::Vmdk, o).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
    for (k, v) in [
        ("hwversion", "4\"\nRW 8 FLAT \"/etc/passwd\" 0"),
        ("toolsversion", "1\n"),
        ("backing_file", "a\"b"),
    ] {
        let o = create_opts("monolithicSparse", MIB).with(k, OptValue::Str(v.into()));
        assert_eq!(
            Image::create(&loc, Format::Vmdk, o).unwrap_err().kind(),
            ErrorKind::InvalidParam,
            "{k}"
        );
    }
    // A descriptor longer than its embedded slot: refused before any file exists.
    let long = "7".repeat(11_000);
    let o = create_opts("monolithicSparse", MIB).with("toolsversion", OptValue::Str(long));
    assert_eq!(
        Image::create(&loc, Format::Vmdk, o).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
    assert!(!dir.path().join("x.vmdk").exists());
    let o = create_opts("monolithicSparse", MIB).with("cluster_size", OptValue::Int(4096));
    assert_eq!(
        Image::create(&loc, Format::Vmdk, o).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
}

#[test]
fn backing_chain_reads_and_copies_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = Location::file(dir.path().join("base.vmdk"));
    Image::create(&base, Format::Vmdk, create_opts("monolithicSparse", MIB)).unwrap();
    let b = Image::open(&base, None, &OpenOptions::default()).unwrap();
    b.write_at(&[0xaau8; 65536], 0).unwrap();
    b.close().unwrap();
    let top = Location::file(dir.path().join("top.vmdk"));
    let o = create_opts("monolithicSparse", 0).with("backing_file", OptValue::Str("base.vmdk".into()));
    Image::create(&top, Format::Vmdk, o).unwrap();
    let t = Image::open(&top, None, &OpenOptions::default()).unwrap();
    assert_eq!(t.virtual_size(), MIB);
    let info = t.info().unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("base.vmdk"));
    assert_eq!(info.backing_format.as_deref(), Some("vmdk"));
    t.write_at(&[1u8; 10], 100).unwrap();
    let mut buf = vec![0u8; 300];
    t.read_at(&mut buf, 0).unwrap();
    assert!(buf[..100].iter().all(|&x| x == 0xaa) && buf[100..110].iter().all(|&x| x == 1));
    assert!(buf[110..].iter().all(|&x| x == 0xaa));
    let st = t.block_status(0, MIB).unwrap();
    assert!(st.allocated && st.data && st.depth == 0 && st.len == 65536);
}

#[test]
fn writes_where_no_grain_table_exists_add_one() {
    let mut img = sparse_image("createType=\"monolithicSparse\"\nCID=1\n");
    let h = SparseHeader::parse(&img[..512]).unwrap();
    for dir in [h.gd_offset, h.rgd_offset] {
        put32(&mut img, (dir * 512) as usize, 0);
    }
    let s = Arc::new(MemoryStorage::new(img, false));
    let loc = Location::file("/x.vmdk");
    let d = open(
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
    .unwrap();
    assert_eq!(
        d.map(0, MIB).unwrap(),
        Mapping {
            kind: Mapped::Unallocated,
            len: MIB
        }
    );
    d.write_at(&[4u8; 100], 65536 * 3 + 7, &NoBacking).unwrap();
    drop(d); // tables written back on drop
    let d = open_mem(s.snapshot(), true).unwrap();
    let raw = s.snapshot();
    let gd = u32::from_le_bytes(raw[(h.gd_offset * 512) as usize..][..4].try_into().unwrap());
    let rgd = u32::from_le_bytes(raw[(h.rgd_offset * 512) as usize..][..4].try_into().unwrap());
    assert!(gd != 0 && rgd != 0 && gd != rgd);
    assert_eq!(raw[gd as usize * 512..][..2048], raw[rgd as usize * 512..][..2048]);
    let Mapped::Data { offset, .. } = d.map(65536 * 3, 65536).unwrap().kind else {
        panic!()
    };
    assert_eq!(
        &raw[offset as usize + 6..offset as usize + 108],
        &[&[0u8][..], &[4u8; 100][..], &[0u8][..]].concat()[..]
    );
}

#[test]
fn a_changed_parent_is_refused_for_reads_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let base = Location::file(dir.path().join("base.vmdk"));
    Image::create(&base, Format::Vmdk, create_opts("monolithicSparse", MIB)).unwrap();
    let top = Location::file(dir.path().join("top.vmdk"));
    let o = create_opts("monolithicSparse", 0).with("backing_file", OptValue::Str("base.vmdk".into()));
    Image::create(&top, Format::Vmdk, o).unwrap();
    let t = Image::open(&top, None, &OpenOptions::default()).unwrap();
    t.write_at(&[1u8; 10], 0).unwrap();
    t.close().unwrap();
    // Writing the parent gives it a new CID: the overlay no longer matches.
    let b = Image::open(&base, None, &OpenOptions::default()).unwrap();
    b.write_at(&[2u8; 10], 500_000).unwrap();
    b.close().unwrap();
    let t = Image::open(&top, None, &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 10];
    t.read_at(&mut buf, 0).unwrap(); // allocated here: fine
    assert_eq!(buf, [1u8; 10]);
    assert_eq!(
        t.read_at(&mut buf, 500_000).unwrap_err().kind(),
        ErrorKind::CorruptImage
    );
    assert_eq!(
        t.write_at(&[3u8; 10], 300_000).unwrap_err().kind(),
        ErrorKind::CorruptImage
    );
    assert!(!t.block_status(500_000, 10).unwrap().allocated);
}

/// Deterministic xorshift, for mutation tests without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Open, map and read a (mutated) image in memory; any error is fine, a
/// panic is not. Reads are bounded so a huge claimed size stays cheap.
fn exercise(data: Vec<u8>, writable: bool) {
    let Ok(d) = open_mem(data, !writable) else { return };
    let _ = d.info();
    let size = d.virtual_size();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 65536];
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(m) = d.map(pos, size - pos) else { return };
        assert!(m.len >= 1 && m.len <= size - pos, "{m:?}");
        if m.kind == Mapped::Encoded {
            let n = m.len.min(buf.len() as u64) as usize;
            let _ = d.read_encoded(&mut buf[..n], pos);
        }
        pos += m.len;
    }
    if writable && size > 0 {
        let _ = d.write_at(&[1u8; 3000], size / 2, &NoBacking);
        let _ = d.write_zeroes(0, size.min(200_000), &NoBacking);
        let _ = d.flush();
    }
}

#[test]
fn mutated_images_never_panic() {
    let mut base = sparse_image("createType=\"monolithicSparse\"\nCID=1\nparentCID=ffffffff\n");
    {
        let d = open_mem(base.clone(), false).unwrap();
        d.write_at(&[9u8; 200_000], 12345, &NoBacking).unwrap();
        d.flush().unwrap();
        base = d.host_file(0).unwrap().read_at_vec();
    }
    let stream = stream_image(&[7u8; 65536], None);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..10_000 {
        let mut d = if i % 3 == 0 { stream.clone() } else { base.clone() };
        let n = 1 + rng.next() % 8;
        for _ in 0..n {
            // Mostly the header and the tables, sometimes anywhere.
            let hot = [0usize, 512, 21 * 512, 26 * 512, d.len().saturating_sub(1536)];
            let at = if rng.next().is_multiple_of(4) {
                rng.next() as usize % d.len()
            } else {
                (hot[rng.next() as usize % hot.len()] + rng.next() as usize % 600).min(d.len() - 1)
            };
            d[at] = rng.next() as u8;
        }
        exercise(d, i % 5 == 0);
    }
}

trait ReadAll {
    fn read_at_vec(&self) -> Vec<u8>;
}
impl ReadAll for dyn Storage + '_ {
    fn read_at_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len().unwrap() as usize];
        self.read_at(&mut v, 0).unwrap();
        v
    }
}

#[test]
fn stream_optimized_whole_grains_are_compressed_once() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::file(dir.path().join("s.vmdk"));
    let size = MIB + 3 * 512; // a short last grain
    Image::create(&loc, Format::Vmdk, create_opts("streamOptimized", size)).unwrap();
    let rw = OpenOptions::default();
    let img = Image::open(&loc, None, &rw).unwrap();
    assert!(img.compressed_only());
    assert_eq!(img.compressed_unit(), Some(65536));
    let text: Vec<u8> = (0..65536u32).map(|i| (i / 97) as u8).collect();
    let noise: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    img.write_at(&text, 3 * 65536).unwrap();
    let blob = img.compress_unit(&noise).unwrap().unwrap();
    img.write_compressed(&[(65536, &blob)]).unwrap();
    img.write_at(&[7u8; 1536], MIB).unwrap(); // the short last grain, whole
                                              // Parts of grains, and grains written before, are refused.
    assert_eq!(img.write_at(&[1u8; 512], 0).unwrap_err().kind(), ErrorKind::Unsupported);
    assert_eq!(
        img.write_at(&text, 3 * 65536).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        img.write_compressed(&[(65536, &blob)]).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    // Zeroes where the disk reads zeroes already cost nothing.
    img.write_zeroes(5 * 65536, 65536).unwrap();
    assert_eq!(
        img.write_zeroes(3 * 65536, 512).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    img.close().unwrap();
    let img = Image::open(
        &loc,
        None,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 3 * 65536).unwrap();
    assert_eq!(buf, text);
    img.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, noise);
    let mut tail = vec![0u8; 1536];
    img.read_at(&mut tail, MIB).unwrap();
    assert!(tail.iter().all(|&b| b == 7));
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Read-only, it stores nothing compressed.
    assert!(!img.compressed_only());
}
