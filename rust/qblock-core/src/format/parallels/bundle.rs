//! Parallels `.hdd` bundles: a directory holding `DiskDescriptor.xml` and
//! one or more data files (`.hds`). The descriptor lists the disk size and
//! one `<Storage>` per extent (start and end in sectors) naming its data
//! file, either "Compressed" (an expanding parallels image) or "Plain" (raw
//! bytes). Opening the descriptor reads the whole disk across its extents.
//!
//! Reads and writes go to the extents (an expanding extent is a parallels
//! image of its own, with its own in-use flag and crash order); the
//! descriptor itself is never rewritten. Only bundles without snapshots (one
//! image per extent): several `<Image>`s in one `<Storage>` form a snapshot
//! chain we do not resolve, so they are refused as `Unsupported`.

use super::Parallels;
use crate::backend::Storage;
use crate::driver::{Below, Driver, DriverInfo, HostFile, Mapped, Mapping, NoBacking};
use crate::error::{corrupt, unsupported, Result};
use crate::format_name::Format;
use crate::registry::OpenCtx;
use std::sync::Arc;

/// A descriptor is a small XML file; anything bigger is not one we wrote
/// or Parallels did, and must not make us read without bound.
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Most extents in one bundle (Parallels splits at 2 GiB: 4096 extents are
/// 8 TiB; each extent keeps a file open).
const MAX_EXTENTS: usize = 4096;
const SECTOR: u64 = 512;

/// Whether the first bytes are a Parallels disk descriptor.
pub fn is_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(512)]);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    t.starts_with("<?xml") && t.contains("<Parallels_disk_image")
}

pub fn probe(head: &[u8], _s: &dyn Storage) -> u32 {
    if is_descriptor(head) {
        100
    } else {
        0
    }
}

/// The text between `<name>` and `</name>`, first occurrence.
fn tag<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let a = s.find(&open)? + open.len();
    let b = s[a..].find(&close)? + a;
    Some(s[a..b].trim())
}

/// Every `<name>...</name>` block, in order.
fn blocks<'a>(s: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(a) = rest.find(&open) {
        let body = &rest[a + open.len()..];
        match body.find(&close) {
            Some(b) => {
                out.push(&body[..b]);
                rest = &body[b + close.len()..];
            }
            None => break,
        }
    }
    out
}

fn number(s: &str, name: &str, what: &str) -> Result<u64> {
    let v = tag(s, name).ok_or_else(|| corrupt(format!("parallels descriptor: {what} has no <{name}>")))?;
    v.parse::<u64>().map_err(|_| {
        corrupt(format!(
            "parallels descriptor: <{name}> of {what} is not a number: '{v}'"
        ))
    })
}

/// One extent's file as the descriptor names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentDesc {
    pub start: u64,
    pub end: u64,
    pub expanding: bool,
    pub file: String,
}

/// Parse the descriptor: disk size in bytes and the extents, checked to
/// tile the disk from 0 without gaps or overlaps.
pub fn parse(text: &str) -> Result<(u64, Vec<ExtentDesc>)> {
    let params =
        tag(text, "Disk_Parameters").ok_or_else(|| corrupt("parallels descriptor has no <Disk_Parameters>"))?;
    let sectors = number(params, "Disk_size", "the disk")?;
    let size = sectors.checked_mul(SECTOR).ok_or_else(|| {
        corrupt(format!(
            "parallels descriptor: disk size of {sectors} sectors overflows"
        ))
    })?;
    let storage_data = tag(text, "StorageData").ok_or_else(|| corrupt("parallels descriptor has no <StorageData>"))?;
    let storages = blocks(storage_data, "Storage");
    if storages.is_empty() {
        return Err(corrupt("parallels descriptor lists no <Storage>"));
    }
    if storages.len() > MAX_EXTENTS {
        return Err(corrupt(format!(
            "parallels descriptor lists {} extents (max {MAX_EXTENTS})",
            storages.len()
        )));
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    for (i, s) in storages.iter().enumerate() {
        let what = format!("storage {i}");
        let start = number(s, "Start", &what)?;
        let end = number(s, "End", &what)?;
        if start != pos || end <= start || end > sectors {
            return Err(corrupt(format!(
                "parallels descriptor: {what} covers sectors {start}..{end}, expected to start at {pos} within {sectors}"
            )));
        }
        let images = blocks(s, "Image");
        match images.len() {
            0 => return Err(corrupt(format!("parallels descriptor: {what} has no <Image>"))),
            1 => {}
            _ => {
                return Err(unsupported(
                    "parallels bundles with snapshots (several images per extent) are not supported; open a .hds file",
                ))
            }
        }
        let kind = tag(images[0], "Type").unwrap_or("");
        let expanding = match kind {
            "Compressed" => true,
            "Plain" => false,
            k => {
                return Err(unsupported(format!(
                    "parallels descriptor: extent type '{k}' is not supported"
                )))
            }
        };
        let file =
            tag(images[0], "File").ok_or_else(|| corrupt(format!("parallels descriptor: {what} names no <File>")))?;
        // Extents live inside the bundle directory.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == ".." {
            return Err(corrupt(format!(
                "parallels descriptor: extent file '{file}' is not a name inside the bundle"
            )));
        }
        out.push(ExtentDesc {
            start: start * SECTOR,
            end: end * SECTOR,
            expanding,
            file: file.to_string(),
        });
        pos = end;
    }
    if pos != sectors {
        return Err(corrupt(format!(
            "parallels descriptor: extents end at sector {pos}, the disk has {sectors}"
        )));
    }
    Ok((size, out))
}

