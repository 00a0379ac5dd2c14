//! The hosted sparse extent header ("KDMV", VMware's Virtual Disk Format
//! 1.1, "Hosted Sparse Extent Header"), its stream-optimized footer, and the
//! checks that turn one into a validated [`SparseLayout`].
//!
//! All fields are little-endian; sizes and offsets count 512-byte sectors.

use crate::error::{corrupt, unsupported, Result};
use crate::format::bytes::{le16, le32, le64};

pub const MAGIC: &[u8; 4] = b"KDMV";
/// The older VMFS sparse ("COWD") extent: recognised, not served.
pub const MAGIC_COWD: &[u8; 4] = b"COWD";
pub const SECTOR: u64 = 512;

pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// A redundant grain directory and tables exist (rgd_offset is valid).
pub const FLAG_RGD: u32 = 1 << 1;
/// Grain table entry 1 means "reads as zeroes" (zeroed_grain).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// (Informational: the compression algorithm field decides.)
#[allow(dead_code)]
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Grains and metadata are preceded by markers (streamOptimized).
pub const FLAG_MARKER: u32 = 1 << 17;

pub const COMPRESSION_NONE: u16 = 0;
pub const COMPRESSION_DEFLATE: u16 = 1;

/// gd_offset value saying the grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;

pub const MARKER_EOS: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;

/// Grain table entry meaning "zeroed grain" when FLAG_ZERO_GRAIN is set.
pub const GTE_ZEROED: u32 = 1;

/// Largest grain table QEMU accepts (entries); VMware always writes 512.
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest grain (sectors): QEMU's cap, "1 GB for one cluster is
/// unrealistic"; it also bounds a compressed grain's buffers.
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain directory (entries): QEMU's cap of 32 Mi, enough for 8 TiB
/// with the smallest grains and tables, four times VMDK's 2 TiB limit.
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Grain offsets are 32-bit sector numbers: an extent file cannot grow past
/// 2 TiB (QEMU's VMDK_EXTENT_MAX_SECTORS).
pub const MAX_EXTENT_FILE: u64 = (1u64 << 32) * SECTOR;

/// The on-disk header, fields as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub granularity: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub compress: u16,
}

impl SparseHeader {
    /// Parse the 512-byte header sector (magic included).
    pub fn parse(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < 512 || &b[..4] != MAGIC {
            return Err(corrupt("not a VMDK sparse extent (no KDMV magic)"));
        }
        let f = |r: Option<u64>| r.ok_or_else(|| corrupt("short VMDK header"));
        Ok(SparseHeader {
            version: f(le32(b, 4).map(u64::from))? as u32,
            flags: f(le32(b, 8).map(u64::from))? as u32,
            capacity: f(le64(b, 12))?,
            granularity: f(le64(b, 20))?,
            desc_offset: f(le64(b, 28))?,
            desc_size: f(le64(b, 36))?,
            gtes_per_gt: f(le32(b, 44).map(u64::from))? as u32,
            rgd_offset: f(le64(b, 48))?,
            gd_offset: f(le64(b, 56))?,
            grain_offset: f(le64(b, 64))?,
            compress: f(le16(b, 77).map(u64::from))? as u16,
        })
    }

    pub fn serialize(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        // filler byte, then the newline-detection bytes "\n \r\n".
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }
}

/// Check the footer of a stream-optimized extent whose header says
/// GD_AT_END: the last three sectors are a footer marker, the footer (a
/// header copy with the real gd_offset) and an end-of-stream marker.
pub fn parse_footer(tail: &[u8]) -> Result<SparseHeader> {
    if tail.len() != 1536 {
        return Err(corrupt("stream-optimized extent is too short for its footer"));
    }
    let marker_ok = |at: usize, val: u64, kind: u32| {
        le64(tail, at) == Some(val) && le32(tail, at + 8) == Some(0) && le32(tail, at + 12) == Some(kind)
    };
    // The footer marker's value (sectors of metadata) is not checked, as QEMU.
    let footer_marker = le32(tail, 8) == Some(0) && le32(tail, 12) == Some(MARKER_FOOTER);
    if !footer_marker || !marker_ok(1024, 0, MARKER_EOS) || &tail[512..516] != MAGIC {
        return Err(corrupt("invalid stream-optimized footer"));
    }
    SparseHeader::parse(&tail[512..1024])
}

/// A header checked against its file: every size is bounded, every table
/// lies inside the file. Byte units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseLayout {
    pub version: u32,
    pub capacity: u64,
    pub grain: u64,
    pub gtes_per_gt: u32,
    pub gd_entries: u32,
    pub gd_offset: u64,
    pub rgd_offset: Option<u64>,
    /// Where grains may start: everything below is metadata.
    pub overhead: u64,
    pub compressed: bool,
    pub markers: bool,
    pub zero_grain: bool,
}

impl SparseLayout {
    pub fn gt_bytes(&self) -> u64 {
        u64::from(self.gtes_per_gt) * 4
    }
    /// Guest bytes one grain table covers.
    pub fn gt_span(&self) -> u64 {
        u64::from(self.gtes_per_gt) * self.grain
    }
}

