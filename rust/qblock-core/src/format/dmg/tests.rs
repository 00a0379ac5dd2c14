//! Unit tests: UDIF images built byte by byte (data fork, mish blocks in an
//! XML property list or a resource fork, koly trailer), and one rejection
//! per check of the trailer and the block map.

use super::blkx::*;
use super::*;
use crate::backend::memory::MemoryStorage;
use crate::error::ErrorKind;
use crate::location::Location;
use std::io::Write;

/// One chunk to build: type, sector count, stored bytes.
pub struct Spec {
    pub ty: u32,
    pub sectors: u64,
    pub stored: Vec<u8>,
}

pub fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
        if s.len() % 77 == 76 {
            s.push('\n');
        }
    }
    s
}

/// A mish block for `specs` whose stored bytes start at `data_at` in the data fork.
pub fn mish(first: u64, specs: &[Spec], data_at: u64) -> Vec<u8> {
    let mut m = vec![0u8; MISH_HEADER];
    m[0..4].copy_from_slice(MISH_MAGIC);
    m[4..8].copy_from_slice(&1u32.to_be_bytes());
    m[8..16].copy_from_slice(&first.to_be_bytes());
    let total: u64 = specs.iter().map(|s| s.sectors).sum();
    m[16..24].copy_from_slice(&total.to_be_bytes());
    m[200..204].copy_from_slice(&(specs.len() as u32 + 1).to_be_bytes());
    let (mut sector, mut off) = (0u64, data_at);
    for s in specs.iter().chain(std::iter::once(&Spec {
        ty: UDLE,
        sectors: 0,
        stored: vec![],
    })) {
        let mut e = [0u8; CHUNK_ENTRY];
        e[0..4].copy_from_slice(&s.ty.to_be_bytes());
        e[8..16].copy_from_slice(&sector.to_be_bytes());
        e[16..24].copy_from_slice(&s.sectors.to_be_bytes());
        e[24..32].copy_from_slice(&off.to_be_bytes());
        e[32..40].copy_from_slice(&(s.stored.len() as u64).to_be_bytes());
        m.extend_from_slice(&e);
        sector += s.sectors;
        off += s.stored.len() as u64;
    }
    m
}

pub fn trailer(data_len: u64, rsrc: (u64, u64), xml: (u64, u64), sectors: u64) -> Vec<u8> {
    let mut t = vec![0u8; 512];
    t[0..4].copy_from_slice(KOLY_MAGIC);
    t[4..8].copy_from_slice(&4u32.to_be_bytes());
    t[8..12].copy_from_slice(&512u32.to_be_bytes());
    t[0x20..0x28].copy_from_slice(&data_len.to_be_bytes());
    t[0x28..0x30].copy_from_slice(&rsrc.0.to_be_bytes());
    t[0x30..0x38].copy_from_slice(&rsrc.1.to_be_bytes());
    t[0xd8..0xe0].copy_from_slice(&xml.0.to_be_bytes());
    t[0xe0..0xe8].copy_from_slice(&xml.1.to_be_bytes());
    t[0x1ec..0x1f4].copy_from_slice(&sectors.to_be_bytes());
    t
}

/// A UDIF image with one partition per element of `parts`, block map in XML.
pub fn build_xml(parts: &[Vec<Spec>]) -> Vec<u8> {
    let mut img = Vec::new();
    let mut minis = Vec::new();
    let mut first = 0;
    for p in parts {
        minis.push(mish(first, p, img.len() as u64));
        for s in p {
            img.extend_from_slice(&s.stored);
        }
        first += p.iter().map(|s| s.sectors).sum::<u64>();
    }
    let data_len = img.len() as u64;
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n",
    );
    for (k, m) in minis.iter().enumerate() {
        xml += &format!("\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n{}\n\t\t\t\t</data>\n\t\t\t\t<key>Name</key>\n\t\t\t\t<string>part {k}</string>\n\t\t\t</dict>\n", b64(m));
    }
    xml += "\t\t</array>\n\t\t<key>plst</key>\n\t\t<array><dict><key>Data</key><data>AAAA</data></dict></array>\n\t</dict>\n</dict>\n</plist>\n";
    let xml_at = img.len() as u64;
    img.extend_from_slice(xml.as_bytes());
    img.extend(trailer(data_len, (0, 0), (xml_at, xml.len() as u64), first));
    img
}