enum Data {
    Plain(Arc<dyn Storage>),
    Expanding(Box<Parallels>),
}

struct Extent {
    start: u64,
    end: u64,
    data: Data,
}

pub struct Bundle {
    descriptor: Arc<dyn Storage>,
    size: u64,
    extents: Vec<Extent>,
}

pub fn open(descriptor: Arc<dyn Storage>, ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let len = descriptor.len()?;
    if len > MAX_DESCRIPTOR {
        return Err(corrupt(format!(
            "parallels descriptor of {len} bytes is too large (max {MAX_DESCRIPTOR})"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    descriptor.read_at(&mut buf, 0)?;
    let text = String::from_utf8_lossy(&buf);
    let (size, descs) = parse(&text)?;
    let mut extents = Vec::with_capacity(descs.len());
    for d in descs {
        let loc = ctx.location.relative(&d.file);
        let st = ctx
            .open_named(&d.file, &loc, ctx.read_only)
            .map_err(|e| e.context(format!("parallels extent '{}'", d.file)))?;
        let need = d.end - d.start;
        let data = if ctx.inspecting() {
            Data::Plain(st) // not opened: nothing to check
        } else if d.expanding {
            let p =
                Parallels::open(st, ctx.read_only).map_err(|e| e.context(format!("parallels extent '{}'", d.file)))?;
            p.note_dirty(ctx, &loc);
            if p.header().size < need {
                return Err(corrupt(format!(
                    "parallels extent '{}' holds {} bytes, the descriptor gives it {need}",
                    d.file,
                    p.header().size
                )));
            }
            Data::Expanding(Box::new(p))
        } else {
            // A short raw extent would read zeroes where data is missing.
            let have = st.len()?;
            if have < need {
                return Err(corrupt(format!(
                    "parallels extent '{}' has {have} bytes, the descriptor gives it {need}",
                    d.file
                )));
            }
            Data::Plain(st)
        };
        extents.push(Extent {
            start: d.start,
            end: d.end,
            data,
        });
    }
    Ok(Box::new(Bundle {
        descriptor,
        size,
        extents,
    }))
}

impl Bundle {
    /// Split a guest range into (extent, offset in the extent, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Extent, u64, u64)> {
        let mut pos = offset;
        let end = offset + len;
        let mut k = self.extents.partition_point(|e| e.end <= offset);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let e = self.extents.get(k)?;
            let n = (e.end - pos).min(end - pos);
            let item = (e, pos - e.start, n);
            pos += n;
            k += 1;
            Some(item)
        })
    }
}

impl Driver for Bundle {
    fn format(&self) -> Format {
        Format::Parallels
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let k = self.extents.partition_point(|e| e.end <= offset);
        let e = self
            .extents
            .get(k)
            .ok_or_else(|| crate::Error::Internal(format!("offset {offset} is past the bundle")))?;
        let rel = offset - e.start;
        let len = len.min(e.end - offset);
        let file = (k + 1) as HostFile;
        Ok(match &e.data {
            Data::Plain(_) => Mapping {
                kind: Mapped::Data { file, offset: rel },
                len,
            },
            Data::Expanding(p) => {
                let m = p.map(rel, len)?;
                let kind = match m.kind {
                    Mapped::Data { offset, .. } => Mapped::Data { file, offset },
                    other => other,
                };
                Mapping { kind, len: m.len }
            }
        })
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        if file == 0 {
            return Some(self.descriptor.as_ref());
        }
        let e = self.extents.get(file as usize - 1)?;
        Some(match &e.data {
            Data::Plain(s) => s.as_ref(),
            Data::Expanding(p) => p.host_file(0)?,
        })
    }
    /// A bundle has no backing file: extents see zeroes below them.
    fn write_at(&self, buf: &[u8], offset: u64, _below: &dyn Below) -> Result<()> {
        let mut done = 0usize;
        for (e, rel, n) in self.pieces(offset, buf.len() as u64) {
            let piece = &buf[done..done + n as usize];
            match &e.data {
                Data::Plain(s) => s.write_at(piece, rel)?,
                Data::Expanding(p) => p.write_at(piece, rel, &NoBacking)?,
            }
            done += n as usize;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn Below) -> Result<()> {
        for (e, rel, n) in self.pieces(offset, len) {
            match &e.data {
                Data::Plain(s) => s.write_zeroes(rel, n)?,
                Data::Expanding(p) => p.write_zeroes(rel, n, &NoBacking)?,
            }
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        for (e, rel, n) in self.pieces(offset, len) {
            if let Data::Expanding(p) = &e.data {
                p.discard(rel, n)?;
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        for e in &self.extents {
            match &e.data {
                Data::Plain(s) if !s.read_only() => s.flush()?,
                Data::Plain(_) => {}
                Data::Expanding(p) => p.flush()?,
            }
        }
        Ok(())
    }
    /// Close every extent (clearing the in-use flags), reporting the first failure.
    fn close(&self) -> Result<()> {
        let mut first = Ok(());
        for e in &self.extents {
            let r = match &e.data {
                Data::Plain(s) if !s.read_only() => s.flush(),
                Data::Plain(_) => Ok(()),
                Data::Expanding(p) => p.close(),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo::default())
    }
}
