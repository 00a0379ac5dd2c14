//! vmdk (VMware virtual disks), per VMware's "Virtual Disk Format 1.1"
//! specification, with QEMU's block/vmdk.c as the reference for behaviour.
//!
//! - `header`: the hosted sparse extent header ("KDMV"), the
//!   stream-optimized footer, the VMFS sparse ("COWD") header; checks.
//! - `descriptor`: the text descriptor (embedded or a separate file).
//! - `sparse`: one KDMV or COWD extent: grain directory and tables (a
//!   bounded cache), compressed grains, grain and table allocation.
//! - `sesparse`: ESXi SESPARSE extents (read-only).
//! - `create`: new images, laid out as QEMU lays them out.
//!
//! Supported: monolithicSparse (embedded descriptor), monolithicFlat,
//! twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs, vmfsSparse and seSparse
//! descriptors whose extents are SPARSE (KDMV), VMFSSPARSE (COWD),
//! SESPARSE (read-only), FLAT, VMFS or ZERO, in any mix, with RW or RDONLY
//! access; bare COWD extents; streamOptimized (compressed grains with
//! markers, the grain directory found through the footer or the header);
//! zeroed-grain entries (read, and written by whole-grain zero writes); the
//! parent link (parentFileNameHint, format vmdk). Writes: in place in flat
//! extents, grain (and, where missing, grain table) allocation in sparse
//! extents; whole-grain writes to streamOptimized images laid out as QEMU
//! creates them, each grain once (as QEMU), compressed; the CID changes on
//! the first write of each open, as QEMU. Create: the four
//! monolithic/twoGb subformats and streamOptimized, with compat6,
//! hwversion, toolsversion, adapter_type, zeroed_grain and a vmdk backing
//! file.
//!
//! Differences from QEMU, deliberate: ZERO extents read as zeroes (QEMU
//! skips their lines, shifting the extents after them), RDONLY extents are
//! served read-only (QEMU skips them), NOACCESS extents and unknown extent
//! types are refused (QEMU skips them); a descriptor without CID opens
//! (QEMU refuses it); a monolithicSparse image of size 0 opens as an empty
//! disk (QEMU refuses it). Not supported: writing SESPARSE extents,
//! partial grains or a grain twice in a streamOptimized image, or one
//! written as a stream (its tables at its end), which is read-only.
//!
//! Parent link: at open the parent's CID is compared with parentCID, as
//! QEMU does on first use; when they differ, reading unallocated ranges and
//! copying from the parent are refused (QEMU: EINVAL), block status is not.
//! Ours is checked even when the backing file is not opened (no_backing).
//!
//! Reading never takes a mutex: `map` finds the extent by binary search and
//! takes the grain-table cache's read lock; grain directories are atomics.

mod create;
mod descriptor;
mod header;
mod sesparse;
mod sparse;
pub mod stream;

use crate::backend::Storage;
use crate::driver::{BackingRef, Below, CheckReport, Driver, DriverInfo, HostFile, Mapped, Mapping, Repair};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::info::InfoValue;
use crate::location::Location;
use crate::reference::RefKind;
use crate::registry::{FormatEntry, OpenCtx};
use descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR};
use header::{SparseHeader, MAGIC, MAGIC_COWD, SECTOR};
use sesparse::SeSparseExtent;
use sparse::SparseExtent;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Vmdk,
    probe: Some(probe),
    open: Some(open),
    create: Some(create::create),
};