/// The same with the block map in a resource fork.
pub fn build_rsrc(parts: &[Vec<Spec>]) -> Vec<u8> {
    let mut img = Vec::new();
    let mut data = Vec::new();
    let mut first = 0;
    for p in parts {
        let m = mish(first, p, img.len() as u64);
        data.extend_from_slice(&(m.len() as u32).to_be_bytes());
        data.extend_from_slice(&m);
        for s in p {
            img.extend_from_slice(&s.stored);
        }
        first += p.iter().map(|s| s.sectors).sum::<u64>();
    }
    // A non-mish resource shares the data area.
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(b"plst");
    let data_len = img.len() as u64;
    let mut fork = vec![0u8; 256];
    fork[0..4].copy_from_slice(&256u32.to_be_bytes());
    fork[8..12].copy_from_slice(&(data.len() as u32).to_be_bytes());
    fork.extend_from_slice(&data);
    let at = img.len() as u64;
    img.extend_from_slice(&fork);
    img.extend(trailer(data_len, (at, fork.len() as u64), (0, 0), first));
    img
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn open_bytes(b: Vec<u8>) -> Result<Dmg> {
    Dmg::open(Arc::new(MemoryStorage::new(b, true)))
}

fn read_all(d: &Dmg) -> Result<Vec<u8>> {
    let mut out = vec![0u8; d.virtual_size() as usize];
    let mut pos = 0u64;
    while pos < d.virtual_size() {
        let m = d.map(pos, d.virtual_size() - pos)?;
        let chunk = &mut out[pos as usize..(pos + m.len) as usize];
        match m.kind {
            Mapped::Data { offset, .. } => d.storage.read_at(chunk, offset)?,
            Mapped::Zero { .. } => chunk.fill(0),
            Mapped::Encoded => d.read_encoded(chunk, pos)?,
            k => panic!("unexpected mapping {k:?}"),
        }
        pos += m.len;
    }
    Ok(out)
}

/// A disk of zero, raw, zlib, ignore, bzip2, lzfse and ADC chunks, and its model.
fn sample() -> (Vec<Vec<Spec>>, Vec<u8>) {
    let raw = pattern(4 * 512, 1);
    let z = pattern(8 * 512, 2);
    let bz = pattern(3 * 512, 3);
    let lz = pattern(5 * 512, 4);
    let mut bzc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bzc.write_all(&bz).unwrap();
    let mut lzc = Vec::new();
    lzfse_rust::LzfseEncoder::default().encode_bytes(&lz, &mut lzc).unwrap();
    // ADC: 512 literal bytes in four runs, then one 512-byte run of 0xAB.
    let adc_plain: Vec<u8> = pattern(512, 5)
        .into_iter()
        .chain(std::iter::repeat_n(0xab, 512))
        .collect();
    let mut adc = Vec::new();
    for c in adc_plain[..512].chunks(128) {
        adc.push(0x80 | (c.len() as u8 - 1));
        adc.extend_from_slice(c);
    }
    adc.extend([0x80, 0xab]);
    let mut left = 511;
    while left > 0 {
        let n = left.min(67);
        if n >= 4 {
            adc.extend([0x40 | (n as u8 - 4), 0, 0]);
            left -= n;
        } else {
            adc.extend([((n as u8 - 3) << 2), 0]);
            left -= n;
        }
    }
    let parts = vec![
        vec![
            Spec {
                ty: UDZE,
                sectors: 2,
                stored: vec![],
            },
            Spec {
                ty: UDRW,
                sectors: 4,
                stored: raw.clone(),
            },
        ],
        vec![
            Spec {
                ty: UDZO,
                sectors: 8,
                stored: zlib(&z),
            },
            Spec {
                ty: UDIG,
                sectors: 1,
                stored: vec![],
            },
            Spec {
                ty: UDCM,
                sectors: 0,
                stored: vec![],
            },
            Spec {
                ty: UDBZ,
                sectors: 3,
                stored: bzc.finish().unwrap(),
            },
            Spec {
                ty: ULFO,
                sectors: 5,
                stored: lzc,
            },
            Spec {
                ty: UDCO,
                sectors: 2,
                stored: adc,
            },
        ],
    ];
    let mut model = vec![0u8; 2 * 512];
    model.extend(raw);
    model.extend(z);
    model.extend(vec![0u8; 512]);
    model.extend(bz);
    model.extend(lz);
    model.extend(adc_plain);
    (parts, model)
}

#[test]
fn reads_every_chunk_type_from_xml_and_resource_fork() {
    let (parts, model) = sample();
    for img in [build_xml(&parts), build_rsrc(&parts)] {
        let d = open_bytes(img).unwrap();
        assert_eq!(d.virtual_size(), model.len() as u64);
        assert_eq!(read_all(&d).unwrap(), model);
        // Small reads inside compressed chunks go through the cache.
        for off in [
            6 * 512 + 1,
            6 * 512 + 700,
            13 * 512 + 5,
            17 * 512,
            20 * 512 + 9,
            23 * 512 + 3,
            24 * 512 + 500,
        ] {
            let m = d.map(off, 10).unwrap();
            assert_eq!(m.kind, Mapped::Encoded);
            let mut b = [0u8; 10];
            d.read_encoded(&mut b, off).unwrap();
            assert_eq!(&b[..], &model[off as usize..off as usize + 10]);
        }
    }
}

#[test]
fn map_merges_runs_and_keeps_file_offsets() {
    let raw = pattern(1024, 9);
    let parts = vec![vec![
        Spec {
            ty: UDZE,
            sectors: 3,
            stored: vec![],
        },
        Spec {
            ty: UDIG,
            sectors: 2,
            stored: vec![],
        },
        Spec {
            ty: UDRW,
            sectors: 1,
            stored: raw[..512].to_vec(),
        },
        Spec {
            ty: UDRW,
            sectors: 1,
            stored: raw[512..].to_vec(),
        },
        Spec {
            ty: UDZO,
            sectors: 1,
            stored: zlib(&raw[..512]),
        },
    ]];
    let d = open_bytes(build_xml(&parts)).unwrap();
    assert_eq!(
        d.map(0, 7 * 512).unwrap(),
        Mapping {
            kind: Mapped::Zero { host: None },
            len: 5 * 512
        }
    );
    assert_eq!(d.map(100, 1).unwrap().len, 1);
    assert_eq!(
        d.map(5 * 512 + 7, 10_000).unwrap(),
        Mapping {
            kind: Mapped::Data { file: 0, offset: 7 },
            len: 1017
        }
    );
    assert_eq!(
        d.map(7 * 512, 512).unwrap(),
        Mapping {
            kind: Mapped::Encoded,
            len: 512
        }
    );
}

#[test]
fn undescribed_sectors_and_unknown_types_fail_to_read_only_there() {
    // The trailer claims 10 sectors; the map describes 0..2 and 4..6 (a gap,
    // then a chunk of an unknown type) and nothing past 6.
    let mut m = mish(
        0,
        &[Spec {
            ty: UDZE,
            sectors: 2,
            stored: vec![],
        }],
        0,
    );
    let mut e = [0u8; CHUNK_ENTRY];
    e[0..4].copy_from_slice(&0x8000_0099u32.to_be_bytes());
    e[8..16].copy_from_slice(&4u64.to_be_bytes());
    e[16..24].copy_from_slice(&2u64.to_be_bytes());
    m.truncate(MISH_HEADER + CHUNK_ENTRY);
    m.extend_from_slice(&e);
    let mut img = Vec::new();
    let xml = format!(
        "<plist><dict><key>blkx</key><array><dict><data>{}</data></dict></array></dict></plist>",
        b64(&m)
    );
    img.extend_from_slice(xml.as_bytes());
    img.extend(trailer(0, (0, 0), (0, xml.len() as u64), 10));
    let d = open_bytes(img).unwrap();
    assert_eq!(d.map(0, 5120).unwrap().kind, Mapped::Zero { host: None });
    let gap = d.map(1024, 4096).unwrap();
    assert_eq!((gap.kind, gap.len), (Mapped::Encoded, 1024));
    let mut b = [0u8; 512];
    assert_eq!(
        d.read_encoded(&mut b, 1024).unwrap_err().kind(),
        ErrorKind::CorruptImage
    );
    let e = d.read_encoded(&mut b, 4 * 512).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("0x80000099"), "{e}");
    assert_eq!(d.map(6 * 512, 4 * 512).unwrap().len, 4 * 512);
    assert_eq!(
        d.read_encoded(&mut b, 9 * 512).unwrap_err().kind(),
        ErrorKind::CorruptImage
    );
}

