//! The VHDX header section (VHDX Format Specification v1.00, section 2.2):
//! the file type identifier at 0, the two headers at 64 KiB and 128 KiB
//! (the current one is the valid one with the higher sequence number) and
//! the two copies of the region table at 192 KiB and 256 KiB.

use super::guid::{Guid, BAT_REGION, METADATA_REGION, ZERO_GUID};
use crate::backend::Storage;
use crate::error::{corrupt, unsupported, Result};
use crate::format::bytes::{le16, le32, le64};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Where the two headers live, and their size (the CRC covers all of it).
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// The header section: nothing else may live in the first MiB.
pub const HEADER_SECTION_END: u64 = MIB;
/// The spec's limit on region table entries (section 2.2.3).
const MAX_REGION_ENTRIES: u32 = 2047;
/// Region flag: the region is required to open the file.
const REGION_REQUIRED: u32 = 1;

/// CRC-32C of `buf` with the 4-byte checksum field at `field` taken as zero.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..field]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[field + 4..])
}

/// Store the checksum of `buf` in its field at `field`.
pub fn seal(buf: &mut [u8], field: usize) {
    let c = checksum(buf, field);
    buf[field..field + 4].copy_from_slice(&c.to_le_bytes());
}

fn checksum_ok(buf: &[u8], field: usize) -> bool {
    le32(buf, field) == Some(checksum(buf, field))
}

/// One VHDX header (section 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parse a 4 KiB header block; None when it is not a valid header.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || !b.starts_with(HEADER_SIGNATURE) || !checksum_ok(&b[..HEADER_SIZE], 4) {
            return None;
        }
        let g = |at: usize| -> Guid { b[at..at + 16].try_into().unwrap_or(ZERO_GUID) };
        let h = Header {
            sequence: le64(b, 8)?,
            file_write_guid: g(16),
            data_write_guid: g(32),
            log_guid: g(48),
            log_version: le16(b, 64)?,
            version: le16(b, 66)?,
            log_length: le32(b, 68)?,
            log_offset: le64(b, 72)?,
        };
        // Version 1 is the only one; QEMU ignores a header of another version.
        (h.version == 1).then_some(h)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// Read both headers; return the current one and its slot (0 or 1).
pub fn read_headers(storage: &dyn Storage) -> Result<(Header, usize)> {
    let mut parsed = [None, None];
    let mut buf = vec![0u8; HEADER_SIZE];
    for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
        storage.read_at(&mut buf, off)?;
        parsed[i] = Header::parse(&buf);
    }
    let pick = match (&parsed[0], &parsed[1]) {
        (None, None) => return Err(corrupt("no valid VHDX header (both copies bad)")),
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        (Some(a), Some(b)) if a.sequence > b.sequence => 0,
        (Some(a), Some(b)) if b.sequence > a.sequence => 1,
        // Equal sequence numbers are invalid, except for identical copies
        // (Disk2VHD writes those).
        (Some(a), Some(b)) if a == b => 0,
        _ => return Err(corrupt("VHDX headers differ but carry the same sequence number")),
    };
    let h = parsed[pick].take().unwrap_or_else(|| unreachable!());
    if h.log_version != 0 {
        return Err(unsupported(format!(
            "VHDX log version {} (only 0 is defined)",
            h.log_version
        )));
    }
    Ok((h, pick))
}

/// One region table entry (section 2.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
}