/// QEMU's probe: a sparse extent magic, or a text whose first line that is
/// not a comment or blank is `version=1|2|3`.
fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.starts_with(MAGIC) || h.starts_with(MAGIC_COWD) {
        return 100;
    }
    let mut p = 0usize;
    while p < h.len() {
        match h[p] {
            b'#' => {
                while p < h.len() && h[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' | b'\r' | b'\n' => {
                while p < h.len() && h[p] == b' ' {
                    p += 1;
                }
                if p < h.len() && h[p] == b'\r' {
                    p += 1;
                }
                if p >= h.len() || h[p] != b'\n' {
                    return 0;
                }
                p += 1;
            }
            _ => {
                let rest = &h[p..];
                for v in [b'1', b'2', b'3'] {
                    let line = [b'v', b'e', b'r', b's', b'i', b'o', b'n', b'=', v];
                    if rest.starts_with(&line) && (rest[9..].starts_with(b"\n") || rest[9..].starts_with(b"\r\n")) {
                        return 100;
                    }
                }
                return 0;
            }
        }
    }
    0
}

enum Kind {
    Flat { file: HostFile, start: u64 },
    Zero,
    Sparse(Box<SparseExtent>),
    SeSparse(Box<SeSparseExtent>),
}

struct Extent {
    /// First guest byte.
    start: u64,
    len: u64,
    read_only: bool,
    kind: Kind,
    type_name: &'static str,
}

pub struct Vmdk {
    /// Host file 0 is the image (descriptor) file; extents' files follow.
    files: Vec<Arc<dyn Storage>>,
    extents: Vec<Extent>,
    size: u64,
    create_type: String,
    cid: AtomicU32,
    parent_cid: u32,
    parent: Option<String>,
    read_only: bool,
    /// Where the descriptor text is: host file, offset, most bytes.
    desc_at: (HostFile, u64, u64),
    /// The CID changes on the first write of each open, as QEMU does, so
    /// that images made over this one see that it changed.
    cid_updated: AtomicBool,
    /// The parent's CID matched parentCID at open (or there is no parent).
    /// QEMU refuses to read or copy from a parent that changed since this
    /// image was made (its data may no longer be what the image builds on).
    parent_ok: bool,
}

/// The createType values a descriptor naming its extents may have (QEMU's
/// list); monolithicSparse and streamOptimized descriptors live inside
/// their one extent.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// Read a descriptor of at most `max` bytes from `at`.
fn read_text(s: &dyn Storage, at: u64, max: u64) -> Result<Vec<u8>> {
    let len = s.len()?;
    let n = len.saturating_sub(at).min(max).min(MAX_DESCRIPTOR as u64) as usize;
    let mut buf = try_zeroed(n, "the VMDK descriptor")?;
    s.read_at(&mut buf, at)?;
    Ok(buf)
}

fn open(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let mut d = open_vmdk(storage, ctx)?;
    if let Some(p) = d.parent.as_deref().filter(|_| !ctx.inspecting()) {
        // Checked here because the chain opens the parent right after us;
        // the open's rules come first, as reading its CID opens it.
        let loc = ctx.location.relative(p);
        ctx.admit(RefKind::Backing, p, &loc)?;
        check_openable(&loc, p)?;
        d.parent_ok = parent_cid(&loc).is_none_or(|c| c == Some(d.parent_cid));
    }
    Ok(d)
}

/// A name from an image may point anywhere: opening a FIFO would block
/// forever and a character device never ends, so only regular files and
/// block devices are opened.
fn check_openable(loc: &Location, name: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Location::File(p) = loc {
        if let Ok(m) = std::fs::metadata(p) {
            let t = m.file_type();
            if t.is_fifo() || t.is_socket() || t.is_char_device() {
                return Err(corrupt(format!("'{name}' is not a regular file or a block device")));
            }
        }
    }
    Ok(())
}

/// The CID of the parent at `loc`, as QEMU's vmdk_read_cid finds it: None
/// when the parent cannot be opened (the chain's open reports that),
/// Some(None) when it has no CID (not a vmdk: QEMU calls the link invalid).
fn parent_cid(loc: &Location) -> Option<Option<u32>> {
    check_openable(loc, "parent").ok()?;
    let s = loc.open_storage(true).ok()?;
    let mut head = [0u8; 512];
    s.read_at(&mut head, 0).ok()?;
    let text = if head.starts_with(MAGIC) {
        let h = SparseHeader::parse(&head).ok()?;
        read_text(
            s.as_ref(),
            h.desc_offset.saturating_mul(SECTOR),
            h.desc_size.saturating_mul(SECTOR),
        )
        .ok()?
    } else if head.starts_with(MAGIC_COWD) {
        return Some(None);
    } else {
        read_text(s.as_ref(), 0, MAX_DESCRIPTOR as u64).ok()?
    };
    Some(Descriptor::parse_embedded(&text).ok().and_then(|d| d.cid))
}

