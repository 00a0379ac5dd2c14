//! Small readers for on-disk integers, shared by the format parsers and
//! probes. Out-of-range reads give `None` rather than panicking.

use crate::backend::Storage;

pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
pub fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}
pub fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
pub fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
pub fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// The last 512 bytes of a storage (VHD footers, DMG trailers), if it has them.
pub fn tail512(storage: &dyn Storage) -> Option<[u8; 512]> {
    let len = storage.len().ok()?;
    if len < 512 {
        return None;
    }
    let mut buf = [0u8; 512];
    storage.read_at(&mut buf, len - 512).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_none() {
        assert_eq!(be32(&[1, 2, 3], 0), None);
        assert_eq!(le16(&[1, 2], 1), None);
        assert_eq!(be16(&[1, 2], usize::MAX), None);
        assert_eq!(le32(&[1, 0, 0, 0], 0), Some(1));
        assert_eq!(be64(&[0, 0, 0, 0, 0, 0, 0, 2], 0), Some(2));
    }
}
