//! On-disk constants, limits and entry encodings of qcow2
//! (docs/interop/qcow2.txt: "Header", "Host cluster management",
//! "Cluster mapping", "Compressed Clusters Descriptor", "Extended L2 Entries").

use crate::error::{corrupt, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// 512-byte clusters are the smallest the spec allows; 2 MiB the largest
/// QEMU accepts (the L2 entry offset field and its cache assume it).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU's QCOW_MAX_L1_SIZE: an L1 table above 32 MiB is refused, which bounds
/// the memory we hold for it (at most 4 Mi entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table at most.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU refuses backing file names longer than 1023 bytes.
pub const MAX_BACKING_NAME: u64 = 1023;
/// QEMU's QCOW_MAX_SNAPSHOTS.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// refcount_bits = 1 << refcount_order is at most 64.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Our cap on the external data file name (QEMU's only bound is the
/// extension area, itself inside one cluster).
pub const MAX_DATA_FILE_NAME: u64 = 4096;
/// QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE (1024 * QCOW2_MAX_BITMAPS).
pub const MAX_BITMAP_DIR: u64 = 1024 * 65535;
/// QEMU's QCOW2_MAX_BITMAPS.
pub const MAX_BITMAPS: u32 = 65535;

pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// Header length QEMU writes for v3 (with the compression type byte and padding).
pub const V3_HEADER_LEN_FULL: u32 = 112;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Header extension magics.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1/L2 entry bits.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO_FLAG: u64 = 1;
/// Bits 9..55: host offset of an L2 table / a data cluster.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be zero in an L1 entry (1..8, 56..62).
pub const L1E_RESERVED: u64 = 0x7f00_0000_0000_01fe | 1;
/// Bits that must be zero in a standard (uncompressed) L2 entry (1..8, 56..61).
pub const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entries: bits 9..63.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Compression types (header byte 104).
pub const COMPRESSION_ZLIB: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

/// Big-endian field readers on a slice known to be long enough.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Round `v` up to a multiple of the power of two `align`, failing on overflow.
pub fn align_up(v: u64, align: u64) -> Result<u64> {
    v.checked_add(align - 1)
        .map(|x| x & !(align - 1))
        .ok_or_else(|| corrupt("offset overflows 64 bits"))
}

/// Fixed facts derived from the header: sizes of clusters, tables, entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// log2 of the number of entries in one L2 table.
    pub l2_bits: u32,
    /// Extended L2 entries (128 bits, 32 subclusters).
    pub extended: bool,
    /// log2 of the allocation unit: a subcluster or a whole cluster.
    pub unit_bits: u32,
    /// Compressed descriptor: bits below `csize_shift` are the host offset.
    pub csize_shift: u32,
    pub csize_mask: u64,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended: bool) -> Geometry {
        let l2_bits = if extended { cluster_bits - 4 } else { cluster_bits - 3 };
        let csize_shift = 62 - (cluster_bits - 8);
        Geometry {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            l2_bits,
            extended,
            unit_bits: if extended { cluster_bits - 5 } else { cluster_bits },
            csize_shift,
            csize_mask: (1u64 << (cluster_bits - 8)) - 1,
        }
    }
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    /// u64 words per L2 entry.
    pub fn words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }
    /// Guest bytes one L2 table covers.
    pub fn l2_cover_bits(&self) -> u32 {
        self.cluster_bits + self.l2_bits
    }
    /// L1 entries needed for a virtual size, or None when it overflows.
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let cover = 1u64.checked_shl(self.l2_cover_bits())?;
        Some(size / cover + u64::from(!size.is_multiple_of(cover)))
    }
    pub fn unit_size(&self) -> u64 {
        1 << self.unit_bits
    }
    /// Host offset and byte length of a compressed cluster's data.
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let off = entry & ((1u64 << self.csize_shift) - 1);
        let sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        (off, sectors * 512 - (off & 511))
    }
}

/// What one L2 entry (standard part + subcluster bitmap) says about one
/// allocation unit (a cluster, or a subcluster with extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Falls through to the backing file.
    Unallocated,
    /// Reads as zeroes, nothing allocated.
    ZeroPlain,
    /// Reads as zeroes, a host cluster is allocated at `host` (unit start).
    ZeroAlloc { host: u64, copied: bool },
    /// Data at `host` (unit start).
    Data { host: u64, copied: bool },
    /// Compressed cluster.
    Compressed,
}

