//! The text descriptor (VMware Virtual Disk Format 1.1, "The Descriptor
//! File"): `key=value` lines (version, CID, parentCID, createType,
//! parentFileNameHint), extent lines (`RW 2048 SPARSE "x-s001.vmdk"`,
//! `RW 2048 FLAT "x-flat.vmdk" 0`, `RW 2048 ZERO`) and the disk database.
//!
//! Bounded: the text is at most [`MAX_DESCRIPTOR`] bytes (QEMU reads at
//! most 1 MiB - 1) and names at most [`MAX_EXTENTS`] extents.

use crate::error::{corrupt, unsupported, Result};

/// Largest descriptor we read, as QEMU ("avoid unbounded allocation").
pub const MAX_DESCRIPTOR: usize = (1 << 20) - 1;
/// Most extents one descriptor may name: each is an open file. 4096 extents
/// of 2 GiB (twoGbMaxExtent*) make 8 TiB, four times VMDK's 2 TiB limit
/// for hosted disks.
pub const MAX_EXTENTS: usize = 4096;
/// Longest file name in an extent line or parentFileNameHint (PATH_MAX).
pub const MAX_NAME: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Rw,
    ReadOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    Sparse,
    Flat,
    Zero,
    /// VMFS (flat on VMFS): served as FLAT at offset 0, as QEMU does.
    Vmfs,
    /// VMFSSPARSE: the "COWD" sparse extent.
    VmfsSparse,
    SeSparse,
}

impl ExtentType {
    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    /// None for ZERO extents.
    pub filename: Option<String>,
    /// Sector offset inside the file (FLAT only).
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: Option<String>,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

/// The descriptor text of `raw`: up to the first NUL, as QEMU reads it.
pub fn text(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    &raw[..end.min(MAX_DESCRIPTOR)]
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

fn hex(v: &str) -> Option<u32> {
    u32::from_str_radix(unquote(v), 16).ok()
}

impl Descriptor {
    /// Parse a descriptor. Extent lines are parsed strictly (a malformed one
    /// is corruption, an unknown type unsupported); other lines are
    /// `key = value` or ignored.
    pub fn parse(raw: &[u8]) -> Result<Descriptor> {
        Self::parse_with(raw, true)
    }

    /// The descriptor embedded in a monolithic sparse extent: its extent
    /// lines describe the file itself and are not used (QEMU ignores them;
    /// FreeBSD's mkimg writes an empty name there), so they are skipped.
    pub fn parse_embedded(raw: &[u8]) -> Result<Descriptor> {
        Self::parse_with(raw, false)
    }

    fn parse_with(raw: &[u8], with_extents: bool) -> Result<Descriptor> {
        let t = String::from_utf8_lossy(text(raw));
        let mut d = Descriptor::default();
        for line in t.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if !with_extents {
                    continue;
                }
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(corrupt(format!("descriptor names more than {MAX_EXTENTS} extents")));
                }
                d.extents.push(parse_extent(line)?);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else { continue };
            match k.trim() {
                "createType" => d.create_type = Some(unquote(v).to_string()),
                "CID" => d.cid = hex(v),
                "parentCID" => d.parent_cid = hex(v),
                "parentFileNameHint" => {
                    let name = unquote(v);
                    if name.len() > MAX_NAME {
                        return Err(corrupt("parentFileNameHint is longer than PATH_MAX"));
                    }
                    if !name.is_empty() {
                        d.parent_hint = Some(name.to_string());
                    }
                }
                _ => {}
            }
        }
        Ok(d)
    }
}

