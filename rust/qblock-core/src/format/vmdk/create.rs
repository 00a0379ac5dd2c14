//! New vmdk images, laid out as QEMU's vmdk_co_do_create lays them out so
//! that both tools read them the same way: 64 KiB grains, 512-entry grain
//! tables all preallocated (zeroed, sparse in the host file), a redundant
//! grain directory before the primary one, the descriptor embedded at
//! sector 1 (20 sectors) for monolithicSparse or in its own file with
//! `-flat`/`-sNNN`/`-fNNN` extent files beside it. streamOptimized is
//! QEMU's too: monolithicSparse's layout with compressed grains (version
//! 3, compress and marker flags), grains appended as they are written.

use super::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, SECTOR,
};
use crate::backend::Storage;
use crate::error::{invalid, unsupported, Result};
use crate::format_name::Format;
use crate::image::{Image, OpenOptions};
use crate::info::InfoValue;
use crate::location::Location;
use crate::options::CreateOptions;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;

/// Grain size of new images (sectors), as QEMU and VMware.
const GRAIN_SECTORS: u64 = 128;
const GTES_PER_GT: u64 = 512;
/// Embedded descriptor: sectors 1..21.
const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// twoGbMaxExtent* extents hold 2 GiB each (QEMU's constant split size).
const SPLIT_SIZE: u64 = 0x8000_0000;
/// Grain directory entries are 32-bit sectors: metadata must end below 2 TiB.
const MAX_META_SECTORS: u64 = 1 << 32;

/// A random 32-bit content ID (CID), as QEMU's g_random_int().
pub fn random_cid() -> u32 {
    let mut h = RandomState::new().build_hasher();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(t);
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// Write an empty sparse extent of `size` bytes into `s`; returns the
/// header written.
/// `compressed`: a streamOptimized extent in QEMU's layout (tables first,
/// compressed grains with markers appended), header version 3.
pub fn init_sparse(s: &dyn Storage, size: u64, zeroed_grain: bool, compressed: bool) -> Result<SparseHeader> {
    let capacity = size / SECTOR;
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let gt_sectors = (GTES_PER_GT * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(GTES_PER_GT);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd_offset = DESC_OFFSET + DESC_SECTORS;
    let gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count;
    let grain_offset = (gd_offset + gd_sectors + gt_sectors * gt_count).next_multiple_of(GRAIN_SECTORS);
    if grain_offset >= MAX_META_SECTORS {
        return Err(invalid(format!(
            "a VMDK extent of {size} bytes is too large (its metadata passes 2 TiB)"
        )));
    }
    let h = SparseHeader {
        version: match (compressed, zeroed_grain) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        },
        flags: FLAG_RGD
            | FLAG_NL_DETECT
            | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 }
            | if compressed { FLAG_COMPRESS | FLAG_MARKER } else { 0 },
        capacity,
        granularity: GRAIN_SECTORS,
        desc_offset: DESC_OFFSET,
        desc_size: DESC_SECTORS,
        gtes_per_gt: GTES_PER_GT as u32,
        rgd_offset,
        gd_offset,
        grain_offset,
        compress: if compressed { COMPRESSION_DEFLATE } else { 0 },
    };
    s.write_at(&h.serialize(), 0)?;
    s.set_len(grain_offset * SECTOR)?;
    // Both directories point at their (zeroed) tables, which follow them.
    for dir in [rgd_offset, gd_offset] {
        let mut gd = crate::error::try_zeroed((gd_sectors * SECTOR) as usize, "the grain directory")?;
        for i in 0..gt_count {
            let t = (dir + gd_sectors + i * gt_sectors) as u32;
            gd[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&t.to_le_bytes());
        }
        s.write_at(&gd, dir * SECTOR)?;
    }
    Ok(h)
}

/// The disk database lines of a new descriptor.
pub struct Ddb<'a> {
    pub hw: &'a str,
    pub adapter: &'a str,
    pub toolsversion: &'a str,
}

impl Ddb<'_> {
    /// A new descriptor's text, as QEMU writes it: a fresh CID, the parent
    /// link, the extent `lines`, the disk database.
    pub fn descriptor(&self, create_type: &str, parent_cid: u32, parent_line: &str, lines: &str, size: u64) -> String {
        let heads: u64 = if self.adapter == "ide" { 16 } else { 255 };
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={parent_cid:x}\ncreateType=\"{create_type}\"\n{parent_line}\n\
             # Extent description\n{lines}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{heads}\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            random_cid(),
            self.hw,
            size / (63 * heads * SECTOR),
            self.adapter,
            self.toolsversion,
        )
    }
}

/// The virtual hardware version the options ask for (QEMU's rules).
pub fn hw_version(compat6: bool, hwversion: Option<String>) -> Result<String> {
    match (compat6, hwversion) {
        (true, Some(_)) => Err(invalid("compat6 cannot be combined with hwversion")),
        (true, None) => Ok("6".to_string()),
        (false, Some(h)) => Ok(h),
        (false, None) => Ok("4".to_string()),
    }
}

pub fn check_adapter(adapter: &str) -> Result<()> {
    if !matches!(adapter, "ide" | "lsilogic" | "buslogic" | "legacyESX") {
        return Err(invalid(format!("unknown vmdk adapter_type '{adapter}'")));
    }
    Ok(())
}

