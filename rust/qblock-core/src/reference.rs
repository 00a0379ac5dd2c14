//! Files an image names (backing files, qcow2 data files, vmdk extents,
//! parallels bundle images, VHD/VHDX parent locators) and the policy that
//! decides which of them an open may follow. An untrusted image can name
//! any host file (CVE-2024-32498: a qcow2 data file on /etc/shadow); every
//! such name passes [`RefRules::admit`] before anything opens it, so one
//! check covers every format.

use crate::backend::Storage;
use crate::driver::DriverInfo;
use crate::error::{invalid, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::registry::{self, OpenCtx};
use parking_lot::Mutex;
use std::path::{Component, Path, PathBuf};

/// Which files named by an image an open may follow (`references=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum References {
    /// Any file, as QEMU: people's own chains span folders.
    #[default]
    Any,
    /// Only files inside the top image's folder or one of these folders,
    /// compared after symlinks are resolved.
    Confined(Vec<PathBuf>),
    /// No file at all: an image naming one is refused.
    None,
}

/// What an image names a file for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Backing,
    DataFile,
    Extent,
    /// A VHD/VHDX parent locator: a candidate for the parent, which the
    /// driver picks among by opening them.
    ParentLocator,
}

impl RefKind {
    pub fn name(self) -> &'static str {
        match self {
            RefKind::Backing => "backing",
            RefKind::DataFile => "data_file",
            RefKind::Extent => "extent",
            RefKind::ParentLocator => "parent_locator",
        }
    }
    /// For messages: "backing file 'x'".
    fn noun(self) -> &'static str {
        match self {
            RefKind::Backing => "backing file",
            RefKind::DataFile => "external data file",
            RefKind::Extent => "extent",
            RefKind::ParentLocator => "parent locator",
        }
    }
}

/// The rules one open applies to every file of its chain: the policy with
/// its folders already canonical, and whether protocol names (`nbd://`,
/// `json:{...}`) may be followed.
#[derive(Debug, Clone, Default)]
pub struct RefRules {
    pub policy: References,
    pub allow_protocols: bool,
    /// Canonical folders a confined reference may resolve into (the top
    /// image's folder first); empty unless the policy is `Confined`.
    pub roots: Vec<PathBuf>,
}

static ANY: RefRules = RefRules {
    policy: References::Any,
    allow_protocols: false,
    roots: Vec::new(),
};

impl RefRules {
    /// The default rules (any file, no protocol names), for opens that
    /// have no caller's policy (temporary overlays, tests).
    pub fn any() -> &'static RefRules {
        &ANY
    }

    /// The rules for opening the image at `top` under `policy`: confined
    /// folders are canonicalized once, here.
    pub fn new(top: &Location, policy: &References, allow_protocols: bool) -> Result<RefRules> {
        let mut roots = Vec::new();
        if let References::Confined(extra) = policy {
            if let Location::File(p) = top {
                roots.push(canonical_dir(folder_of(p))?);
            }
            for d in extra {
                roots.push(canonical_dir(d)?);
            }
        }
        Ok(RefRules {
            policy: policy.clone(),
            allow_protocols,
            roots,
        })
    }

    /// Whether the image may follow `name` (recorded as a `kind`), which
    /// resolved to `loc`. The refusal names the reference and says why.
    pub fn admit(&self, kind: RefKind, name: &str, loc: &Location) -> Result<()> {
        let what = kind.noun();
        if let Location::Other { protocol, .. } = loc {
            if matches!(self.policy, References::Any) && !self.allow_protocols {
                return Err(unsupported(format!(
                    "{what} '{name}' has a protocol prefix ('{protocol}:'); such names are not \
                     followed unless the open allows protocols (allow_protocols)"
                )));
            }
        }
        match &self.policy {
            References::Any => Ok(()),
            References::None => Err(invalid(format!(
                "{what} '{name}' refused: references='none' allows no file named by the image"
            ))),
            References::Confined(_) => match loc {
                Location::File(p) if inside(p, &self.roots) => Ok(()),
                Location::File(p) => Err(invalid(format!(
                    "{what} '{name}' refused: it resolves to '{}', outside the allowed folders \
                     (references='confined')",
                    real_path(p).unwrap_or_else(|| p.clone()).display()
                ))),
                Location::Other { .. } => Err(invalid(format!(
                    "{what} '{name}' refused: a protocol name is not inside any folder \
                     (references='confined')"
                ))),
            },
        }
    }
}