fn open_vmdk(storage: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<Vmdk>> {
    let len = storage.len()?;
    if len < 4 {
        return Err(corrupt("file is too small to be a VMDK image"));
    }
    let mut head = vec![0u8; 512];
    storage.read_at(&mut head, 0)?;
    let writable = !ctx.read_only;
    if head.starts_with(MAGIC_COWD) {
        // A bare VMFS sparse extent (QEMU's vmdk_open_vmfs_sparse).
        let ext = SparseExtent::open(0, storage.clone(), &head, writable)?;
        return Ok(Box::new(monolithic(
            storage,
            ext,
            "vmfsSparse",
            Descriptor::default(),
            (0, 0, 0),
            ctx,
        )));
    }
    if head.starts_with(MAGIC) {
        if len < 512 {
            return Err(corrupt("file is too small for a VMDK sparse header"));
        }
        let h = SparseHeader::parse(&head)?;
        let desc = if h.desc_offset != 0 {
            let at = h
                .desc_offset
                .checked_mul(SECTOR)
                .ok_or_else(|| corrupt("descriptor offset overflows"))?;
            let size = h.desc_size.saturating_mul(SECTOR);
            let text = read_text(storage.as_ref(), at, size)?;
            let embedded = Descriptor::parse_embedded(&text)?;
            let ct = embedded.create_type.as_deref().unwrap_or("");
            if h.capacity == 0 && DESCRIPTOR_TYPES.contains(&ct) {
                // A descriptor inside a sparse header of no capacity: the
                // descriptor names the extents (QEMU's vmdk_open_vmdk4).
                // A monolithicSparse one of no capacity is an empty disk
                // (QEMU cannot open the ones it creates with size 0).
                return open_descriptor(storage, Descriptor::parse(&text)?, ctx, (at, size));
            }
            embedded
        } else {
            Descriptor::default()
        };
        let ext = SparseExtent::open(0, storage.clone(), &head, writable)?;
        let ct = if ext.layout.compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let desc_at = (
            0,
            h.desc_offset.saturating_mul(SECTOR),
            h.desc_size.saturating_mul(SECTOR),
        );
        return Ok(Box::new(monolithic(storage, ext, ct, desc, desc_at, ctx)));
    }
    let desc = Descriptor::parse(&read_text(storage.as_ref(), 0, MAX_DESCRIPTOR as u64)?)?;
    open_descriptor(storage, desc, ctx, (0, MAX_DESCRIPTOR as u64))
}

/// A disk that is one sparse extent in the image file itself.
fn monolithic(
    storage: Arc<dyn Storage>,
    ext: SparseExtent,
    create_type: &str,
    desc: Descriptor,
    desc_at: (HostFile, u64, u64),
    ctx: &OpenCtx,
) -> Vmdk {
    let size = ext.layout.capacity;
    // No extent line names it: QEMU reports an empty extent format.
    let extent = Extent {
        start: 0,
        len: size,
        read_only: false,
        kind: Kind::Sparse(Box::new(ext)),
        type_name: "",
    };
    Vmdk {
        files: vec![storage],
        extents: vec![extent],
        size,
        create_type: create_type.to_string(),
        cid: AtomicU32::new(desc.cid.unwrap_or(0)),
        parent_cid: desc.parent_cid.unwrap_or(0),
        parent: desc.parent_hint,
        read_only: ctx.read_only,
        desc_at,
        cid_updated: AtomicBool::new(false),
        parent_ok: true,
    }
}

/// Open the extents a descriptor names, relative to the image's directory.
fn open_descriptor(
    storage: Arc<dyn Storage>,
    desc: Descriptor,
    ctx: &OpenCtx,
    (desc_off, desc_max): (u64, u64),
) -> Result<Box<Vmdk>> {
    let ct = desc
        .create_type
        .clone()
        .ok_or_else(|| corrupt("invalid VMDK image descriptor (no createType)"))?;
    if !DESCRIPTOR_TYPES.contains(&ct.as_str()) {
        return Err(unsupported(format!(
            "VMDK image type '{ct}' is not supported in a descriptor file"
        )));
    }
    if desc.extents.is_empty() {
        return Err(corrupt("VMDK descriptor names no extents"));
    }
    let mut files: Vec<Arc<dyn Storage>> = vec![storage];
    // Extent files by identity (canonical path): (identity, read-only, file,
    // holds a sparse extent). Flat extents may share a file (at different
    // offsets); a sparse extent's file is its alone, or two allocators
    // would hand out the same grains. No extent may be the descriptor.
    let own = ctx.location.identity();
    let mut opened: Vec<(String, bool, HostFile, bool)> = Vec::new();
    let mut extents = Vec::with_capacity(desc.extents.len());
    let mut pos = 0u64;
    for e in &desc.extents {
        let read_only = ctx.read_only || e.access == Access::ReadOnly;
        let sparse = !matches!(e.kind, ExtentType::Flat | ExtentType::Vmfs | ExtentType::Zero);
        let mut file_of = |name: &str| -> Result<HostFile> {
            let loc: Location = ctx.location.relative(name);
            let id = loc.identity();
            if id == own {
                return Err(corrupt(format!("extent '{name}' is the descriptor file itself")));
            }
            if opened.iter().any(|(i, _, _, s)| *i == id && (*s || sparse)) {
                return Err(corrupt(format!(
                    "extent file '{name}' is shared by a sparse extent and another extent"
                )));
            }
            if let Some((_, _, f, _)) = opened.iter().find(|(i, ro, _, _)| *i == id && *ro == read_only) {
                return Ok(*f);
            }
            // The open's rules before anything else looks at the file.
            ctx.admit(RefKind::Extent, name, &loc)?;
            if !ctx.inspecting() {
                check_openable(&loc, name)?;
            }
            let s = ctx
                .open_named(name, &loc, read_only)
                .map_err(|err| err.context(format!("cannot open extent '{name}'")))?;
            files.push(s);
            let f = (files.len() - 1) as HostFile;
            opened.push((id, read_only, f, sparse));
            Ok(f)
        };
        let mut len = e
            .sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| corrupt("extent size overflows"))?;
        let kind = match e.kind {
            ExtentType::Zero => Kind::Zero,
            ExtentType::Flat | ExtentType::Vmfs => {
                let f = file_of(e.filename.as_deref().unwrap_or_default())?;
                let start = e
                    .offset
                    .checked_mul(SECTOR)
                    .ok_or_else(|| corrupt("flat extent offset overflows"))?;
                start
                    .checked_add(len)
                    .ok_or_else(|| corrupt("flat extent end overflows"))?;
                Kind::Flat { file: f, start }
            }
            ExtentType::Sparse | ExtentType::VmfsSparse | ExtentType::SeSparse if ctx.inspecting() => {
                // Inspecting opens no extent: its line's size stands.
                file_of(e.filename.as_deref().unwrap_or_default())?;
                Kind::Zero
            }
            ExtentType::Sparse | ExtentType::VmfsSparse => {
                let f = file_of(e.filename.as_deref().unwrap_or_default())?;
                let s = files[f as usize].clone();
                let mut head = vec![0u8; 512];
                s.read_at(&mut head, 0)?;
                if s.len()? < 512 || !(head.starts_with(MAGIC) || head.starts_with(MAGIC_COWD)) {
                    return Err(corrupt(format!(
                        "extent '{}' is not a VMDK sparse extent",
                        e.filename.as_deref().unwrap_or("")
                    )));
                }
                if head.starts_with(MAGIC) {
                    let h = SparseHeader::parse(&head)?;
                    if h.capacity == 0 && h.desc_offset != 0 {
                        return Err(corrupt("a sparse extent holds another descriptor (nested descriptors)"));
                    }
                }
                let ext = SparseExtent::open(f, s, &head, !read_only)?;
                // The extent's own capacity counts, not the line's (QEMU).
                len = ext.layout.capacity;
                Kind::Sparse(Box::new(ext))
            }
            ExtentType::SeSparse => {
                let f = file_of(e.filename.as_deref().unwrap_or_default())?;
                let ext = SeSparseExtent::open(f, files[f as usize].clone(), !read_only)?;
                len = ext.capacity;
                Kind::SeSparse(Box::new(ext))
            }
        };
        if len == 0 {
            continue;
        }
        extents.push(Extent {
            start: pos,
            len,
            read_only,
            kind,
            type_name: e.kind.name(),
        });
        pos = pos
            .checked_add(len)
            .ok_or_else(|| corrupt("VMDK virtual size overflows"))?;
    }
    if extents.is_empty() {
        return Err(corrupt("VMDK descriptor names no extent with data"));
    }
    Ok(Box::new(Vmdk {
        files,
        extents,
        size: pos,
        create_type: ct,
        cid: AtomicU32::new(desc.cid.unwrap_or(0)),
        parent_cid: desc.parent_cid.unwrap_or(0),
        parent: desc.parent_hint,
        read_only: ctx.read_only,
        desc_at: (0, desc_off, desc_max),
        cid_updated: AtomicBool::new(false),
        parent_ok: true,
    }))
}

