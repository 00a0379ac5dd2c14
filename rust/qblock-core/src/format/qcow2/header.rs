//! The qcow2 header, its extensions and the backing file name
//! (docs/interop/qcow2.txt: "Header", "Header extensions",
//! "Feature name table", "Bitmaps extension", "External data file name").
//!
//! Every field is checked before anything is sized or read by it. Writes to
//! an existing image change single fields in place, so extensions we do not
//! know stay byte for byte as they were.

use super::types::*;
use crate::error::{corrupt, unsupported, Result};

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    // From the extensions and the name area.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
    /// Feature name table entries: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Magics of extensions we do not interpret (kept untouched on disk).
    pub unknown_extensions: Vec<u32>,
}

/// Field offsets, for in-place updates.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36; // l1_size (u32) then l1_table_offset (u64): 12 bytes
pub const OFF_REFTABLE: u64 = 48; // offset (u64) then clusters (u32): 12 bytes
pub const OFF_NB_SNAPSHOTS: u64 = 60; // nb_snapshots (u32) then snapshots_offset (u64): 12 bytes
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_COMPAT: u64 = 80;
pub const OFF_AUTOCLEAR: u64 = 88;
pub const OFF_REFCOUNT_ORDER: u64 = 96;

fn name(bytes: &[u8], what: &str) -> Result<String> {
    if bytes.contains(&0) {
        return Err(corrupt(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(format!("{what} is not valid UTF-8")))
}

impl Header {
    /// Parse the fixed fields from the first bytes of the image (`head`
    /// holds at least 112 bytes, zero-padded past the file's end) and check
    /// what reading the extensions depends on; `validate` checks the rest.
    pub fn parse_fixed(head: &[u8], file_len: u64) -> Result<Header> {
        if head.len() < V3_HEADER_LEN_FULL as usize || &head[..4] != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic)"));
        }
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(corrupt(format!(
                "file of {file_len} bytes is too short for a qcow2 header"
            )));
        }
        let mut h = Header {
            version: be32(head, 4),
            backing_file_offset: be64(head, 8),
            backing_file_size: be32(head, 16),
            cluster_bits: be32(head, 20),
            size: be64(head, 24),
            crypt_method: be32(head, 32),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            ..Default::default()
        };
        match h.version {
            2 => {
                h.refcount_order = 4;
                h.header_length = V2_HEADER_LEN;
            }
            3 => {
                h.incompatible = be64(head, 72);
                h.compatible = be64(head, 80);
                h.autoclear = be64(head, 88);
                h.refcount_order = be32(head, 96);
                h.header_length = be32(head, 100);
                if h.header_length < V3_HEADER_LEN {
                    return Err(corrupt(format!("header length {} is below 104", h.header_length)));
                }
                if !h.header_length.is_multiple_of(8) {
                    // The spec: at least 104 and a multiple of 8.
                    return Err(corrupt(format!(
                        "header length {} is not a multiple of 8",
                        h.header_length
                    )));
                }
                if h.header_length > V3_HEADER_LEN {
                    h.compression_type = head[104];
                }
            }
            v => {
                return Err(unsupported(format!(
                    "qcow2 version {v} is not supported (only 2 and 3)"
                )))
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(corrupt(format!("cluster_bits {} is outside 9..21", h.cluster_bits)));
        }
        let cs = 1u64 << h.cluster_bits;
        if u64::from(h.header_length) > cs {
            return Err(corrupt(format!(
                "header length {} exceeds the cluster size {cs}",
                h.header_length
            )));
        }
        Ok(h)
    }

    /// The remaining checks, once the extensions are read (so that an
    /// unknown feature can be named from the image's feature table).
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let h = self;
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(corrupt(format!("refcount_order {} is above 6", h.refcount_order)));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown >> b & 1 != 0)
                .map(|b| match h.feature_name(0, b) {
                    Some(n) => format!("bit {b} ({n})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(unsupported(format!(
                "unknown incompatible features: {}",
                names.join(", ")
            )));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            if h.header_length <= V3_HEADER_LEN {
                return Err(corrupt(
                    "compression type feature set but the header has no compression type field",
                ));
            }
            match h.compression_type {
                COMPRESSION_ZSTD => {}
                COMPRESSION_ZLIB => {
                    return Err(corrupt(
                        "compression type feature bit set for the default zlib compression",
                    ))
                }
                t => return Err(unsupported(format!("unknown compression type {t}"))),
            }
        } else if h.compression_type != COMPRESSION_ZLIB {
            return Err(corrupt(format!(
                "compression type {} without the compression type feature bit",
                h.compression_type
            )));
        }
        if h.crypt_method != 0 {
            if h.crypt_method > 2 {
                return Err(corrupt(format!("unknown encryption method {}", h.crypt_method)));
            }
            return Err(unsupported("encrypted qcow2 images are not supported yet"));
        }
        if h.size > i64::MAX as u64 {
            return Err(corrupt(format!("virtual size {} does not fit in 63 bits", h.size)));
        }
        h.check_tables(file_len)
    }

    /// The name the image's feature table gives a feature bit.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.0 == kind && f.1 == bit)
            .map(|f| f.2.as_str())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// L1, refcount table and snapshot table: sizes within QEMU's caps,
    /// aligned, inside the file, and not overlapping each other or the header.
    fn check_tables(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let g = Geometry::new(self.cluster_bits, self.extended_l2());
        if self.extended_l2() && self.cluster_bits < 14 {
            // QEMU: subclusters must be at least 512 bytes.
            return Err(corrupt(format!(
                "extended L2 entries need clusters of 16 KiB or more, not {cs}"
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries exceeds the 32 MiB cap",
                self.l1_size
            )));
        }
        let need = g
            .l1_entries_for(self.size)
            .ok_or_else(|| corrupt("virtual size overflows the L1 range"))?;
        if u64::from(self.l1_size) < need {
            return Err(corrupt(format!(
                "L1 table of {} entries is too small for the virtual size {} (needs {need})",
                self.l1_size, self.size
            )));
        }
        let aligned_len = align_up(file_len, cs)?;
        let region = |what: &str, off: u64, len: u64| -> Result<(u64, u64)> {
            if !off.is_multiple_of(cs) {
                return Err(corrupt(format!("{what} offset {off:#x} is not cluster aligned")));
            }
            let end = off
                .checked_add(len)
                .ok_or_else(|| corrupt(format!("{what} range overflows")))?;
            if len > 0 && (off == 0 || end > aligned_len) {
                return Err(corrupt(format!(
                    "{what} at {off:#x} ({len} bytes) is outside the file of {file_len} bytes"
                )));
            }
            Ok((off, end))
        };
        let l1 = region("L1 table", self.l1_table_offset, l1_bytes)?;
        if self.refcount_table_clusters == 0 {
            return Err(corrupt("refcount table has no clusters"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters exceeds the 8 MiB cap",
                self.refcount_table_clusters
            )));
        }
        let rt = region("refcount table", self.refcount_table_offset, rt_bytes)?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "{} snapshots exceed the cap of {MAX_SNAPSHOTS}",
                self.nb_snapshots
            )));
        }
        let sn = if self.nb_snapshots > 0 {
            // Each snapshot header is at least 40 bytes.
            Some(region(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            )?)
        } else {
            None
        };
        let header = (0u64, cs);
        let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1;
        let mut regions = vec![("header", header), ("L1 table", l1), ("refcount table", rt)];
        if let Some(s) = sn {
            regions.push(("snapshot table", s));
        }
        for i in 0..regions.len() {
            for j in i + 1..regions.len() {
                if overlaps(regions[i].1, regions[j].1) {
                    return Err(corrupt(format!("{} overlaps the {}", regions[j].0, regions[i].0)));
                }
            }
        }
        Ok(())
    }

    /// Parse the extensions and the backing file name from the first
    /// cluster (`first`, zero-padded to the cluster size).
    pub fn parse_extensions(&mut self, first: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        debug_assert!(first.len() as u64 >= cs);
        // Backing file name: inside the first cluster, at most 1023 bytes.
        if self.backing_file_offset != 0 {
            let len = u64::from(self.backing_file_size);
            if len > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing file name of {len} bytes is longer than 1023")));
            }
            let end = self
                .backing_file_offset
                .checked_add(len)
                .filter(|&e| e <= cs)
                .ok_or_else(|| corrupt("backing file name lies outside the first cluster"))?;
            if self.backing_file_offset < u64::from(self.header_length) && len > 0 {
                return Err(corrupt("backing file name overlaps the header"));
            }
            if len > 0 {
                self.backing_file = Some(name(
                    &first[self.backing_file_offset as usize..end as usize],
                    "backing file name",
                )?);
            }
        }
        // Extensions run from the end of the header to the backing name (or
        // the end of the first cluster).
        let end = if self.backing_file_offset > u64::from(self.header_length) && self.backing_file_offset < cs {
            self.backing_file_offset
        } else {
            cs
        };
        let mut off = u64::from(self.header_length);
        // Each extension takes at least 8 bytes, so this loop is bounded by cs/8.
        while off.checked_add(8).is_some_and(|e| e <= end) {
            let magic = be32(first, off as usize);
            let len = u64::from(be32(first, off as usize + 4));
            off += 8;
            if magic == EXT_END {
                break;
            }
            // Overflow-proof form of off + len > end.
            if len > end - off {
                return Err(corrupt(format!(
                    "header extension {magic:#x} of {len} bytes overruns the header area"
                )));
            }
            let data = &first[off as usize..(off + len) as usize];
            match magic {
                EXT_BACKING_FORMAT => {
                    // QEMU reads it into a 16-byte buffer.
                    if len >= 16 {
                        return Err(corrupt(format!("backing format extension of {len} bytes is too long")));
                    }
                    self.backing_format = Some(name(data, "backing format")?);
                }
                EXT_FEATURE_TABLE => {
                    if len % 48 != 0 {
                        return Err(corrupt(format!(
                            "feature name table of {len} bytes is not a multiple of 48"
                        )));
                    }
                    for e in data.chunks_exact(48) {
                        let n = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_names
                            .push((e[0], e[1], String::from_utf8_lossy(&e[2..2 + n]).into_owned()));
                    }
                }
                EXT_DATA_FILE => {
                    if len > MAX_DATA_FILE_NAME {
                        return Err(corrupt(format!("data file name of {len} bytes is too long")));
                    }
                    self.data_file = Some(name(data, "data file name")?);
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(corrupt(format!("bitmaps extension of {len} bytes (expected 24)")));
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    };
                    if be32(data, 4) != 0 {
                        return Err(corrupt("bitmaps extension reserved field is not zero"));
                    }
                    if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
                        return Err(corrupt(format!("bitmaps extension lists {} bitmaps", b.nb_bitmaps)));
                    }
                    if b.directory_size == 0 || b.directory_size > MAX_BITMAP_DIR {
                        return Err(corrupt(format!("bitmap directory of {} bytes", b.directory_size)));
                    }
                    if !b.directory_offset.is_multiple_of(cs) {
                        return Err(corrupt("bitmap directory is not cluster aligned"));
                    }
                    self.bitmaps = Some(b);
                }
                EXT_CRYPTO => {}
                other => self.unknown_extensions.push(other),
            }
            // Data is padded to a multiple of 8 bytes.
            off += (len + 7) & !7;
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 && self.data_file.is_none() {
            return Err(corrupt("image needs an external data file but does not name one"));
        }
        if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 && self.incompatible & INCOMPAT_DATA_FILE == 0 {
            return Err(corrupt("data-file-raw is set without an external data file"));
        }
        if self.incompatible & INCOMPAT_DATA_FILE == 0 {
            self.data_file = None;
        }
        Ok(())
    }
}

