//! Creating qcow2 images (QEMU's `qemu-img create -f qcow2` options).
//!
//! Layout: header cluster, refcount table, refcount blocks, L1 table, then
//! (with preallocation) the L2 tables and the data clusters. Everything is
//! written before the header, so a crash during creation leaves a file
//! without a valid header rather than a half-valid image.

use super::header::NewHeader;
use super::refcount::set_entry;
use super::types::*;
use crate::backend::write_zero_buffers;
use crate::error::{invalid, try_zeroed, unsupported, Error, Result};
use crate::location::Location;
use crate::options::CreateOptions;

/// The creation options, checked as QEMU checks them.
pub struct Params {
    pub size: u64,
    pub cluster_bits: u32,
    pub version: u32,
    pub prealloc: String,
    pub lazy: bool,
    pub refcount_order: u32,
    pub extended: bool,
    pub compression_type: u8,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub data_file: Option<String>,
    pub data_raw: bool,
}

/// Read and check the qcow2 creation options (all of them: unknown ones
/// are refused).
pub fn params(opts: &mut CreateOptions) -> Result<Params> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let cluster_size = opts.take_u64("cluster_size")?.unwrap_or(65536);
    let compat = opts.take_str("compat")?.unwrap_or_else(|| "1.1".into());
    let mut prealloc = opts.take_str("preallocation")?.unwrap_or_else(|| "off".into());
    let lazy = opts.take_bool("lazy_refcounts")?.unwrap_or(false);
    let refcount_bits = opts.take_u64("refcount_bits")?.unwrap_or(16);
    let extended = opts.take_bool("extended_l2")?.unwrap_or(false);
    let compression = opts.take_str("compression_type")?.unwrap_or_else(|| "zlib".into());
    let encrypt = opts.take_bool("encrypt")?.unwrap_or(false);
    let backing = opts.take_str("backing_file")?.filter(|s| !s.is_empty());
    let backing_fmt = opts.take_str("backing_fmt")?.filter(|s| !s.is_empty());
    let data_file = opts.take_str("data_file")?.filter(|s| !s.is_empty());
    let data_raw = opts.take_bool("data_file_raw")?.unwrap_or(false);
    opts.finish("qcow2")?;

    if encrypt {
        return Err(unsupported("creating encrypted qcow2 images is not supported yet"));
    }
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(invalid(format!(
            "cluster_size must be a power of two from 512 to 2 MiB, not {cluster_size}"
        )));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let version = match compat.as_str() {
        "0.10" | "v2" => 2,
        "1.1" | "v3" => 3,
        other => return Err(invalid(format!("compat must be 0.10 or 1.1, not '{other}'"))),
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(invalid(format!(
            "refcount_bits must be a power of two up to 64, not {refcount_bits}"
        )));
    }
    let refcount_order = refcount_bits.trailing_zeros();
    let compression_type = match compression.as_str() {
        "zlib" => COMPRESSION_ZLIB,
        "zstd" => COMPRESSION_ZSTD,
        other => return Err(invalid(format!("compression_type must be zlib or zstd, not '{other}'"))),
    };
    if version == 2 {
        let bad = [
            (lazy, "lazy_refcounts"),
            (refcount_bits != 16, "refcount_bits other than 16"),
            (extended, "extended_l2"),
            (compression_type != COMPRESSION_ZLIB, "compression_type zstd"),
            (data_file.is_some(), "data_file"),
        ];
        if let Some((_, what)) = bad.iter().find(|b| b.0) {
            return Err(invalid(format!("{what} needs compat 1.1 (qcow2 version 3)")));
        }
    }
    if extended && cluster_bits < 14 {
        return Err(invalid("extended_l2 needs a cluster_size of at least 16 KiB"));
    }
    if data_raw && data_file.is_none() {
        return Err(invalid("data_file_raw needs a data_file"));
    }
    if backing_fmt.is_some() && backing.is_none() {
        return Err(invalid("backing_fmt given without a backing file"));
    }
    if backing.as_ref().is_some_and(|b| b.len() as u64 > MAX_BACKING_NAME) {
        return Err(invalid("backing file name is longer than 1023 bytes"));
    }
    if backing_fmt.as_ref().is_some_and(|f| f.len() >= 16) {
        return Err(invalid("backing format name is too long"));
    }
    if !matches!(prealloc.as_str(), "off" | "metadata" | "falloc" | "full") {
        return Err(invalid(format!(
            "preallocation must be off, metadata, falloc or full, not '{prealloc}'"
        )));
    }
    if backing.is_some() && prealloc != "off" && !extended {
        return Err(invalid(
            "a backing file and preallocation can only be combined with extended_l2",
        ));
    }
    if size > i64::MAX as u64 {
        return Err(invalid(format!("size {size} does not fit in 63 bits")));
    }
    if data_raw && prealloc == "off" {
        // data-file-raw: the metadata must map guest offset = data file
        // offset everywhere, as QEMU arranges by preallocating it.
        prealloc = "metadata".into();
    }

    Ok(Params {
        size,
        cluster_bits,
        version,
        prealloc,
        lazy,
        refcount_order,
        extended,
        compression_type,
        backing,
        backing_fmt,
        data_file,
        data_raw,
    })
}

/// Entries and clusters of the L1 table for a disk of `size` bytes, within
/// QEMU's cap.
pub fn l1_table(g: &Geometry, size: u64) -> Result<(u64, u64)> {
    let l1_size = g.l1_entries_for(size).ok_or_else(|| invalid("size too large"))?;
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "size {size} needs an L1 table beyond QEMU's 32 MiB cap"
        )));
    }
    Ok((l1_size, (l1_size * 8).div_ceil(g.cluster_size).max(1)))
}