impl Vmdk {
    /// Give the descriptor a new random CID of the same number of hex
    /// digits, in place: one write of a few bytes, the text's length and
    /// every other line unchanged.
    fn update_cid(&self) -> Result<()> {
        let (file, at, max) = self.desc_at;
        let s = &self.files[file as usize];
        let raw = read_text(s.as_ref(), at, max)?;
        let text = descriptor::text(&raw);
        let mut pos = 0usize;
        for line in text.split(|&c| c == b'\n') {
            let lead = line.iter().take_while(|c| c.is_ascii_whitespace()).count();
            if line[lead..].starts_with(b"CID=") {
                let start = lead + 4;
                let digits = line[start..]
                    .iter()
                    .take_while(|c| c.is_ascii_hexdigit())
                    .count()
                    .min(8);
                if digits == 0 {
                    return Ok(());
                }
                let mask = if digits == 8 {
                    u32::MAX
                } else {
                    (1u32 << (4 * digits)) - 1
                };
                let cid = create::random_cid() & mask;
                let new = format!("{cid:0digits$x}");
                s.write_at(new.as_bytes(), at + (pos + start) as u64)?;
                self.cid.store(cid, Ordering::Relaxed);
                return Ok(());
            }
            pos += line.len() + 1;
        }
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        if self.read_only {
            return Err(invalid("the VMDK image is open read-only"));
        }
        Ok(())
    }