#[test]
fn writes_and_writable_opens_are_refused() {
    let (parts, _) = sample();
    let img = build_xml(&parts);
    let loc = Location::File("x.dmg".into());
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new(img.clone(), false));
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
    let e = d.write_at(b"x", 0, &crate::driver::NoBacking).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("read-only"));
    assert_eq!(
        d.write_zeroes(0, 512, &crate::driver::NoBacking).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(d.discard(0, 512).unwrap_err().kind(), ErrorKind::Unsupported);
    d.flush().unwrap();
}

#[test]
fn probe_needs_the_trailer_at_the_end() {
    let (parts, _) = sample();
    let img = build_xml(&parts);
    assert_eq!(probe(&img[..512], &MemoryStorage::new(img.clone(), true)), 100);
    let mut shifted = img.clone();
    shifted.push(0);
    let head = shifted[..512].to_vec();
    assert_eq!(probe(&head, &MemoryStorage::new(shifted, true)), 0);
    assert_eq!(probe(b"koly", &MemoryStorage::new(b"koly".to_vec(), true)), 0);
}

fn corrupt_kind(img: Vec<u8>) -> String {
    match open_bytes(img) {
        Ok(_) => panic!("hostile image opened"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
            e.to_string()
        }
    }
}

/// Rewrite the 40-byte chunk entry `k` of the first mish block of an XML image.
fn with_entry(parts: &[Vec<Spec>], k: usize, f: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut img = build_xml(parts);
    let n = img.len();
    let t = img[n - 512..].to_vec();
    let (xo, xl) = (be64(&t, 0xd8).unwrap() as usize, be64(&t, 0xe0).unwrap() as usize);
    let xml = String::from_utf8(img[xo..xo + xl].to_vec()).unwrap();
    let a = xml.find("<data>").unwrap() + 6;
    let b = xml[a..].find("</data>").unwrap() + a;
    let mut m = base64(&xml.as_bytes()[a..b]).unwrap();
    f(&mut m[MISH_HEADER + k * CHUNK_ENTRY..MISH_HEADER + (k + 1) * CHUNK_ENTRY]);
    let new_xml = format!("{}{}{}", &xml[..a], b64(&m), &xml[b..]);
    img.truncate(xo);
    img.extend_from_slice(new_xml.as_bytes());
    img.extend(trailer(
        be64(&t, 0x20).unwrap(),
        (0, 0),
        (xo as u64, new_xml.len() as u64),
        be64(&t, 0x1ec).unwrap(),
    ));
    img
}

