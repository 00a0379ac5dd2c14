//! The table of formats: how to probe, open and create each one. Adding a
//! format means adding its module and one entry in `format::ENTRIES`.

use crate::backend::{Perm, Storage};
use crate::driver::Driver;
use crate::error::{unsupported, Result};
use crate::format;
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::reference::{RefKind, RefLog, RefRules, Unopened};
use std::sync::Arc;

/// Bytes read from the start of an image for probing (QEMU reads 2 KiB;
/// some of our probes look a little further).
pub const PROBE_HEAD: usize = 4096;

/// What a driver gets when it opens.
pub struct OpenCtx<'a> {
    /// Where the image is, for names recorded relative to it.
    pub location: &'a Location,
    pub read_only: bool,
    /// Bypass the host page cache (O_NOCACHE) for this image and the files
    /// it names (data files, extents).
    pub direct: bool,
    /// Opened to be checked (`qemu-img check`'s BDRV_O_CHECK): damage the
    /// driver would repair at open (a dirty qcow2's refcounts) is left for
    /// [`crate::driver::Driver::check`] to report and repair.
    pub check: bool,
    /// Take the images' locks sharing everything (`qemu-img -U`): read-only
    /// opens only.
    pub force_share: bool,
    /// Which files the image may name ([`RefRules::admit`]); the same for
    /// every layer of a chain.
    pub refs: &'a RefRules,
    /// Set by an inspecting open: names are noted here, nothing they name
    /// is opened (drivers get an [`Unopened`] file instead).
    pub inspect: Option<&'a RefLog>,
}

impl OpenCtx<'_> {
    /// Whether this open only inspects: files the image names are not opened.
    pub fn inspecting(&self) -> bool {
        self.inspect.is_some()
    }

    /// Check (or, inspecting, note) that the image may follow `name`, a
    /// `kind` reference that resolved to `loc`. Every file an image names
    /// passes here, or through `open_named`/`open_data_file`, which call it.
    pub fn admit(&self, kind: RefKind, name: &str, loc: &Location) -> Result<()> {
        match self.inspect {
            Some(log) => {
                log.note(kind, name, loc);
                Ok(())
            }
            None => self.refs.admit(kind, name, loc),
        }
    }

    /// Open a file this image names as part of it (a vmdk extent, a
    /// parallels bundle's image; `name` as recorded, `loc` resolved) the
    /// way the image itself was opened, and lock it as the image.
    pub fn open_named(&self, name: &str, loc: &Location, read_only: bool) -> Result<Arc<dyn Storage>> {
        self.admit(RefKind::Extent, name, loc)?;
        if self.inspecting() {
            return Ok(Arc::new(Unopened(name.to_string())));
        }
        let s = loc.open_storage_with(read_only, self.direct)?;
        s.lock(Perm::image(read_only, self.force_share))?;
        Ok(s)
    }

    /// Open a qcow2 external data file, locked as QEMU locks one.
    pub fn open_data_file(&self, name: &str, loc: &Location, read_only: bool) -> Result<Arc<dyn Storage>> {
        self.admit(RefKind::DataFile, name, loc)?;
        if self.inspecting() {
            return Ok(Arc::new(Unopened(name.to_string())));
        }
        let s = loc.open_storage_with(read_only, self.direct)?;
        s.lock(Perm::data_file(read_only, self.force_share))?;
        Ok(s)
    }
}

/// Score how likely `head` (the first bytes) and `storage` hold this format:
/// 0 = no, 100 = certain (a magic number), 1 = raw's fallback.
pub type ProbeFn = fn(head: &[u8], storage: &dyn Storage) -> u32;
pub type OpenFn = fn(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>>;
/// Create a new image. Generic options (`size`, `backing_file`) are already
/// resolved: a size of 0 with a backing file has become the backing's size.
pub type CreateFn = fn(location: &Location, opts: &mut CreateOptions) -> Result<()>;

pub struct FormatEntry {
    pub format: Format,
    pub probe: Option<ProbeFn>,
    pub open: Option<OpenFn>,
    pub create: Option<CreateFn>,
}

pub fn entry(f: Format) -> Option<&'static FormatEntry> {
    format::entries().find(|e| e.format == f)
}

pub fn open_fn(f: Format) -> Result<OpenFn> {
    entry(f)
        .and_then(|e| e.open)
        .ok_or_else(|| unsupported(format!("opening {f} images is not supported yet")))
}

pub fn create_fn(f: Format) -> Result<CreateFn> {
    entry(f)
        .and_then(|e| e.create)
        .ok_or_else(|| unsupported(format!("creating {f} images is not supported yet")))
}

/// Pick the format with the highest probe score; raw when nothing claims it.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut head = vec![0u8; PROBE_HEAD];
    let len = storage.len()?;
    storage.read_at(&mut head, 0)?;
    head.truncate(len.min(PROBE_HEAD as u64) as usize);
    let mut best = (0u32, Format::Raw);
    for e in format::entries() {
        if let Some(p) = e.probe {
            let score = p(&head, storage);
            if score > best.0 {
                best = (score, e.format);
            }
        }
    }
    Ok(best.1)
}
