//! The VHDX block allocation table (section 2.5): one 64-bit entry per
//! payload block, with a sector bitmap entry after every `chunk_ratio`
//! payload entries. An entry holds a state (bits 0-2) and a file offset in
//! MiB (bits 20-63).

/// Payload block states (section 2.5.1.1).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state PRESENT (section 2.5.1.2; the other is NOT_PRESENT, 0).
pub const SB_PRESENT: u64 = 6;

const STATE_MASK: u64 = 7;
const OFFSET_MASK: u64 = !((1 << 20) - 1);

pub fn state(e: u64) -> u64 {
    e & STATE_MASK
}
pub fn offset(e: u64) -> u64 {
    e & OFFSET_MASK
}
pub fn entry(state: u64, offset: u64) -> u64 {
    (offset & OFFSET_MASK) | (state & STATE_MASK)
}

/// The geometry of a BAT: how many payload blocks, how many entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u64,
    pub chunk_ratio: u64,
    pub payload_blocks: u64,
    pub entries: u64,
}

impl Layout {
    /// A disk without parent has payload entries plus one sector bitmap
    /// entry after each whole chunk but the last (QEMU's count); a
    /// differencing disk has whole chunks, each with its bitmap entry.
    pub fn new(disk_size: u64, block_size: u64, chunk_ratio: u64, has_parent: bool) -> Layout {
        let payload_blocks = disk_size.div_ceil(block_size);
        let entries = if has_parent {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Layout {
            block_size,
            chunk_ratio,
            payload_blocks,
            entries,
        }
    }

    /// The BAT index of the sector bitmap entry covering payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// The BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_entries() {
        // 512-byte sectors, 32 MiB blocks: 128 payload blocks per bitmap.
        let l = Layout::new(10 << 30, 32 << 20, 128, false);
        assert_eq!(l.payload_blocks, 320);
        assert_eq!(l.entries, 320 + 2);
        assert_eq!(l.payload_index(127), 127);
        assert_eq!(l.payload_index(128), 129);
        assert_eq!(Layout::new(0, 1 << 20, 4096, false).entries, 0);
        let d = Layout::new(10 << 30, 32 << 20, 128, true);
        assert_eq!(d.entries, 3 * 129);
        assert_eq!(d.bitmap_index(129), 257);
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 << 20);
        assert_eq!((state(e), offset(e)), (6, 5 << 20));
    }
}
