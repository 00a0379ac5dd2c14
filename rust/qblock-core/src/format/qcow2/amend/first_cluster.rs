//! Rewriting the first cluster for another version (docs/interop/qcow2.txt:
//! "Header", "Header extensions", "Feature name table").
//!
//! A version 2 header is the first 72 bytes; version 3 adds the feature
//! bits, the refcount order, the header length and the compression type
//! (112 bytes, as QEMU writes it) and a feature name table. Every other
//! extension is kept byte for byte and in its order (backing format and
//! unknown ones alike), and the backing file name follows the end marker.

use super::super::header::{extensions, feature_table, finish_first_cluster, push_ext, Header};
use super::super::types::*;
use crate::error::Result;

/// The fields a version change sets.
pub struct NewFields {
    pub version: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub compression_type: u8,
    /// Drop the bitmaps extension (a version 2 image cannot keep bitmaps).
    pub drop_bitmaps: bool,
}

/// How many bytes of `first` are in use: header, extensions, end marker
/// and backing name.
pub fn used_len(first: &[u8], h: &Header) -> usize {
    let exts: usize = extensions(first, h).iter().map(|(_, d)| 8 + ((d.len() + 7) & !7)).sum();
    let area = h.header_length as usize + exts + 8;
    let name_end = if h.backing_file_offset != 0 {
        (h.backing_file_offset + u64::from(h.backing_file_size)) as usize
    } else {
        0
    };
    area.max(name_end)
}

/// The new first cluster (zero-padded to the cluster size) for `h`, whose
/// bytes on disk are `first`, with the fields of `f`.
pub fn rewrite(first: &[u8], h: &Header, f: &NewFields) -> Result<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    let v3 = f.version >= 3;
    let mut out = first[..V2_HEADER_LEN as usize].to_vec();
    out[4..8].copy_from_slice(&f.version.to_be_bytes());
    if v3 {
        out.resize(V3_HEADER_LEN_FULL as usize, 0);
        out[72..80].copy_from_slice(&f.incompatible.to_be_bytes());
        out[80..88].copy_from_slice(&f.compatible.to_be_bytes());
        out[88..96].copy_from_slice(&f.autoclear.to_be_bytes());
        out[96..100].copy_from_slice(&h.refcount_order.to_be_bytes());
        out[100..104].copy_from_slice(&V3_HEADER_LEN_FULL.to_be_bytes());
        out[104] = f.compression_type;
    }
    for (magic, data) in extensions(first, h) {
        let dropped = magic == EXT_FEATURE_TABLE || (magic == EXT_BITMAPS && (f.drop_bitmaps || !v3));
        if !dropped {
            push_ext(&mut out, magic, data);
        }
    }
    if v3 {
        // A version 2 image has no feature bits to name.
        push_ext(&mut out, EXT_FEATURE_TABLE, &feature_table());
    }
    finish_first_cluster(out, h.backing_file.as_deref(), cs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qcow2::header::NewHeader;

    /// A version 2 first cluster with a backing format, an unknown
    /// extension and a backing name; parsed.
    fn v2() -> (Vec<u8>, Header) {
        let mut first = NewHeader {
            version: 2,
            cluster_bits: 16,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression_type: 0,
            backing_file: None,
            backing_format: Some("raw"),
            data_file: None,
        }
        .serialize()
        .unwrap();
        first.truncate(first.len() - 8); // reopen the extension area
        push_ext(&mut first, 0x1234_5678, b"keep me");
        let first = finish_first_cluster(first, Some("base.img"), 1 << 16).unwrap();
        let h = reparse(&first);
        (first, h)
    }

    fn reparse(first: &[u8]) -> Header {
        let mut h = Header::parse_fixed(first, 4 << 16).unwrap();
        h.parse_extensions(first).unwrap();
        h
    }

    fn fields(version: u32) -> NewFields {
        NewFields {
            version,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            compression_type: 0,
            drop_bitmaps: true,
        }
    }

    #[test]
    fn up_and_down_keep_backing_and_unknown_extensions() {
        let (first, h) = v2();
        assert_eq!(h.unknown_extensions, vec![0x1234_5678]);
        let up = rewrite(&first, &h, &fields(3)).unwrap();
        let h3 = reparse(&up);
        assert_eq!((h3.version, h3.header_length), (3, 112));
        assert_eq!(h3.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h3.backing_format.as_deref(), Some("raw"));
        assert_eq!(h3.unknown_extensions, vec![0x1234_5678]);
        assert_eq!(h3.feature_name(1, 0), Some("lazy refcounts"));
        let down = rewrite(&up, &h3, &fields(2)).unwrap();
        let h2 = reparse(&down);
        assert_eq!((h2.version, h2.header_length), (2, 72));
        assert!(h2.feature_names.is_empty());
        assert_eq!(h2.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h2.unknown_extensions, vec![0x1234_5678]);
        assert_eq!(used_len(&down, &h2), used_len(&first, &h));
    }
}