/// Validate `h` (the header, or the footer's copy) for a file of
/// `file_len` bytes. `writable`: version 3 without compression is CBT
/// (changed block tracking) that we would not maintain, so QEMU and we open
/// it read-only.
pub fn validate(h: &SparseHeader, file_len: u64, writable: bool) -> Result<SparseLayout> {
    if h.version > 3 {
        return Err(unsupported(format!(
            "VMDK sparse extent version {} is not supported",
            h.version
        )));
    }
    let compressed = match h.compress {
        COMPRESSION_NONE => false,
        COMPRESSION_DEFLATE => true,
        c => return Err(unsupported(format!("VMDK compression algorithm {c} is not supported"))),
    };
    if h.version == 3 && writable && !compressed {
        return Err(unsupported(
            "VMDK version 3 (changed block tracking) extents can only be opened read-only",
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(corrupt(format!(
            "grain table size {} is not in 1..={MAX_GTES_PER_GT}",
            h.gtes_per_gt
        )));
    }
    if h.granularity == 0 || h.granularity > MAX_GRAIN_SECTORS {
        return Err(corrupt(format!(
            "grain size of {} sectors is not in 1..={MAX_GRAIN_SECTORS}",
            h.granularity
        )));
    }
    let capacity = h
        .capacity
        .checked_mul(SECTOR)
        .ok_or_else(|| corrupt(format!("capacity of {} sectors overflows", h.capacity)))?;
    let gt_span_sectors = u64::from(h.gtes_per_gt) * h.granularity;
    let gd_entries = h.capacity.div_ceil(gt_span_sectors);
    if gd_entries > MAX_GD_ENTRIES {
        return Err(corrupt(format!(
            "grain directory of {gd_entries} entries is larger than {MAX_GD_ENTRIES}"
        )));
    }
    let overhead = h
        .grain_offset
        .checked_mul(SECTOR)
        .filter(|&o| o <= file_len)
        .ok_or_else(|| {
            corrupt(format!(
                "file truncated: grains start at sector {}, beyond its end",
                h.grain_offset
            ))
        })?;
    let gd_bytes = gd_entries * 4;
    let table_at = |sector: u64, what: &str| -> Result<u64> {
        sector
            .checked_mul(SECTOR)
            .filter(|&o| o >= SECTOR && o.checked_add(gd_bytes).is_some_and(|e| e <= file_len))
            .ok_or_else(|| corrupt(format!("{what} at sector {sector} is outside the file")))
    };
    let gd_offset = table_at(h.gd_offset, "grain directory")?;
    let rgd_offset = if h.flags & FLAG_RGD != 0 {
        Some(table_at(h.rgd_offset, "redundant grain directory")?)
    } else {
        None
    };
    Ok(SparseLayout {
        version: h.version,
        capacity,
        grain: h.granularity * SECTOR,
        gtes_per_gt: h.gtes_per_gt,
        gd_entries: gd_entries as u32,
        gd_offset,
        rgd_offset,
        overhead,
        compressed,
        markers: h.flags & FLAG_MARKER != 0,
        zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
    })
}

/// Grain table entries of a VMFS sparse ("COWD") extent: fixed.
pub const COWD_GTES_PER_GT: u32 = 4096;

/// The VMFS sparse ("COWD", VMDK3) extent header, QEMU's VMDK3Header:
/// version, flags, disk sectors, granularity, grain directory offset and
/// entries, then fields we do not need, all 32-bit. No redundant directory,
/// no compression, 4096-entry grain tables.
pub fn cowd_layout(b: &[u8], file_len: u64) -> Result<SparseLayout> {
    if b.len() < 512 || &b[..4] != MAGIC_COWD || file_len < 512 {
        return Err(corrupt("not a VMFS sparse (COWD) extent"));
    }
    let f = |at: usize| u64::from(le32(b, at).unwrap_or(0));
    let (disk_sectors, granularity, gd_sector, gd_entries) = (f(12), f(16), f(20), f(24));
    if granularity == 0 || granularity > MAX_GRAIN_SECTORS {
        return Err(corrupt(format!(
            "grain size of {granularity} sectors is not in 1..={MAX_GRAIN_SECTORS}"
        )));
    }
    if gd_entries > MAX_GD_ENTRIES {
        return Err(corrupt(format!(
            "grain directory of {gd_entries} entries is larger than {MAX_GD_ENTRIES}"
        )));
    }
    let span = u64::from(COWD_GTES_PER_GT) * granularity;
    if gd_entries * span < disk_sectors {
        return Err(corrupt(format!(
            "grain directory of {gd_entries} entries does not cover {disk_sectors} sectors"
        )));
    }
    let gd_offset = gd_sector * SECTOR;
    if gd_offset < SECTOR || gd_offset + gd_entries * 4 > file_len {
        return Err(corrupt(format!(
            "grain directory at sector {gd_sector} is outside the file"
        )));
    }
    Ok(SparseLayout {
        version: le32(b, 4).unwrap_or(0),
        capacity: disk_sectors * SECTOR,
        grain: granularity * SECTOR,
        gtes_per_gt: COWD_GTES_PER_GT,
        gd_entries: gd_entries as u32,
        gd_offset,
        rgd_offset: None,
        overhead: SECTOR,
        compressed: false,
        markers: false,
        zero_grain: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn cowd_header_checks() {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(MAGIC_COWD);
        let put = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut b, 4, 1);
        put(&mut b, 12, 8192); // disk sectors
        put(&mut b, 16, 1); // granularity
        put(&mut b, 20, 1); // gd sector
        put(&mut b, 24, 2); // gd entries
        let l = cowd_layout(&b, 4096).unwrap();
        assert_eq!(
            (l.capacity, l.grain, l.gtes_per_gt, l.gd_entries, l.gd_offset),
            (8192 * 512, 512, 4096, 2, 512)
        );
        for (at, v) in [(16, 0), (16, 0x20_0001), (24, 1), (24, u32::MAX), (20, 0), (20, 100)] {
            let mut c = b.clone();
            put(&mut c, at, v);
            assert_eq!(
                cowd_layout(&c, 4096).unwrap_err().kind(),
                ErrorKind::CorruptImage,
                "{at} {v}"
            );
        }
        assert!(cowd_layout(&b, 100).is_err());
    }

    /// What `qemu-img create -f vmdk x 1M` writes.
    fn good() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 2048,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            grain_offset: 128,
            compress: 0,
        }
    }
    const LEN: u64 = 128 * 512;

    fn kind(h: &SparseHeader, len: u64) -> ErrorKind {
        validate(h, len, false).unwrap_err().kind()
    }

    #[test]
    fn roundtrip_and_layout() {
        let h = good();
        let b = h.serialize();
        assert_eq!(&b[73..77], b"\n \r\n");
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
        let l = validate(&h, LEN, true).unwrap();
        assert_eq!(
            (l.grain, l.gd_entries, l.gd_offset, l.rgd_offset),
            (65536, 1, 26 * 512, Some(21 * 512))
        );
        assert_eq!(l.gt_span(), 32 << 20);
    }

    #[test]
    fn bad_magic_and_short() {
        let mut b = good().serialize();
        b[0] = b'X';
        assert!(SparseHeader::parse(&b).is_err());
        assert!(SparseHeader::parse(&b[..100]).is_err());
    }

    #[test]
    fn each_rejection() {
        let c = ErrorKind::CorruptImage;
        let u = ErrorKind::Unsupported;
        let mut h = good();
        h.version = 4;
        assert_eq!(kind(&h, LEN), u);
        let mut h = good();
        h.compress = 7;
        assert_eq!(kind(&h, LEN), u);
        let mut h = good();
        h.version = 3;
        assert_eq!(validate(&h, LEN, true).unwrap_err().kind(), u);
        assert!(validate(&h, LEN, false).is_ok());
        for g in [0u32, 513, u32::MAX] {
            let mut h = good();
            h.gtes_per_gt = g;
            assert_eq!(kind(&h, LEN), c, "gtes {g}");
        }
        for g in [0u64, MAX_GRAIN_SECTORS + 1, u64::MAX] {
            let mut h = good();
            h.granularity = g;
            assert_eq!(kind(&h, LEN), c, "granularity {g}");
        }
        let mut h = good();
        h.capacity = u64::MAX / 2;
        assert_eq!(kind(&h, LEN), c);
        // afl9.vmdk: a capacity whose grain directory would be enormous.
        let mut h = good();
        h.capacity = 2233785398448881665;
        assert_eq!(kind(&h, LEN), c);
        let mut h = good();
        h.grain_offset = 129;
        assert_eq!(kind(&h, LEN), c);
        let mut h = good();
        h.grain_offset = u64::MAX;
        assert_eq!(kind(&h, LEN), c);
        for gd in [0u64, 128, u64::MAX, u64::MAX / 512 + 1] {
            let mut h = good();
            h.gd_offset = gd;
            assert_eq!(kind(&h, LEN), c, "gd {gd}");
            let mut h = good();
            h.rgd_offset = gd;
            assert_eq!(kind(&h, LEN), c, "rgd {gd}");
        }
        // Without the RGD flag the redundant offset is ignored.
        let mut h = good();
        h.flags = 0;
        h.rgd_offset = u64::MAX;
        assert_eq!(validate(&h, LEN, true).unwrap().rgd_offset, None);
    }

    #[test]
    fn footer_checks() {
        let mut tail = vec![0u8; 1536];
        tail[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        tail[512..1024].copy_from_slice(&good().serialize());
        assert_eq!(parse_footer(&tail).unwrap(), good());
        let mut t = tail.clone();
        t[512] = 0;
        assert!(parse_footer(&t).is_err());
        let mut t = tail.clone();
        t[12] = 2;
        assert!(parse_footer(&t).is_err());
        let mut t = tail.clone();
        t[1024] = 1; // end-of-stream marker value must be 0
        assert!(parse_footer(&t).is_err());
        assert!(parse_footer(&tail[..1024]).is_err());
    }
}
