//! Rewriting the first cluster for another version (docs/interop/qcow2.txt:
//! "Header", "Header extensions", "Feature name table").
//!
//! A version 2 header is the first 72 bytes; version 3 adds the feature
//! bits, the refcount order, the header length and the compression type
//! (112 bytes, as QEMU writes it) and a feature name table. Every other
//! extension is kept byte for byte and in its order (backing format and
//! unknown ones alike), and the backing file name follows the end marker.

use super::super::header::{feature_table, push_ext, Header};
use super::super::types::*;
use crate::error::{unsupported, Result};

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

/// The extensions of `first` as (magic, data), in order, up to the end marker.
fn extensions<'a>(first: &'a [u8], h: &Header) -> Vec<(u32, &'a [u8])> {
    let cs = h.cluster_size() as usize;
    let hl = h.header_length as usize;
    // The extension area as parse_extensions bounded (and checked) it.
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
    out.extend_from_slice(&[0u8; 8]);
    let (boff, blen) = match &h.backing_file {
        Some(name) => {
            let at = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            (at, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cs {
        return Err(unsupported(format!(
            "the new header, its extensions and the backing file name need {} bytes, more than the {cs}-byte first cluster",
            out.len()
        )));
    }
    out[8..16].copy_from_slice(&boff.to_be_bytes());
    out[16..20].copy_from_slice(&blen.to_be_bytes());
    out.resize(cs, 0);
    Ok(out)
}