/// The first cluster (`first`, already parsed into `h`) with another
/// backing file recorded, or none: the fixed header stays, every extension
/// but the backing format is kept byte for byte in its order (unknown ones
/// too), the backing format extension leads when there is one, and the
/// name follows the end marker. Zero-padded to the cluster.
pub fn with_backing(first: &[u8], h: &Header, backing: Option<(&str, Option<&str>)>) -> Result<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    let hl = h.header_length as usize;
    if let Some((name, fmt)) = backing {
        if name.is_empty() || name.len() as u64 > MAX_BACKING_NAME {
            return Err(crate::error::invalid(format!(
                "a qcow2 backing file name takes 1 to {MAX_BACKING_NAME} bytes, not {}",
                name.len()
            )));
        }
        if fmt.is_some_and(|f| f.len() >= 16) {
            return Err(crate::error::invalid(
                "a qcow2 backing format name takes at most 15 bytes",
            ));
        }
    }
    let mut out = first[..hl].to_vec();
    if let Some((_, Some(f))) = backing {
        push_ext(&mut out, EXT_BACKING_FORMAT, f.as_bytes());
    }
    for (magic, data) in extensions(first, h) {
        if magic != EXT_BACKING_FORMAT {
            push_ext(&mut out, magic, data);
        }
    }
    finish_first_cluster(out, backing.map(|b| b.0), cs)
}