/// Clusters of refcount blocks and of refcount table that cover `fixed`
/// other clusters and themselves.
pub fn refcount_clusters(fixed: u64, cs: u64, refcount_order: u32) -> Result<(u64, u64)> {
    let epb = (cs * 8) >> refcount_order; // refcount entries per block
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let nb = (fixed + blocks + table).div_ceil(epb);
        let nt = (nb * 8).div_ceil(cs);
        if nb <= blocks && nt <= table {
            break;
        }
        blocks = nb.max(blocks);
        table = nt.max(table);
    }
    if table * cs > MAX_REFTABLE_BYTES {
        return Err(invalid(
            "image too large for its refcount table with these cluster/refcount sizes",
        ));
    }
    Ok((blocks, table))
}

pub fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let Params {
        size,
        cluster_bits,
        version,
        prealloc,
        lazy,
        refcount_order,
        extended,
        compression_type,
        backing,
        backing_fmt,
        data_file,
        data_raw,
    } = params(opts)?;
    let cluster_size = 1u64 << cluster_bits;
    let g = Geometry::new(cluster_bits, extended);
    let cs = cluster_size;
    let (l1_size, l1_clusters) = l1_table(&g, size)?;
    let prealloc_meta = prealloc != "off";
    let l2_tables = if prealloc_meta { l1_size } else { 0 };
    let guest_clusters = size.div_ceil(cs);
    let data_clusters = if prealloc_meta && data_file.is_none() {
        guest_clusters
    } else {
        0
    };
    let fixed = 1 + l1_clusters + l2_tables + data_clusters;
    let epb = (cs * 8) >> refcount_order; // refcount entries per block
    let (blocks, table) = refcount_clusters(fixed, cs, refcount_order)?;
    let total = fixed + blocks + table;
    let table_off = cs;
    let blocks_off = table_off + table * cs;
    let l1_off = blocks_off + blocks * cs;
    let l2_off = l1_off + l1_clusters * cs;
    let data_off = l2_off + l2_tables * cs;

    let mut incompatible = 0;
    let mut autoclear = 0;
    if extended {
        incompatible |= INCOMPAT_EXTL2;
    }
    if data_file.is_some() {
        incompatible |= INCOMPAT_DATA_FILE;
    }
    if compression_type != COMPRESSION_ZLIB {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if data_raw {
        autoclear |= AUTOCLEAR_DATA_FILE_RAW;
    }
    let hdr = NewHeader {
        version,
        cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: table_off,
        refcount_table_clusters: table as u32,
        incompatible,
        compatible: if lazy { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear,
        refcount_order,
        compression_type,
        backing_file: backing.as_deref(),
        backing_format: backing_fmt.as_deref(),
        data_file: data_file.as_deref(),
    };
    let first = hdr
        .serialize()
        .ok_or_else(|| invalid("header and names do not fit in one cluster"))?;

    let data = match &data_file {
        Some(name) => {
            let d = location.relative(name).create_storage()?;
            Some(d)
        }
        None => None,
    };
    let f = location.create_storage()?;
    let f = f.as_ref();
    f.set_len(total * cs)?;

    // Refcount table and blocks: clusters 0..total all have refcount 1.
    let mut buf = try_zeroed(cs as usize, "qcow2 metadata")?;
    let mut tbl = try_zeroed((table * cs) as usize, "refcount table")?;
    for b in 0..blocks {
        let o = blocks_off + b * cs;
        tbl[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&o.to_be_bytes());
    }
    f.write_at(&tbl, table_off)?;
    drop(tbl);
    for b in 0..blocks {
        buf.fill(0);
        let first_c = b * epb;
        for c in first_c..total.min(first_c + epb) {
            set_entry(&mut buf, (c - first_c) as usize, refcount_order, 1);
        }
        f.write_at(&buf, blocks_off + b * cs)?;
    }
    // L1 table.
    let mut l1 = try_zeroed((l1_clusters * cs) as usize, "L1 table")?;
    if prealloc_meta {
        for i in 0..l1_size {
            let e = (l2_off + i * cs) | COPIED;
            l1[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        }
    }
    f.write_at(&l1, l1_off)?;
    drop(l1);
    // Preallocated L2 tables: every guest cluster mapped, copied flag set.
    if prealloc_meta {
        let per = g.l2_entries();
        for t in 0..l2_tables {
            buf.fill(0);
            for k in 0..per {
                let idx = t * per + k;
                if idx >= guest_clusters {
                    break;
                }
                let host = if data_file.is_some() {
                    idx * cs
                } else {
                    data_off + idx * cs
                };
                // With extended L2 the subclusters stay unallocated (bitmap
                // 0), as QEMU leaves them: they read as zeroes, or from the
                // backing file, until written.
                let at = (k as usize) * 8 * g.words();
                buf[at..at + 8].copy_from_slice(&(host | COPIED).to_be_bytes());
            }
            f.write_at(&buf, l2_off + t * cs)?;
        }
    }
    let data_len = guest_clusters * cs;
    match (&data, prealloc.as_str()) {
        (None, "falloc") if data_len > 0 => f.allocate(data_off, data_len)?,
        (None, "full") => write_zero_buffers(f, data_off, data_len)?,
        (Some(d), p) => {
            match p {
                "falloc" if size > 0 => {
                    d.set_len(size)?;
                    d.allocate(0, size)?
                }
                "full" => write_zero_buffers(d.as_ref(), 0, size)?,
                _ => {}
            }
            d.set_len(size)?;
            d.flush()?;
        }
        _ => {}
    }
    f.write_at(&first, 0)?;
    f.flush().map_err(|e: Error| e.context("qcow2 create"))
}