fn set(e: &mut [u8], at: usize, v: u64) {
    e[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn hostile_trailers_are_corrupt() {
    let (parts, _) = sample();
    let img = build_xml(&parts);
    let n = img.len();
    let patch = |at: usize, v: u64| {
        let mut b = img.clone();
        b[n - 512 + at..n - 512 + at + 8].copy_from_slice(&v.to_be_bytes());
        b
    };
    assert!(corrupt_kind(img[..300].to_vec()).contains("shorter"));
    let mut nokoly = img.clone();
    nokoly[n - 512] = b'K';
    assert!(corrupt_kind(nokoly).contains("koly"));
    assert!(corrupt_kind(patch(0x18, n as u64)).contains("data fork"));
    assert!(corrupt_kind(patch(0x28, n as u64 - 512)).contains("resource fork"));
    assert!(corrupt_kind(patch(0x30, u64::MAX)).contains("resource fork"));
    assert!(corrupt_kind(patch(0xd8, u64::MAX - 10)).contains("XML"));
    assert!(corrupt_kind(patch(0xe0, n as u64)).contains("XML"));
    assert!(corrupt_kind(patch(0xe0, 0)).contains("neither"));
    assert!(corrupt_kind(patch(0x1ec, u64::MAX)).contains("sector count"));
    // A resource fork too big for the cap, pointing at real bytes.
    let mut big = vec![0u8; (MAX_RSRC_FORK + 1) as usize];
    big.extend(trailer(0, (0, MAX_RSRC_FORK + 1), (0, 0), 1));
    assert!(corrupt_kind(big).contains("limit"));
}

#[test]
fn hostile_block_maps_are_corrupt() {
    let (parts, _) = sample();
    // Chunk 1 of partition 0 is the raw chunk (4 sectors, 2048 bytes at 0).
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("out of range", with_entry(&parts, 1, |e| set(e, 8, u64::MAX))),
        ("out of range", with_entry(&parts, 1, |e| set(e, 16, u64::MAX - 3))),
        (
            "exceed",
            with_entry(&parts, 1, |e| set(e, 16, DMG_SECTORCOUNTS_MAX + 1)),
        ),
        ("exceeds", with_entry(&parts, 1, |e| set(e, 32, DMG_LENGTHS_MAX + 1))),
        ("beyond the end", with_entry(&parts, 1, |e| set(e, 24, 1 << 40))),
        ("beyond the end", with_entry(&parts, 1, |e| set(e, 24, u64::MAX))),
        ("stores only", with_entry(&parts, 1, |e| set(e, 32, 2047))),
        ("overlap", with_entry(&parts, 1, |e| set(e, 8, 1))),
        ("stores no bytes", {
            let p = vec![vec![Spec {
                ty: UDZO,
                sectors: 1,
                stored: vec![],
            }]];
            build_xml(&p)
        }),
    ];
    for (want, img) in cases {
        let msg = corrupt_kind(img);
        assert!(msg.contains(want), "{want}: {msg}");
    }
}

#[test]
fn hostile_mish_and_xml_are_corrupt() {
    let wrap = |body: &str| {
        let mut img = body.as_bytes().to_vec();
        let l = img.len() as u64;
        img.extend(trailer(0, (0, 0), (0, l), 4));
        img
    };
    let m = mish(
        0,
        &[Spec {
            ty: UDZE,
            sectors: 4,
            stored: vec![],
        }],
        0,
    );
    let mut too_many = m.clone();
    too_many[200..204].copy_from_slice(&1000u32.to_be_bytes());
    let mut not_mish = m.clone();
    not_mish[0] = b'M';
    for (want, body) in [
        ("no blkx", "<plist><dict></dict></plist>".to_string()),
        ("not followed by an array", "<key>blkx</key><dict>".to_string()),
        ("not closed", "<key>blkx</key><array><data>AAAA".to_string()),
        ("not closed", "<key>blkx</key>\n <array><dict>".to_string()),
        ("base64", "<key>blkx</key><array><data>bWlz*</data></array>".to_string()),
        (
            "padding",
            "<key>blkx</key><array><data>bW==bW</data></array>".to_string(),
        ),
        (
            "cannot hold",
            format!("<key>blkx</key><array><data>{}</data></array>", b64(&too_many)),
        ),
        (
            "not a mish",
            format!("<key>blkx</key><array><data>{}</data></array>", b64(&not_mish)),
        ),
        (
            "not a mish",
            format!("<key>blkx</key><array><data>{}</data></array>", b64(&m[..100])),
        ),
    ] {
        let msg = corrupt_kind(wrap(&body));
        assert!(msg.contains(want), "{want}: {msg}");
    }
    // An empty blkx array opens: every sector is undescribed.
    let d = open_bytes(wrap("<key>blkx</key><array/>")).unwrap();
    let mut b = [0u8; 512];
    assert_eq!(d.read_encoded(&mut b, 0).unwrap_err().kind(), ErrorKind::CorruptImage);
}

#[test]
fn hostile_resource_forks_are_corrupt() {
    let (parts, _) = sample();
    let img = build_rsrc(&parts);
    let n = img.len();
    let t = img[n - 512..].to_vec();
    let at = be64(&t, 0x28).unwrap() as usize;
    let patch = |off: usize, v: u32| {
        let mut b = img.clone();
        b[at + off..at + off + 4].copy_from_slice(&v.to_be_bytes());
        b
    };
    assert!(corrupt_kind(patch(0, u32::MAX)).contains("does not fit"));
    assert!(corrupt_kind(patch(8, 0)).contains("does not fit"));
    assert!(corrupt_kind(patch(8, u32::MAX - 300)).contains("does not fit"));
    assert!(corrupt_kind(patch(256, 0)).contains("overruns"));
    assert!(corrupt_kind(patch(256, 1 << 30)).contains("overruns"));
}

#[test]
fn hostile_compressed_data_fails_the_read_not_the_process() {
    let z = zlib(&pattern(1024, 7));
    let mut bad = z.clone();
    let l = bad.len();
    bad[l / 2] ^= 0xff;
    bad[l - 1] ^= 0xff;
    for (ty, stored, sectors) in [
        (UDZO, bad, 2),
        (UDZO, z.clone(), 3), // decodes short of the chunk
        (UDZO, z, 1),         // decodes past the chunk
        (UDBZ, b"BZh91AY&SYgarbage".to_vec(), 2),
        (ULFO, b"bvx-\xff\xff\xff\x7fabc".to_vec(), 2),
        (UDCO, vec![0x00, 0x05], 2),
    ] {
        let d = open_bytes(build_xml(&[vec![Spec { ty, sectors, stored }]])).unwrap();
        let mut b = vec![0u8; 100];
        let e = d.read_encoded(&mut b, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptImage, "{ty:#x}: {e}");
    }
}
