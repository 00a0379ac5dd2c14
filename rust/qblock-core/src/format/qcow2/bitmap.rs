//! Persistent dirty bitmaps (docs/interop/qcow2.txt: "Bitmaps extension",
//! "Bitmap directory"). We do not track writes in bitmaps. Before our first
//! write we set the `in_use` flag of every enabled (`auto`) bitmap, which
//! the spec defines as "may be inconsistent": QEMU then refuses to trust
//! it, while the image stays consistent (clearing the autoclear bit
//! instead would make QEMU ignore the whole directory and report its
//! clusters as leaked). Disabled bitmaps do not follow writes and stay as
//! they are; bitmap data clusters are never touched.

use super::header::BitmapsExt;
use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Result};
use crate::info::InfoValue;

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
/// Fixed part of a directory entry.
const ENTRY_HEADER: u64 = 24;

/// Offsets (within the directory) of the flags of each entry, checked.
pub fn entries(dir: &[u8], nb: u32) -> Result<Vec<(usize, u32)>> {
    let mut out = Vec::new();
    let mut p = 0u64;
    let len = dir.len() as u64;
    for i in 0..nb {
        if len - p < ENTRY_HEADER {
            return Err(corrupt(format!("bitmap directory entry {i} overruns the directory")));
        }
        let at = p as usize;
        let flags = be32(dir, at + 12);
        let name_size = u64::from(be16(dir, at + 18));
        let extra = u64::from(be32(dir, at + 20));
        let size = ENTRY_HEADER + extra + name_size;
        let padded = (size + 7) & !7;
        if padded > len - p {
            return Err(corrupt(format!(
                "bitmap directory entry {i} of {size} bytes overruns the directory"
            )));
        }
        out.push((at + 12, flags));
        p += padded;
    }
    Ok(out)
}

/// QEMU's limits on directory entries (qcow2-bitmap.c).
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME: u64 = 1023;
const TYPE_DIRTY_TRACKING: u8 = 1;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);

/// Check the directory as QEMU does when it loads bitmaps at open: entry
/// bounds, names, granularity, type, flags, and each bitmap table inside
/// the file; the entries must fill the directory exactly.
pub fn check(file: &dyn Storage, ext: &BitmapsExt, cs: u64, file_end: u64) -> Result<()> {
    let dir = read_dir(file, ext, cs, file_end)?;
    let mut used = 0u64;
    for (i, (at, flags)) in entries(&dir, ext.nb_bitmaps)?.into_iter().enumerate() {
        let e = at - 12;
        let t_off = be64(&dir, e);
        let t_size = u64::from(be32(&dir, e + 8));
        let name = u64::from(be16(&dir, e + 18));
        let extra = u64::from(be32(&dir, e + 20));
        if flags & RESERVED_FLAGS != 0 {
            return Err(corrupt(format!("bitmap {i} has reserved flags {flags:#x}")));
        }
        if dir[e + 16] != TYPE_DIRTY_TRACKING {
            return Err(corrupt(format!("bitmap {i} has unknown type {}", dir[e + 16])));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&dir[e + 17]) {
            return Err(corrupt(format!("bitmap {i} has granularity 2^{}", dir[e + 17])));
        }
        if name == 0 || name > MAX_NAME {
            return Err(corrupt(format!("bitmap {i} has a name of {name} bytes")));
        }
        if t_size > MAX_TABLE_ENTRIES {
            return Err(corrupt(format!("bitmap {i} has a table of {t_size} entries")));
        }
        if t_size > 0
            && (!t_off.is_multiple_of(cs) || t_off < cs || t_off.checked_add(t_size * 8).is_none_or(|x| x > file_end))
        {
            return Err(corrupt(format!("bitmap {i} table at {t_off:#x} is invalid")));
        }
        used += (ENTRY_HEADER + extra + name + 7) & !7;
    }
    if used != ext.directory_size {
        return Err(corrupt(format!(
            "bitmap directory of {} bytes holds {used} bytes of entries",
            ext.directory_size
        )));
    }
    Ok(())
}

fn read_dir(file: &dyn Storage, ext: &BitmapsExt, cs: u64, file_end: u64) -> Result<Vec<u8>> {
    let end = ext.directory_offset.checked_add(ext.directory_size);
    if ext.directory_offset < cs || end.is_none_or(|e| e > file_end) {
        return Err(corrupt("bitmap directory is outside the image file"));
    }
    let mut dir = try_zeroed(ext.directory_size as usize, "bitmap directory")?; // capped at 64 MiB
    file.read_at(&mut dir, ext.directory_offset)?;
    Ok(dir)
}

/// The bitmaps as `qemu-img info` lists them: flags, name, granularity.
pub fn info(file: &dyn Storage, ext: &BitmapsExt, cs: u64, file_end: u64) -> Result<InfoValue> {
    let dir = read_dir(file, ext, cs, file_end)?;
    let mut list = Vec::new();
    for (at, flags) in entries(&dir, ext.nb_bitmaps)? {
        let e = at - 12;
        let gran_bits = u32::from(dir[e + 17]);
        let name_size = usize::from(be16(&dir, e + 18));
        let extra = be32(&dir, e + 20) as usize; // entries() checked the sizes
        let name = String::from_utf8_lossy(&dir[e + 24 + extra..e + 24 + extra + name_size]).into_owned();
        if gran_bits > 63 {
            return Err(corrupt(format!(
                "bitmap '{name}' has a granularity of 2^{gran_bits} bytes"
            )));
        }
        let mut fl = Vec::new();
        if flags & FLAG_IN_USE != 0 {
            fl.push(InfoValue::from("in-use"));
        }
        if flags & FLAG_AUTO != 0 {
            fl.push(InfoValue::from("auto"));
        }
        list.push(InfoValue::Map(vec![
            ("flags".into(), InfoValue::List(fl)),
            ("name".into(), name.into()),
            ("granularity".into(), InfoValue::UInt(1u64 << gran_bits)),
        ]));
    }
    Ok(InfoValue::List(list))
}

pub fn mark_in_use(file: &dyn Storage, ext: &BitmapsExt, cs: u64, file_end: u64) -> Result<()> {
    let dir = read_dir(file, ext, cs, file_end)?;
    for (at, flags) in entries(&dir, ext.nb_bitmaps)? {
        if flags & FLAG_AUTO != 0 && flags & FLAG_IN_USE == 0 {
            file.write_at(&(flags | FLAG_IN_USE).to_be_bytes(), ext.directory_offset + at as u64)?;
        }
    }
    Ok(())
}