/// The folder names in an image resolve against: its path's parent.
pub fn folder_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn canonical_dir(d: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(d)
        .map_err(|e| crate::error::Error::os(format!("cannot resolve the folder '{}'", d.display()), e))
}

/// `p` after symlinks: canonical where it exists, else its canonical
/// nearest existing ancestor joined with the rest. None when the rest
/// climbs (`..` below a missing folder), which no lexical join can decide.
pub fn real_path(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let abs = std::path::absolute(p).ok()?;
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        let name = cur.file_name()?;
        rest.push(name.to_os_string());
        cur = cur.parent()?;
        if let Ok(c) = std::fs::canonicalize(cur) {
            let mut out = c;
            for n in rest.iter().rev() {
                if matches!(Path::new(n).components().next(), Some(Component::ParentDir)) {
                    return None;
                }
                out.push(n);
            }
            return Some(out);
        }
    }
}

/// Whether `p`, after symlinks, lies inside one of the canonical `roots`.
pub fn inside(p: &Path, roots: &[PathBuf]) -> bool {
    real_path(p).is_some_and(|r| roots.iter().any(|root| r.starts_with(root)))
}

/// A file named by an image, as an inspecting open notes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: RefKind,
    /// The name as the image records it.
    pub name: String,
    /// Where it resolves: a path joined to the image's folder, or a
    /// protocol location.
    pub location: Location,
}

/// Where an inspecting open notes the references instead of opening them.
#[derive(Debug, Default)]
pub struct RefLog {
    refs: Mutex<Vec<Reference>>,
}

impl RefLog {
    pub fn note(&self, kind: RefKind, name: &str, loc: &Location) {
        let mut refs = self.refs.lock();
        let r = Reference {
            kind,
            name: name.to_string(),
            location: loc.clone(),
        };
        if !refs.contains(&r) {
            refs.push(r);
        }
    }
    pub fn take(&self) -> Vec<Reference> {
        std::mem::take(&mut self.refs.lock())
    }
}

/// What an inspecting open hands a driver in place of a file it names: it
/// has no bytes, and any read says the file was not opened.
pub struct Unopened(pub String);

impl Storage for Unopened {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(unsupported(format!("inspect does not open '{}'", self.0)))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(unsupported(format!("inspect does not open '{}'", self.0)))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(0)
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(unsupported(format!("inspect does not open '{}'", self.0)))
    }
    fn read_only(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        self.0.clone()
    }
}

/// One file an image names, as [`inspect`] reports it.
#[derive(Debug, Clone)]
pub struct RefReport {
    pub kind: RefKind,
    /// The name as the image records it.
    pub name: String,
    /// The format recorded beside a backing file's name, if any.
    pub format: Option<String>,
    /// Where an open would look: the name joined to the image's folder,
    /// or a protocol location.
    pub location: Location,
    /// The protocol of a prefixed name (`nbd`, `json`); `file:` is dropped.
    pub protocol: Option<String>,
    /// The name is an absolute path.
    pub absolute: bool,
    /// `location` after symlinks (see [`real_path`]); None for a protocol
    /// or a path that cannot be resolved.
    pub real_path: Option<PathBuf>,
    /// `real_path` lies inside the image's folder or an allowed folder.
    pub inside: bool,
    /// Something exists at `location` (a stat: nothing is opened).
    pub exists: bool,
}

/// What [`inspect`] found: what an image is and every file it names.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub format: Format,
    pub virtual_size: u64,
    pub info: DriverInfo,
    pub references: Vec<RefReport>,
}