/// `ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]`.
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let bad = || {
        corrupt(format!(
            "invalid extent line: {}",
            line.chars().take(200).collect::<String>()
        ))
    };
    let mut rest = line;
    let word = |rest: &mut &str| -> Option<String> {
        let s = rest.trim_start();
        let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
        let (w, r) = s.split_at(end);
        *rest = r;
        (!w.is_empty()).then(|| w.to_string())
    };
    let access = match word(&mut rest).as_deref() {
        Some("RW") => Access::Rw,
        Some("RDONLY") => Access::ReadOnly,
        Some(_) => return Err(unsupported(format!("NOACCESS extents are not supported: {line}"))),
        None => return Err(bad()),
    };
    let sectors: u64 = word(&mut rest).and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    if sectors == 0 {
        return Err(bad());
    }
    let kind = match word(&mut rest).as_deref() {
        Some("SPARSE") => ExtentType::Sparse,
        Some("FLAT") => ExtentType::Flat,
        Some("ZERO") => ExtentType::Zero,
        Some("VMFS") => ExtentType::Vmfs,
        Some("VMFSSPARSE") => ExtentType::VmfsSparse,
        Some("SESPARSE") => ExtentType::SeSparse,
        Some(t) => return Err(unsupported(format!("VMDK extent type '{t}' is not supported"))),
        None => return Err(bad()),
    };
    let r = rest.trim_start();
    let (filename, r) = if let Some(q) = r.strip_prefix('"') {
        let end = q.find('"').ok_or_else(bad)?;
        let name = &q[..end];
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(bad());
        }
        (Some(name.to_string()), &q[end + 1..])
    } else {
        (None, r)
    };
    // As QEMU's sscanf: a number after the name is the offset; anything
    // else after it (a comment) is ignored.
    let mut r = r;
    let numeric = |w: &str| {
        w.trim_start_matches(['-', '+'])
            .starts_with(|c: char| c.is_ascii_digit())
    };
    let offset = match word(&mut r) {
        Some(w) if numeric(&w) => Some(w.parse::<u64>().map_err(|_| bad())?),
        _ => None,
    };
    let offset = match (kind, filename.is_some(), offset) {
        (ExtentType::Zero, false, None) => 0,
        (ExtentType::Flat, true, Some(o)) => o,
        (ExtentType::Vmfs, true, None) => 0,
        (ExtentType::Sparse | ExtentType::VmfsSparse | ExtentType::SeSparse, true, None) => 0,
        _ => return Err(bad()),
    };
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        filename,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const TWO_GB: &str = "# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\n\
        RW 4194304 SPARSE \"x-s001.vmdk\"\nRDONLY 2048 FLAT \"x-f002.vmdk\" 17\nRW 100 ZERO\n\n\
        ddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn parses_keys_and_extents() {
        let d = Descriptor::parse(TWO_GB.as_bytes()).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!((d.cid, d.parent_cid), (Some(0x1a2b3c4d), Some(0xffffffff)));
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, ExtentType::Sparse);
        assert_eq!(d.extents[0].filename.as_deref(), Some("x-s001.vmdk"));
        assert_eq!((d.extents[1].access, d.extents[1].offset), (Access::ReadOnly, 17));
        assert_eq!(
            (d.extents[2].kind, d.extents[2].filename.as_deref()),
            (ExtentType::Zero, None)
        );
    }

    #[test]
    fn stops_at_nul_and_handles_crlf() {
        let mut raw = b"createType=\"monolithicFlat\"\r\nRW 8 FLAT \"a b.img\" 0\r\n".to_vec();
        raw.push(0);
        raw.extend_from_slice(b"RW 8 FLAT \"hidden\" 0\n");
        let d = Descriptor::parse(&raw).unwrap();
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].filename.as_deref(), Some("a b.img"));
    }

    #[test]
    fn trailing_words_are_ignored_as_qemu_does() {
        let d = Descriptor::parse(b"RW 8 FLAT \"a\" 3 # data\nRW 8 SPARSE \"b\" comment\nRW 8 ZERO x\n").unwrap();
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].offset, 3);
    }

    #[test]
    fn bad_extent_lines() {
        for l in [
            "RW",
            "RW x SPARSE \"a\"",
            "RW 0 SPARSE \"a\"",
            "RW -5 SPARSE \"a\"",
            "RW 8",
            "RW 8 FLAT \"a\"",
            "RW 8 FLAT \"a\" -1",
            "RW 8 SPARSE \"a\" 3",
            "RW 8 SPARSE \"a\" -3",
            "RW 8 SPARSE",
            "RW 8 SPARSE \"unterminated",
            "RW 8 SPARSE \"\"",
            "RW 8 ZERO \"a\"",
            "RW 8 VMFS \"a\" 4",
            "RW 99999999999999999999999 FLAT \"a\" 0",
        ] {
            let e = Descriptor::parse(l.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::CorruptImage, "{l}");
        }
        for l in ["RW 8 VMFSRAW \"a\"", "NOACCESS 8 FLAT \"a\" 0"] {
            let e = Descriptor::parse(l.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{l}");
        }
    }

    #[test]
    fn extent_count_is_capped() {
        let many = "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1);
        assert_eq!(
            Descriptor::parse(many.as_bytes()).unwrap_err().kind(),
            ErrorKind::CorruptImage
        );
        let ok = "RW 1 ZERO\n".repeat(MAX_EXTENTS);
        assert_eq!(Descriptor::parse(ok.as_bytes()).unwrap().extents.len(), MAX_EXTENTS);
    }
}
