//! `qemu-img amend` for qcow2: change the compatibility level, lazy
//! refcounts and the refcount width of an existing image in place
//! (docs/interop/qcow2.txt: "Header", "Host cluster management").
//!
//! Every option is checked before anything is written, so a refused
//! amend leaves the image as it was (QEMU applies the options one after
//! another and may stop half-way). The steps then run in QEMU's order:
//! upgrade to version 3, the refcount width, lazy refcounts, the virtual
//! size, downgrade to version 2.
//!
//! Crash order, step by step:
//! - Upgrade: a snapshot table needing version 3 extra data is written
//!   past the end of the file first; one header write then switches to
//!   version 3 with the dirty bit set and the new table named; the
//!   refcounts are recounted, which clears the dirty bit. A crash leaves
//!   the old version 2 image or a dirty version 3 one, which QEMU and we
//!   repair at the next writable open.
//! - Refcount width: [`super::repair::rebuild_with_order`] writes the new
//!   structure past the end of the file and flushes it before one header
//!   write names it with its width; the old structure stays valid until
//!   then and counts as free afterwards.
//! - Downgrade: the dirty bit is set first; zero clusters are expanded
//!   (data before the L2 tables naming it), the bitmaps extension is
//!   dropped, the refcounts recounted (clearing the dirty bit), and only
//!   then is the header rewritten as version 2.

mod first_cluster;
mod snapshots;
#[cfg(test)]
mod tests;
mod zeroes;

use super::header::{Header, OFF_AUTOCLEAR, OFF_COMPAT, OFF_INCOMPAT};
use super::repair::{check_width, rebuild_with_order};
use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Error, Result};
use crate::format_name::Format;
use crate::image::{Image, OpenOptions};
use crate::location::Location;
use crate::tools::Progress;
use first_cluster::NewFields;

/// The compatibility level (`compat=`): the header version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// `0.10` (or `v2`): version 2.
    V2,
    /// `1.1` (or `v3`): version 3.
    V3,
}

impl Compat {
    /// QEMU's names for the levels.
    pub fn parse(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" => Ok(Compat::V2),
            "1.1" | "v3" => Ok(Compat::V3),
            other => Err(invalid(format!("Unknown compatibility level {other}"))),
        }
    }

    fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// What to change; None leaves a property as it is. `backing_file` and
/// `backing_fmt` may only repeat what the image records (QEMU's rule:
/// rebase changes them). `data_file` and `data_file_raw` may only repeat
/// what the image has, or turn data-file-raw off.
#[derive(Debug, Clone, Default)]
pub struct AmendOptions {
    pub compat: Option<Compat>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: Option<bool>,
}

/// The image as read from its file, with its first cluster.
struct Opened {
    h: Header,
    first: Vec<u8>,
}

fn read_image(file: &dyn Storage) -> Result<Opened> {
    let len = file.len()?;
    let mut head = [0u8; V3_HEADER_LEN_FULL as usize];
    file.read_at(&mut head, 0)?;
    let mut h = Header::parse_fixed(&head, len)?;
    let mut first = try_zeroed(h.cluster_size() as usize, "qcow2 header cluster")?;
    file.read_at(&mut first, 0)?;
    h.parse_extensions(&first)?;
    h.validate(len)?;
    if h.version < 3 {
        // QEMU ignores a bitmaps extension in a version 2 image.
        h.bitmaps = None;
    }
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        // Without the autoclear bit the directory is stale: not counted.
        h.bitmaps = None;
    }
    Ok(Opened { h, first })
}

/// What the options amount to for this image, checked.
struct Plan {
    version: u32,
    refcount_order: u32,
    lazy: Option<bool>,
    clear_data_file_raw: bool,
}