/// The extensions of `first` (already parsed into `h`) as (magic, data),
/// in order, up to the end marker.
pub(super) fn extensions<'a>(first: &'a [u8], h: &Header) -> Vec<(u32, &'a [u8])> {
    let cs = h.cluster_size() as usize;
    let hl = h.header_length as usize;
    // The extension area as parse_extensions bounded it (already checked).
    let end = if h.backing_file_offset > hl as u64 && h.backing_file_offset < cs as u64 {
        h.backing_file_offset as usize
    } else {
        cs
    };
    let mut out = Vec::new();
    let mut off = hl;
    while off + 8 <= end {
        let magic = be32(first, off);
        let len = be32(first, off + 4) as usize;
        if magic == EXT_END {
            break;
        }
        out.push((magic, &first[off + 8..off + 8 + len]));
        off += 8 + ((len + 7) & !7);
    }
    out
}

/// Close a first cluster whose header and extensions are in `out`: the
/// end marker, then the backing file name (its offset and size set in
/// the header), zero-padded to the cluster size `cs`.
pub(super) fn finish_first_cluster(mut out: Vec<u8>, backing: Option<&str>, cs: usize) -> Result<Vec<u8>> {
    out.extend_from_slice(&[0u8; 8]);
    let (boff, blen) = match backing {
        Some(name) => {
            let at = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            (at, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cs {
        return Err(unsupported(format!(
            "the header, its extensions and the backing file name need {} bytes, more than the {cs}-byte first cluster",
            out.len()
        )));
    }
    out[8..16].copy_from_slice(&boff.to_be_bytes());
    out[16..20].copy_from_slice(&blen.to_be_bytes());
    out.resize(cs, 0);
    Ok(out)
}

/// [`with_backing`] for the image in `file` as it is now on disk.
pub fn with_backing_from(
    file: &dyn crate::backend::Storage,
    backing: Option<&crate::driver::BackingRef>,
) -> Result<Vec<u8>> {
    let len = file.len()?;
    let mut head = [0u8; V3_HEADER_LEN_FULL as usize];
    file.read_at(&mut head, 0)?;
    let mut h = Header::parse_fixed(&head, len)?;
    let mut first = crate::error::try_zeroed(h.cluster_size() as usize, "qcow2 header cluster")?;
    file.read_at(&mut first, 0)?;
    h.parse_extensions(&first)?;
    with_backing(&first, &h, backing.map(|b| (b.filename.as_str(), b.format.as_deref())))
}

/// What `create` writes into the first cluster.
pub struct NewHeader<'a> {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression_type: u8,
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
    pub data_file: Option<&'a str>,
}

pub(super) fn push_ext(out: &mut Vec<u8>, magic: u32, data: &[u8]) {
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize((out.len() + 7) & !7, 0);
}

/// The names QEMU writes in its feature name table.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The feature name table extension's data: 48 bytes per known bit.
pub(super) fn feature_table() -> Vec<u8> {
    let mut t = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for (kind, bit, n) in FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = *kind;
        e[1] = *bit;
        e[2..2 + n.len()].copy_from_slice(n.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

impl NewHeader<'_> {
    /// The first cluster's bytes (header, extensions, backing name);
    /// None when they do not fit in one cluster.
    pub fn serialize(&self) -> Option<Vec<u8>> {
        let v3 = self.version >= 3;
        let mut out = vec![
            0u8;
            if v3 {
                V3_HEADER_LEN_FULL as usize
            } else {
                V2_HEADER_LEN as usize
            }
        ];
        out[0..4].copy_from_slice(MAGIC);
        out[4..8].copy_from_slice(&self.version.to_be_bytes());
        out[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        out[24..32].copy_from_slice(&self.size.to_be_bytes());
        out[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        out[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        out[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        if v3 {
            out[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            out[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            out[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            out[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            out[100..104].copy_from_slice(&V3_HEADER_LEN_FULL.to_be_bytes());
            out[104] = self.compression_type;
        }
        if let Some(f) = self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = self.data_file {
            push_ext(&mut out, EXT_DATA_FILE, d.as_bytes());
        }
        if v3 {
            push_ext(&mut out, EXT_FEATURE_TABLE, &feature_table());
        }
        out.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(b) = self.backing_file {
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b.as_bytes());
        }
        if out.len() as u64 > 1u64 << self.cluster_bits {
            return None;
        }
        Some(out)
    }
}