    /// After a write that changed the disk: a new CID, the first time in
    /// this open (as QEMU, after the data; a refused write changes nothing).
    fn after_write(&self) -> Result<()> {
        if !self.cid_updated.swap(true, Ordering::AcqRel) {
            self.update_cid()?;
        }
        Ok(())
    }

    /// The one writable compressed extent of a streamOptimized image that
    /// grains can be appended to (its tables first, as QEMU lays them out).
    fn compressed_extent(&self) -> Option<&SparseExtent> {
        match &self.extents[..] {
            [Extent {
                kind: Kind::Sparse(s),
                read_only: false,
                ..
            }] if s.layout.compressed && s.appendable() && !self.read_only => Some(s),
            _ => None,
        }
    }

    fn extent_at(&self, offset: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents
            .get(i)
            .ok_or_else(|| corrupt(format!("no VMDK extent holds offset {offset}")))
    }
}

fn parent_changed() -> crate::error::Error {
    corrupt("the parent image changed since this one was made (its CID is not this image's parentCID)")
}

/// What lies below an image whose parent changed: copying from it is
/// refused, as QEMU refuses it.
struct ChangedParent<'a>(&'a dyn Below);

impl Below for ChangedParent<'_> {
    fn read_below(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(parent_changed())
    }
    fn has_backing(&self) -> bool {
        self.0.has_backing()
    }
}

