//! Where an image lives. Only local files are served now; other protocols
//! (NBD, RBD, HTTP) arrive with their backends.

use crate::backend::{fault, file::FileStorage, Storage};
use crate::error::{unsupported, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    /// A protocol we know by name but do not serve yet.
    Other {
        protocol: String,
        target: String,
    },
}

impl Location {
    pub fn file(p: impl Into<PathBuf>) -> Location {
        Location::File(p.into())
    }

    pub fn describe(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Other { protocol, target } => format!("{protocol}:{target}"),
        }
    }

    /// Open the storage behind this location.
    pub fn open_storage(&self, read_only: bool) -> Result<Arc<dyn Storage>> {
        self.open_storage_with(read_only, false)
    }

    /// Open the storage, with `direct` bypassing the host page cache.
    pub fn open_storage_with(&self, read_only: bool, direct: bool) -> Result<Arc<dyn Storage>> {
        match self {
            Location::File(p) => Ok(fault::wrap(p, Arc::new(FileStorage::open_with(p, read_only, direct)?))),
            Location::Other { protocol, .. } => {
                Err(unsupported(format!("the {protocol} protocol is not supported yet")))
            }
        }
    }

    /// Create (truncate) the storage for a new image.
    pub fn create_storage(&self) -> Result<Arc<dyn Storage>> {
        match self {
            Location::File(p) => Ok(fault::wrap(p, Arc::new(FileStorage::create(p)?))),
            Location::Other { protocol, .. } => {
                Err(unsupported(format!("the {protocol} protocol is not supported yet")))
            }
        }
    }

    /// A name recorded inside this image (backing file, data file, extent),
    /// resolved as QEMU does: absolute names stand, relative ones are
    /// relative to the directory of this image. A name with a protocol
    /// prefix (QEMU's rule: a ':' before any '/', as in `nbd://h/x`,
    /// `nbd:h:10809` or `json:{...}`) is that protocol's location, which
    /// the open's rules refuse unless protocols are allowed; a `file:`
    /// prefix is dropped (the rest is a path, resolved as any other: unlike
    /// QEMU, a relative one against the image's folder, not the working one).
    pub fn relative(&self, name: &str) -> Location {
        let name = match protocol_prefix(name) {
            Some(("file", rest)) => rest,
            Some((protocol, target)) => {
                return Location::Other {
                    protocol: protocol.to_string(),
                    target: target.to_string(),
                }
            }
            None => name,
        };
        match self {
            Location::File(p) => {
                let n = Path::new(name);
                if n.is_absolute() {
                    return Location::File(n.to_path_buf());
                }
                let dir = p.parent().unwrap_or(Path::new(""));
                Location::File(dir.join(n))
            }
            other => other.clone(),
        }
    }

    /// An identity for loop detection: the canonical path where it exists.
    pub fn identity(&self) -> String {
        match self {
            Location::File(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            other => other.describe(),
        }
    }
}

/// `name`'s protocol and the rest, when it has a prefix: a ':' before any
/// '/' (QEMU's path_has_protocol), after at least one character.
pub fn protocol_prefix(name: &str) -> Option<(&str, &str)> {
    let end = name.find([':', '/'])?;
    (end > 0 && name.as_bytes()[end] == b':').then(|| (&name[..end], &name[end + 1..]))
}