/// Decode the unit `sc` (0 without extended L2) of the entry `(e, bitmap)`.
/// `data_file`: offset 0 with the copied flag is a real cluster in an
/// external data file (the spec's exception to "0 means unallocated").
pub fn decode(g: &Geometry, e: u64, bitmap: u64, sc: u32, data_file: bool) -> Result<Unit> {
    if e & COMPRESSED != 0 {
        if g.extended && bitmap != 0 {
            return Err(corrupt(format!(
                "compressed cluster with a subcluster bitmap {bitmap:#x}"
            )));
        }
        if data_file {
            return Err(corrupt("compressed cluster in an image with an external data file"));
        }
        return Ok(Unit::Compressed);
    }
    if e & L2E_RESERVED != 0 {
        return Err(corrupt(format!("L2 entry {e:#x} has reserved bits set")));
    }
    let off = e & OFFSET_MASK;
    let copied = e & COPIED != 0;
    let allocated = off != 0 || (data_file && copied);
    if g.extended {
        let alloc = (bitmap >> sc) & 1 != 0;
        let zero = (bitmap >> (sc + 32)) & 1 != 0;
        if alloc && zero {
            return Err(corrupt(format!(
                "subcluster {sc} is both allocated and zero (bitmap {bitmap:#x})"
            )));
        }
        let host = off + (u64::from(sc) << g.unit_bits);
        return Ok(match (allocated, alloc, zero) {
            (true, true, _) => Unit::Data { host, copied },
            (true, false, true) => Unit::ZeroAlloc { host, copied },
            (false, true, _) => {
                return Err(corrupt(format!(
                    "subcluster {sc} allocated in an unallocated cluster (entry {e:#x})"
                )))
            }
            (_, false, true) => Unit::ZeroPlain,
            (_, false, false) => Unit::Unallocated,
        });
    }
    Ok(if e & ZERO_FLAG != 0 {
        if allocated {
            Unit::ZeroAlloc { host: off, copied }
        } else {
            Unit::ZeroPlain
        }
    } else if allocated {
        Unit::Data { host: off, copied }
    } else {
        Unit::Unallocated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor() {
        let g = Geometry::new(16, false);
        // 62 - (16 - 8) = 54 offset bits; 3 extra sectors.
        let e = COMPRESSED | (3u64 << 54) | 0x1234_5600 | 0x10;
        let (off, len) = g.compressed(e);
        assert_eq!(off, 0x1234_5610);
        assert_eq!(len, 4 * 512 - 0x10);
    }

    #[test]
    fn decode_standard_and_extended() {
        let g = Geometry::new(16, false);
        assert_eq!(decode(&g, 0, 0, 0, false).unwrap(), Unit::Unallocated);
        assert_eq!(decode(&g, 1, 0, 0, false).unwrap(), Unit::ZeroPlain);
        assert_eq!(
            decode(&g, COPIED | 0x10000, 0, 0, false).unwrap(),
            Unit::Data {
                host: 0x10000,
                copied: true
            }
        );
        assert_eq!(
            decode(&g, COPIED, 0, 0, true).unwrap(),
            Unit::Data { host: 0, copied: true }
        );
        let x = Geometry::new(16, true);
        let bm = 0b01 | (0b10u64 << 32);
        assert_eq!(
            decode(&x, 0x20000, bm, 0, false).unwrap(),
            Unit::Data {
                host: 0x20000,
                copied: false
            }
        );
        assert_eq!(
            decode(&x, 0x20000, bm, 1, false).unwrap(),
            Unit::ZeroAlloc {
                host: 0x20800,
                copied: false
            }
        );
        assert_eq!(decode(&x, 0x20000, bm, 2, false).unwrap(), Unit::Unallocated);
        assert!(decode(&x, 0x20000, 1 | (1 << 32), 0, false).is_err());
        assert!(decode(&x, 0, 1, 0, false).is_err());
        assert!(decode(&x, COMPRESSED, 1, 0, false).is_err());
    }
}