impl Drop for Vmdk {
    /// Best effort for images dropped without flush or close: the grain
    /// table entries of completed writes reach the file.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        for e in &self.extents {
            if let (Kind::Sparse(s), false) = (&e.kind, e.read_only) {
                let _ = s.flush_tables();
            }
        }
    }
}

impl Driver for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn backing(&self) -> Option<BackingRef> {
        self.parent.as_ref().map(|p| BackingRef {
            filename: p.clone(),
            format: Some("vmdk".into()),
        })
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let m = self.map_status(offset, len)?;
        if m.kind == Mapped::Unallocated && !self.parent_ok {
            return Err(parent_changed());
        }
        Ok(m)
    }
    /// Block status does not check the parent's CID (QEMU's neither).
    fn map_status(&self, offset: u64, len: u64) -> Result<Mapping> {
        let e = self.extent_at(offset)?;
        let rel = offset - e.start;
        let len = len.min(e.len - rel);
        let (kind, len) = match &e.kind {
            Kind::Flat { file, start } => (
                Mapped::Data {
                    file: *file,
                    offset: start + rel,
                },
                len,
            ),
            Kind::Zero => (Mapped::Zero { host: None }, len),
            Kind::Sparse(s) => s.map(rel, len)?,
            Kind::SeSparse(s) => s.map(rel, len)?,
        };
        Ok(Mapping { kind, len })
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        self.files.get(file as usize).map(|s| s.as_ref())
    }
    /// `qemu-img check` for vmdk, as QEMU's: every run of the disk must map
    /// inside its extent file; the first that does not fails the check (QEMU
    /// stops there too). QEMU repairs nothing and refuses `-r` as "does not
    /// support checks"; so do we.
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None {
            return Err(unsupported(
                "This image format does not support checks (vmdk cannot be repaired)",
            ));
        }
        let mut pos = 0u64;
        while pos < self.size {
            let m = self.map_status(pos, self.size - pos)?;
            if let Mapped::Data { file, offset } = m.kind {
                let len = self
                    .host_file(file)
                    .ok_or_else(|| corrupt("vmdk run mapped to an unknown extent file"))?
                    .len()?;
                if offset >= len {
                    return Err(corrupt(format!(
                        "ERROR: cluster offset for sector {} points after EOF",
                        pos / 512
                    )));
                }
            }
            pos += m.len.max(1);
        }
        Ok(CheckReport::default())
    }
    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let e = self.extent_at(offset)?;
        match &e.kind {
            Kind::Sparse(s) => s.read_compressed(buf, offset - e.start),
            _ => Err(corrupt("encoded read outside a compressed extent")),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.before_write()?;
        let guard = ChangedParent(below);
        let below: &dyn Below = if self.parent_ok { below } else { &guard };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos)?;
            let rel = pos - e.start;
            let n = (e.len - rel).min((buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            if e.read_only {
                return Err(unsupported("writing to a read-only (RDONLY) VMDK extent"));
            }
            match &e.kind {
                Kind::Flat { file, start } => self.files[*file as usize].write_at(chunk, start + rel)?,
                Kind::Zero => return Err(unsupported("writing to a ZERO VMDK extent")),
                Kind::Sparse(s) => s.write(chunk, rel, e.start, below)?,
                Kind::SeSparse(_) => return Err(unsupported("writing to SESPARSE VMDK extents is not supported")),
            }
            self.after_write()?;
            done += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.before_write()?;
        let guard = ChangedParent(below);
        let below: &dyn Below = if self.parent_ok { below } else { &guard };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let e = self.extent_at(pos)?;
            let rel = pos - e.start;
            let n = (e.len - rel).min(len - done);
            if e.read_only {
                return Err(unsupported("writing to a read-only (RDONLY) VMDK extent"));
            }
            match &e.kind {
                Kind::Flat { file, start } => self.files[*file as usize].write_zeroes(start + rel, n)?,
                Kind::Zero => {}
                Kind::Sparse(s) => s.write_zeroes(rel, n, e.start, below)?,
                Kind::SeSparse(_) => return Err(unsupported("writing to SESPARSE VMDK extents is not supported")),
            }
            self.after_write()?;
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for e in &self.extents {
            if let Kind::Sparse(s) = &e.kind {
                if !e.read_only {
                    s.flush_tables()?;
                }
            }
        }
        for f in &self.files {
            if !f.read_only() {
                f.flush()?;
            }
        }
        Ok(())
    }
    fn compressed_unit(&self) -> Option<u64> {
        self.compressed_extent().map(|s| s.layout.grain)
    }
    fn compressed_only(&self) -> bool {
        self.compressed_extent().is_some()
    }
    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let s = self
            .compressed_extent()
            .ok_or_else(|| unsupported("only streamOptimized VMDK images store compressed grains"))?;
        s.compress_grain(data).map(Some)
    }
    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        let s = self
            .compressed_extent()
            .ok_or_else(|| unsupported("only streamOptimized VMDK images store compressed grains"))?;
        self.before_write()?;
        s.write_compressed(units)?;
        self.after_write()
    }
    fn info(&self) -> Result<DriverInfo> {
        // (flat, compressed, grain) per extent: QEMU gives a cluster size
        // only when every extent is of the first one's kind and grain.
        let shape = |e: &Extent| match &e.kind {
            Kind::Flat { .. } | Kind::Zero => (true, false, 0),
            Kind::Sparse(s) => (false, s.layout.compressed, s.layout.grain),
            Kind::SeSparse(_) => (false, false, 4096),
        };
        let first = shape(&self.extents[0]);
        let cluster_size = (!first.0 && self.extents.iter().all(|e| shape(e) == first)).then_some(first.2);
        let mut list = Vec::new();
        for e in &self.extents {
            let mut m: Vec<(String, InfoValue)> = Vec::new();
            let file = match &e.kind {
                Kind::Flat { file, .. } => Some(*file),
                Kind::Sparse(s) => Some(s.file),
                Kind::SeSparse(s) => Some(s.file),
                Kind::Zero => None,
            };
            if let Some(f) = file {
                m.push(("filename".into(), self.files[f as usize].describe().into()));
            }
            m.push(("format".into(), e.type_name.into()));
            m.push(("virtual-size".into(), e.len.into()));
            if let Kind::SeSparse(_) = &e.kind {
                m.push(("cluster-size".into(), 4096u64.into()));
            }
            if let Kind::Sparse(s) = &e.kind {
                m.push(("cluster-size".into(), s.layout.grain.into()));
                if s.layout.compressed {
                    m.push(("compressed".into(), true.into()));
                }
            }
            list.push(InfoValue::Map(m));
        }
        Ok(DriverInfo {
            cluster_size,
            encrypted: false,
            dirty: false,
            format_specific: vec![
                ("cid".into(), self.cid.load(Ordering::Relaxed).into()),
                ("parent-cid".into(), self.parent_cid.into()),
                ("create-type".into(), self.create_type.clone().into()),
                ("extents".into(), InfoValue::List(list)),
            ],
        })
    }
}

#[cfg(test)]
mod tests;