fn plan(file: &dyn Storage, o: &Opened, opts: &AmendOptions) -> Result<Plan> {
    let h = &o.h;
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt("image is marked corrupt; it can only be opened read-only"));
    }
    let version = opts.compat.map_or(h.version, Compat::version);
    let mut refcount_order = h.refcount_order;
    if let Some(bits) = opts.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        refcount_order = bits.trailing_zeros();
    }
    if opts.data_file.is_some() && h.data_file.is_none() {
        return Err(invalid(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if let Some(d) = &opts.data_file {
        if Some(d) != h.data_file.as_ref() {
            return Err(unsupported(
                "changing the name of the external data file is not supported yet",
            ));
        }
    }
    let raw_now = h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0;
    if opts.data_file_raw == Some(true) && !raw_now {
        return Err(invalid("data-file-raw cannot be set on existing images"));
    }
    if refcount_order != h.refcount_order && version < 3 && refcount_order != 4 {
        return Err(invalid(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    let backing_differs = |given: &Option<String>, has: &Option<String>| given.is_some() && given != has;
    if backing_differs(&opts.backing_file, &h.backing_file) || backing_differs(&opts.backing_fmt, &h.backing_format) {
        return Err(invalid("Cannot amend the backing file (use rebase instead)"));
    }
    let lazy_now = h.compatible & COMPAT_LAZY_REFCOUNTS != 0;
    let lazy = opts.lazy_refcounts.filter(|&l| l != lazy_now);
    if lazy == Some(true) && version < 3 {
        return Err(invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ));
    }
    if let Some(s) = opts.size {
        if !s.is_multiple_of(512) {
            return Err(invalid(format!(
                "the new size {s} is not a multiple of 512 (qcow2 counts sectors)"
            )));
        }
    }
    if refcount_order < h.refcount_order {
        check_width(file, h, refcount_order)?;
    }
    if version < h.version {
        check_downgrade(file, h, refcount_order, opts.size.unwrap_or(h.size))?;
    }
    Ok(Plan {
        version,
        refcount_order,
        lazy,
        clear_data_file_raw: opts.data_file_raw == Some(false) && raw_now,
    })
}

/// QEMU's refusals for compat=0.10, in its order (qcow2_downgrade).
/// `size`: the virtual size the image will have by then.
fn check_downgrade(file: &dyn Storage, h: &Header, refcount_order: u32, size: u64) -> Result<()> {
    if refcount_order != 4 {
        return Err(unsupported("compat=0.10 requires refcount_bits=16"));
    }
    if h.data_file.is_some() {
        return Err(unsupported("Cannot downgrade an image with a data file"));
    }
    // A version 2 reader knows neither a snapshot's own disk size nor a
    // 64-bit VM state size.
    for e in snapshots::entries(file, h)? {
        if e.vm_state_size() > u64::from(u32::MAX) || e.disk_size(h.size) != size {
            return Err(unsupported("Internal snapshots prevent downgrade of image"));
        }
    }
    let incompatible = h.incompatible & !(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY);
    if incompatible != 0 {
        return Err(unsupported(format!(
            "Cannot downgrade an image with incompatible features 0x{incompatible:x} set"
        )));
    }
    // QEMU looks at the active layer only; a snapshot's compressed
    // clusters would become unreadable just the same, so we look at all.
    if h.incompatible & INCOMPAT_COMPRESSION != 0 && zeroes::has_compressed(file, h)? {
        return Err(unsupported(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }
    Ok(())
}

/// Write a new first cluster: only as many bytes as the old or the new
/// one uses (rounded to sectors), so a header that fits in one sector is
/// replaced by one sector write.
fn write_first(file: &dyn Storage, o: &Opened, new: &[u8]) -> Result<()> {
    let used = first_cluster::used_len(&o.first, &o.h).max(first_cluster::used_len(new, &reparse(new)?));
    let n = used.div_ceil(512).saturating_mul(512).min(new.len());
    file.write_at(&new[..n], 0)?;
    file.flush()
}

/// The header of a first cluster we just built (to measure it).
fn reparse(first: &[u8]) -> Result<Header> {
    let mut h = Header::parse_fixed(first, first.len() as u64)?;
    h.parse_extensions(first)?;
    Ok(h)
}

fn recount(file: &dyn Storage, h: &mut Header, order: u32) -> Result<()> {
    let (l1, n) = (h.l1_table_offset, u64::from(h.l1_size));
    rebuild_with_order(file, h, l1, n, order)
}

fn set_field(file: &dyn Storage, at: u64, v: u64) -> Result<()> {
    file.write_at(&v.to_be_bytes(), at)?;
    file.flush()
}

/// compat=1.1 on a version 2 image.
fn upgrade(file: &dyn Storage, o: &Opened) -> Result<()> {
    let cs = o.h.cluster_size();
    let entries = snapshots::entries(file, &o.h)?;
    let mut snapshots_offset = o.h.snapshots_offset;
    let update = snapshots::need_v3_update(&entries);
    if update {
        let mut table = snapshots::v3_table(&entries, o.h.size);
        table.resize(align_up(table.len() as u64, cs)? as usize, 0);
        snapshots_offset = align_up(file.len()?, cs)?;
        file.write_at(&table, snapshots_offset)?;
        file.flush()?;
    }
    let f = NewFields {
        version: 3,
        // The new snapshot table has no refcount yet: dirty until recounted.
        incompatible: if update { INCOMPAT_DIRTY } else { 0 },
        compatible: 0,
        autoclear: 0,
        compression_type: COMPRESSION_ZLIB,
        drop_bitmaps: true,
    };
    let mut new = first_cluster::rewrite(&o.first, &o.h, &f)?;
    new[64..72].copy_from_slice(&snapshots_offset.to_be_bytes());
    write_first(file, o, &new)?;
    if update {
        let mut h = read_image(file)?.h;
        let order = h.refcount_order;
        recount(file, &mut h, order)?;
    }
    Ok(())
}

/// compat=0.10 on a version 3 image (already checked by `check_downgrade`).
fn downgrade(file: &dyn Storage, progress: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<()> {
    let o = read_image(file)?;
    // From here until the recount, refcounts may be short: say so.
    set_field(file, OFF_INCOMPAT, o.h.incompatible | INCOMPAT_DIRTY)?;
    let o = read_image(file)?;
    let expanded = zeroes::expand(file, &o.h, o.h.backing_file.is_some(), progress);
    if let Err(e) = expanded {
        // Stopped half-way (cancelled, or an error): leave a clean version
        // 3 image, with some zero clusters expanded, if the file lets us.
        let mut h = o.h.clone();
        let order = h.refcount_order;
        return Err(match recount(file, &mut h, order) {
            Ok(()) => e,
            Err(r) => e.context(format!("and recounting the refcounts failed too ({r})")),
        });
    }
    // Version 3 still, without the bitmaps (a version 2 image cannot keep
    // them, and QEMU would report their clusters as leaked) and without
    // any feature bit but the dirty one.
    let f = NewFields {
        version: 3,
        incompatible: INCOMPAT_DIRTY,
        compatible: 0,
        autoclear: 0,
        compression_type: COMPRESSION_ZLIB,
        drop_bitmaps: true,
    };
    write_first(file, &o, &first_cluster::rewrite(&o.first, &o.h, &f)?)?;
    let mut h = read_image(file)?.h;
    recount(file, &mut h, 4)?;
    let o = read_image(file)?;
    let f = NewFields {
        version: 2,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        compression_type: COMPRESSION_ZLIB,
        drop_bitmaps: true,
    };
    write_first(file, &o, &first_cluster::rewrite(&o.first, &o.h, &f)?)
}

/// Steps of an amend, for progress: each step counts 100 units.
struct Steps<'a> {
    progress: &'a mut dyn Progress,
    done: u64,
    total: u64,
}

impl Steps<'_> {
    fn report(&mut self, within: u64, of: u64) -> Result<()> {
        let part = (within.min(of) * 100).checked_div(of).unwrap_or(100);
        let total = self.total.max(1) * 100;
        if self.progress.report((self.done * 100 + part).min(total), total) {
            Ok(())
        } else {
            Err(Error::Cancelled("stopped by the progress callback".into()))
        }
    }

    fn step_done(&mut self) -> Result<()> {
        self.done += 1;
        self.report(0, 1)
    }
}

/// Amend the qcow2 image at `location` in place (`qemu-img amend -f qcow2`).
/// Refusals happen before anything is written: `InvalidParam` for an
/// option value the image cannot take, `Unsupported` for a change QEMU
/// cannot make either (downgrading an image with a data file, ...).
pub fn amend(location: &Location, opts: &AmendOptions, progress: &mut dyn Progress) -> Result<()> {
    let file = location.open_storage(false)?;
    amend_in(file.as_ref(), location, opts, progress)
}

/// [`amend`] on the image in `file`, found at `location` (for a resize,
/// which opens the image with its backing chain).
fn amend_in(file: &dyn Storage, location: &Location, opts: &AmendOptions, progress: &mut dyn Progress) -> Result<()> {
    let mut o = read_image(file)?;
    let mut p = plan(file, &o, opts)?;
    if o.h.incompatible & INCOMPAT_DIRTY != 0 {
        // As a writable open does (QEMU's too): recount a dirty image
        // first, once the options are known to apply.
        let order = o.h.refcount_order;
        recount(file, &mut o.h, order).map_err(|e| e.context("cannot repair the refcounts of this dirty image"))?;
        o = read_image(file)?;
        p = plan(file, &o, opts)?;
    }
    let resize = opts.size.filter(|&s| s != o.h.size);
    let mut steps = Steps {
        progress,
        done: 0,
        total: u64::from(p.version > o.h.version)
            + u64::from(p.refcount_order != o.h.refcount_order)
            + u64::from(resize.is_some())
            + u64::from(p.version < o.h.version),
    };
    steps.report(0, 1)?;
    if p.version > o.h.version {
        upgrade(file, &o)?;
        o = read_image(file)?;
        steps.step_done()?;
    }
    if p.refcount_order != o.h.refcount_order {
        let mut h = o.h.clone();
        recount(file, &mut h, p.refcount_order)?;
        o = read_image(file)?;
        steps.step_done()?;
    }
    if p.clear_data_file_raw {
        set_field(file, OFF_AUTOCLEAR, o.h.autoclear & !AUTOCLEAR_DATA_FILE_RAW)?;
    }
    if let Some(lazy) = p.lazy {
        let c = o.h.compatible & !COMPAT_LAZY_REFCOUNTS;
        set_field(file, OFF_COMPAT, if lazy { c | COMPAT_LAZY_REFCOUNTS } else { c })?;
    }
    if let Some(size) = resize {
        let rw = OpenOptions::default();
        let img = Image::open(location, Some(Format::Qcow2), &rw)?;
        let r = img.truncate(size);
        let closed = img.close();
        r.and(closed)?;
        steps.step_done()?;
    }
    if p.version < o.h.version {
        downgrade(file, &mut |d, t| steps.report(d, t))?;
        steps.step_done()?;
    }
    file.flush()
}