/// Strings that land in the descriptor, most inside quotes: one with a
/// quote or a line break could add lines (an extent naming any file).
pub fn check_descriptor_strings(strings: &[(&str, Option<&str>)]) -> Result<()> {
    for (what, v) in strings {
        if let Some(v) = v {
            if v.chars().any(|c| matches!(c, '"' | '\n' | '\r' | '\0')) {
                return Err(invalid(format!(
                    "the vmdk {what} may not contain quotes or line breaks: {v:?}"
                )));
            }
        }
    }
    Ok(())
}

pub fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0).next_multiple_of(SECTOR);
    let backing = opts.take_str("backing_file")?.filter(|b| !b.is_empty());
    let backing_fmt = opts.take_str("backing_fmt")?;
    let compat6 = opts.take_bool("compat6")?.unwrap_or(false);
    let subformat = opts.take_str("subformat")?.unwrap_or_else(|| "monolithicSparse".into());
    let adapter = opts.take_str("adapter_type")?.unwrap_or_else(|| "ide".into());
    let zeroed_grain = opts.take_bool("zeroed_grain")?.unwrap_or(false);
    let hwversion = opts.take_str("hwversion")?;
    let toolsversion = opts.take_str("toolsversion")?.unwrap_or_else(|| "2147483647".into());
    opts.finish("vmdk")?;

    if let Some(f) = &backing_fmt {
        if f != "vmdk" {
            return Err(invalid(format!("a vmdk backing file must be a vmdk image, not {f}")));
        }
    }
    let (flat, split) = match subformat.as_str() {
        "monolithicSparse" | "streamOptimized" => (false, false),
        "monolithicFlat" => (true, false),
        "twoGbMaxExtentSparse" => (false, true),
        "twoGbMaxExtentFlat" => (true, true),
        s => return Err(invalid(format!("unknown vmdk subformat '{s}'"))),
    };
    let compressed = subformat == "streamOptimized";
    check_adapter(&adapter)?;
    let hw = hw_version(compat6, hwversion)?;
    if flat && backing.is_some() {
        return Err(invalid(format!("a {subformat} vmdk cannot have a backing file")));
    }
    if flat && zeroed_grain {
        return Err(invalid(format!("a {subformat} vmdk cannot use zeroed_grain")));
    }
    let Location::File(path) = location else {
        return Err(unsupported("vmdk images can only be created on local files"));
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_descriptor_strings(&[
        ("file name", Some(base.as_str())),
        ("backing_file", backing.as_deref()),
        ("hwversion", Some(hw.as_str())),
        ("toolsversion", Some(toolsversion.as_str())),
    ])?;
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => (base[..i].to_string(), base[i..].to_string()),
        None => (base.clone(), String::new()),
    };

    let (parent_cid, parent_line) = match &backing {
        None => (0xffff_ffffu32, String::new()),
        Some(b) => {
            let ro = OpenOptions {
                read_only: true,
                no_backing: true,
                ..Default::default()
            };
            let img = Image::open(&location.relative(b), None, &ro)
                .map_err(|e| e.context(format!("cannot open backing file '{b}'")))?;
            if img.format() != Format::Vmdk {
                return Err(invalid(format!(
                    "invalid backing file format: {}. Must be vmdk",
                    img.format()
                )));
            }
            let cid = img
                .info()?
                .format_specific
                .iter()
                .find_map(|(k, v)| match (k.as_str(), v) {
                    ("cid", InfoValue::UInt(c)) => Some(*c as u32),
                    _ => None,
                });
            (cid.unwrap_or(0), format!("parentFileNameHint=\"{b}\"\n"))
        }
    };

    // Plan the extents and the descriptor first, so that nothing is
    // created when the descriptor cannot be written.
    let line = |sz: u64, name: &str| {
        if flat {
            format!("RW {} FLAT \"{name}\" 0\n", sz.div_ceil(SECTOR))
        } else {
            format!("RW {} SPARSE \"{name}\"\n", sz.div_ceil(SECTOR))
        }
    };
    let mut extents: Vec<(String, u64)> = Vec::new();
    if !flat && !split {
        extents.push((base.clone(), size));
    } else {
        let mut planned = 0u64;
        while planned < size {
            let cur = if split { (size - planned).min(SPLIT_SIZE) } else { size };
            let idx = extents.len() + 1;
            let name = if split {
                format!("{prefix}-{}{idx:03}{postfix}", if flat { 'f' } else { 's' })
            } else {
                format!("{prefix}-flat{postfix}")
            };
            extents.push((name, cur));
            planned += cur;
        }
    }
    let lines: String = extents.iter().map(|(n, sz)| line(*sz, n)).collect();
    let desc = Ddb {
        hw: &hw,
        adapter: &adapter,
        toolsversion: &toolsversion,
    }
    .descriptor(&subformat, parent_cid, &parent_line, &lines, size);
    let embedded = !flat && !split;
    if embedded && desc.len() as u64 > DESC_SECTORS * SECTOR {
        return Err(invalid(
            "the vmdk descriptor is longer than its 10 KiB slot (a very long backing file name?)",
        ));
    }

    let main = location.create_storage()?;
    if embedded {
        init_sparse(main.as_ref(), size, zeroed_grain, compressed)?;
        main.write_at(desc.as_bytes(), DESC_OFFSET * SECTOR)?;
    } else {
        for (name, cur) in &extents {
            let s = Location::file(dir.join(name)).create_storage()?;
            if flat {
                s.set_len(*cur)?;
            } else {
                init_sparse(s.as_ref(), *cur, zeroed_grain, false)?;
            }
            s.flush()?;
        }
        // The descriptor last: it names only extents that exist.
        main.write_at(desc.as_bytes(), 0)?;
        main.set_len(desc.len() as u64)?;
    }
    main.flush()
}