/// The regions of a file: the BAT and the metadata region.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// Parse one 64 KiB region table.
pub fn parse_region_table(b: &[u8], file_len: u64) -> Result<Regions> {
    if b.len() < REGION_TABLE_SIZE || !b.starts_with(REGION_SIGNATURE) {
        return Err(corrupt("VHDX region table has no 'regi' signature"));
    }
    if !checksum_ok(&b[..REGION_TABLE_SIZE], 4) {
        return Err(corrupt("VHDX region table checksum is wrong"));
    }
    let count = le32(b, 8).unwrap_or(0);
    if count > MAX_REGION_ENTRIES {
        return Err(corrupt(format!(
            "VHDX region table has {count} entries (at most {MAX_REGION_ENTRIES})"
        )));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let guid: Guid = b[at..at + 16].try_into().unwrap_or(ZERO_GUID);
        let r = Region {
            offset: le64(b, at + 16).unwrap_or(0),
            length: le32(b, at + 24).unwrap_or(0) as u64,
        };
        let flags = le32(b, at + 28).unwrap_or(0);
        if r.offset < HEADER_SECTION_END
            || !r.offset.is_multiple_of(MIB)
            || r.length == 0
            || !r.length.is_multiple_of(MIB)
        {
            return Err(corrupt(format!(
                "VHDX region {i} at {} of {} bytes is not whole MiBs after the header section",
                r.offset, r.length
            )));
        }
        if r.offset.checked_add(r.length).is_none_or(|e| e > file_len) {
            return Err(corrupt(format!(
                "VHDX region {i} at {} of {} bytes ends past the end of the file ({file_len} bytes)",
                r.offset, r.length
            )));
        }
        if let Some(o) = seen.iter().find(|o| overlaps(o, &r)) {
            return Err(corrupt(format!(
                "VHDX region at {} overlaps the region at {}",
                r.offset, o.offset
            )));
        }
        seen.push(r);
        let slot = if guid == BAT_REGION {
            &mut bat
        } else if guid == METADATA_REGION {
            &mut meta
        } else if flags & REGION_REQUIRED != 0 {
            return Err(unsupported("VHDX file has a required region this reader does not know"));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return Err(corrupt("VHDX region table lists the same region twice"));
        }
    }
    match (bat, meta) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(corrupt("VHDX region table lacks the BAT or the metadata region")),
    }
}

/// Read the region table: the first copy, or the second when the first is bad.
pub fn read_regions(storage: &dyn Storage, file_len: u64) -> Result<Regions> {
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    storage.read_at(&mut buf, REGION_TABLE_OFFSETS[0])?;
    match parse_region_table(&buf, file_len) {
        Ok(r) => Ok(r),
        Err(first) => {
            storage.read_at(&mut buf, REGION_TABLE_OFFSETS[1])?;
            parse_region_table(&buf, file_len).map_err(|_| first)
        }
    }
}

pub fn overlaps(a: &Region, b: &Region) -> bool {
    a.offset < b.offset.saturating_add(b.length) && b.offset < a.offset.saturating_add(a.length)
}

/// Build a region table listing the BAT and the metadata region.
pub fn region_table_bytes(r: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(REGION_SIGNATURE);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (guid, reg)) in [(BAT_REGION, r.bat), (METADATA_REGION, r.metadata)].iter().enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(guid);
        b[at + 16..at + 24].copy_from_slice(&reg.offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&(reg.length as u32).to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&REGION_REQUIRED.to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: ZERO_GUID,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let h = header(5);
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h.clone()));
        let mut bad = b.clone();
        bad[100] = 1; // inside the checksummed reserved area
        assert_eq!(Header::parse(&bad), None);
        let mut v2 = h.clone();
        v2.version = 2;
        assert_eq!(Header::parse(&v2.to_bytes()), None);
        assert_eq!(Header::parse(&b[..100]), None);
    }

    #[test]
    fn crc32c_matches_the_reference_value() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut b = vec![7u8; 64];
        seal(&mut b, 4);
        assert!(checksum_ok(&b, 4));
    }

    #[test]
    fn region_table_checks() {
        let regs = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        let t = region_table_bytes(&regs);
        assert!(parse_region_table(&t, 4 * MIB).is_ok());
        assert!(parse_region_table(&t, 3 * MIB)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let mut o = regs;
        o.metadata.offset = 2 * MIB;
        assert!(parse_region_table(&region_table_bytes(&o), 8 * MIB)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        let mut o = regs;
        o.bat.offset = 0;
        assert!(parse_region_table(&region_table_bytes(&o), 8 * MIB)
            .unwrap_err()
            .to_string()
            .contains("whole MiBs"));
        let mut c = t.clone();
        c[8..12].copy_from_slice(&5000u32.to_le_bytes());
        seal(&mut c, 4);
        assert!(parse_region_table(&c, 8 * MIB)
            .unwrap_err()
            .to_string()
            .contains("entries"));
        let mut c = t;
        c[20] ^= 1;
        assert!(parse_region_table(&c, 8 * MIB)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }
}