/// Read the image at `location` alone and report what it names, opening
/// none of it (a stat says whether each exists): the driver opens in an
/// inspecting mode in which every name it would follow is noted and its
/// file replaced by an [`Unopened`] one, and the backing file is the
/// driver's record of it. `inside` is judged against the image's folder
/// and `allowed`. The image is read without locks (as `qemu-img info -U`).
pub fn inspect(location: &Location, format: Option<Format>, allowed: &[PathBuf]) -> Result<Inspection> {
    let storage = location.open_storage(true)?;
    let format = match format {
        Some(f) => f,
        None => registry::probe(storage.as_ref())?,
    };
    let log = RefLog::default();
    let ctx = OpenCtx {
        location,
        read_only: true,
        direct: false,
        check: false,
        force_share: true,
        refs: RefRules::any(),
        inspect: Some(&log),
    };
    let driver = (registry::open_fn(format)?)(storage, &ctx)
        .map_err(|e| e.context(format!("{} image '{}'", format, location.describe())))?;
    let mut roots = Vec::new();
    if let Location::File(p) = location {
        roots.push(canonical_dir(folder_of(p))?);
    }
    for d in allowed {
        roots.push(canonical_dir(d)?);
    }
    let mut refs: Vec<(Reference, Option<String>)> = Vec::new();
    if let Some(b) = driver.backing() {
        let r = Reference {
            kind: RefKind::Backing,
            location: location.relative(&b.filename),
            name: b.filename,
        };
        refs.push((r, b.format));
    }
    refs.extend(
        log.take()
            .into_iter()
            .filter(|r| r.kind != RefKind::Backing)
            .map(|r| (r, None)),
    );
    let info = driver.info()?;
    let references = refs
        .into_iter()
        .map(|(r, format)| {
            let (protocol, real, exists) = match &r.location {
                Location::File(p) => (None, real_path(p), p.exists()),
                Location::Other { protocol, .. } => (Some(protocol.clone()), None, false),
            };
            // As recorded, less a `file:` prefix (which `relative` drops too).
            let absolute =
                protocol.is_none() && Path::new(r.name.strip_prefix("file:").unwrap_or(&r.name)).is_absolute();
            RefReport {
                inside: real
                    .as_ref()
                    .is_some_and(|p| roots.iter().any(|root| p.starts_with(root))),
                kind: r.kind,
                name: r.name,
                format,
                location: r.location,
                protocol,
                absolute,
                real_path: real,
                exists,
            }
        })
        .collect();
    let virtual_size = driver.virtual_size();
    let _ = driver.close();
    Ok(Inspection {
        format,
        virtual_size,
        info,
        references,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::location::protocol_prefix;

    #[test]
    fn protocol_prefixes_follow_qemus_rule() {
        assert_eq!(protocol_prefix("nbd://h/x"), Some(("nbd", "//h/x")));
        assert_eq!(protocol_prefix("json:{\"a\":1}"), Some(("json", "{\"a\":1}")));
        assert_eq!(protocol_prefix("nbd:h:10809"), Some(("nbd", "h:10809")));
        assert_eq!(protocol_prefix("./a:b"), None);
        assert_eq!(protocol_prefix("/abs/a:b"), None);
        assert_eq!(protocol_prefix(":x"), None);
        assert_eq!(protocol_prefix("plain.qcow2"), None);
        let img = Location::file("/d/img.qcow2");
        assert_eq!(img.relative("file:b.raw"), Location::file("/d/b.raw"));
        assert_eq!(img.relative("file:/e/b.raw"), Location::file("/e/b.raw"));
        assert!(matches!(img.relative("nbd://h/x"), Location::Other { ref protocol, .. } if protocol == "nbd"));
    }

    #[test]
    fn confinement_resolves_symlinks_and_missing_files() {
        let base = std::env::temp_dir().join(format!("qblock-ref-{}", std::process::id()));
        let d = base.join("img");
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("out")).unwrap();
        let top = Location::file(d.join("top.qcow2"));
        let rules = RefRules::new(&top, &References::Confined(vec![]), false).unwrap();
        let ok = |n: &str| rules.admit(RefKind::Backing, n, &top.relative(n));
        assert!(ok("missing.raw").is_ok());
        // `..` below a missing folder cannot be opened, nor judged: refused.
        assert!(ok("sub/../missing.raw").is_err());
        assert_eq!(ok("../x").unwrap_err().kind(), ErrorKind::InvalidParam);
        assert!(ok("out/passwd").is_err());
        assert!(ok("nothere/../../x").is_err());
        assert!(ok("/etc/passwd").is_err());
        assert_eq!(ok("nbd://h/x").unwrap_err().kind(), ErrorKind::InvalidParam);
        let any = RefRules::new(&top, &References::Any, false).unwrap();
        let e = any
            .admit(RefKind::Backing, "nbd://h/x", &top.relative("nbd://h/x"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let none = RefRules::new(&top, &References::None, false).unwrap();
        assert!(none.admit(RefKind::Extent, "a", &top.relative("a")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
