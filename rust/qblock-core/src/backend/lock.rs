//! Image locking as QEMU's file driver does it (block/file-posix.c), so
//! that QEMU and libqblock see each other: open file description (OFD)
//! byte-range locks, one byte per block permission. Byte 100 + i is held
//! (shared) while this open has permission i; byte 200 + i is held while it
//! lets nobody else have permission i. Taking a permission tests that no
//! other open holds its "denied" byte, and denying one tests that no other
//! open holds its "held" byte. OFD locks belong to the open file, not the
//! process: two opens in one process conflict as two processes would, and
//! closing the file releases them, even when the process dies.

use crate::error::{Error, Result};
use std::io;
use std::os::unix::io::RawFd;

/// QEMU's BLK_PERM_* bits, in its order (bit i is lock byte base + i).
pub const READ: u8 = 1 << 0;
pub const WRITE: u8 = 1 << 1;
pub const WRITE_UNCHANGED: u8 = 1 << 2;
pub const RESIZE: u8 = 1 << 3;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// The permissions an open holds and those it denies to every other open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub hold: u8,
    pub deny: u8,
}

impl Perm {
    /// No permission and nothing denied: every lock byte released.
    pub const NONE: Perm = Perm { hold: 0, deny: 0 };

    /// The file of a format that is not raw (and a vmdk's extents), as
    /// qemu-img and qemu-io open it: writers take write and resize and let
    /// nobody else write or resize; readers read and still let nobody
    /// write or resize. `force_share` (qemu-img -U) reads and denies
    /// nothing.
    pub fn image(read_only: bool, force_share: bool) -> Perm {
        match (read_only, force_share) {
            (_, true) => Perm { hold: READ, deny: 0 },
            (true, false) => Perm {
                hold: READ,
                deny: WRITE | RESIZE,
            },
            (false, false) => Perm {
                hold: READ | WRITE | RESIZE,
                deny: WRITE | RESIZE,
            },
        }
    }
    /// A raw image: QEMU's raw format shares everything.
    pub fn raw(read_only: bool) -> Perm {
        Perm {
            hold: if read_only { READ } else { READ | WRITE },
            deny: 0,
        }
    }
    /// A qcow2 external data file: written and resized by its image, which
    /// lets nobody else resize it.
    pub fn data_file(read_only: bool, force_share: bool) -> Perm {
        match (read_only, force_share) {
            (_, true) => Perm { hold: READ, deny: 0 },
            (true, false) => Perm {
                hold: READ,
                deny: RESIZE,
            },
            (false, false) => Perm {
                hold: READ | WRITE | RESIZE,
                deny: RESIZE,
            },
        }
    }
    /// A file being created (truncated): QEMU's create takes write and
    /// resize and lets nobody else resize it.
    pub fn create() -> Perm {
        Perm {
            hold: WRITE | RESIZE,
            deny: RESIZE,
        }
    }
}

fn ofd(fd: RawFd, cmd: libc::c_int, kind: libc::c_short, byte: i64) -> io::Result<libc::c_short> {
    // SAFETY: a zeroed flock is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    loop {
        // SAFETY: fcntl on a descriptor the caller owns, with a pointer to
        // a flock that lives for the call.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(fl.l_type);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the file system cannot lock at all: QEMU's locking=auto then
/// goes on without locks (NFS without lockd, some FUSE file systems).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOTSUP | libc::ENOLCK | libc::ENOSYS)
    )
}

/// Take `perm` on `fd` (a descriptor with no locks yet, or with earlier
/// ones to replace), then check that no other open conflicts. On a
/// conflict every lock byte is released again and the error names the
/// permission, as QEMU's message does.
pub fn apply(fd: RawFd, perm: Perm, what: &str) -> Result<()> {
    let os = |e: io::Error| Error::os(format!("cannot lock '{what}'"), e);
    for i in 0..4 {
        for (base, on) in [(PERM_BASE, perm.hold), (SHARED_BASE, perm.deny)] {
            let kind = if on & (1 << i) != 0 {
                libc::F_RDLCK
            } else {
                libc::F_UNLCK
            };
            match ofd(fd, libc::F_OFD_SETLK, kind as libc::c_short, base + i) {
                Ok(_) => {}
                Err(e) if unsupported(&e) => {
                    // Releasing takes no lock: nothing to say then.
                    if perm != Perm::NONE {
                        crate::events::unlocked(what, e.raw_os_error().unwrap_or(0));
                    }
                    return Ok(());
                }
                // A byte another open holds exclusively (not QEMU's way,
                // but another tool's): the image is in use.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    release(fd);
                    return Err(locked(what, NAMES[i as usize], base == SHARED_BASE));
                }
                Err(e) => return Err(os(e)),
            }
        }
    }
    for i in 0..4 {
        for (base, on, shared) in [(SHARED_BASE, perm.hold, false), (PERM_BASE, perm.deny, true)] {
            if on & (1 << i) == 0 {
                continue;
            }
            match ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, base + i) {
                Ok(t) if t == libc::F_UNLCK as libc::c_short => {}
                Ok(_) => {
                    release(fd);
                    return Err(locked(what, NAMES[i as usize], shared));
                }
                Err(e) if unsupported(&e) => return Ok(()),
                Err(e) => {
                    release(fd);
                    return Err(os(e));
                }
            }
        }
    }
    Ok(())
}

/// Drop every lock byte (closing the descriptor does it too).
pub fn release(fd: RawFd) {
    for i in 0..4 {
        for base in [PERM_BASE, SHARED_BASE] {
            let _ = ofd(fd, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, base + i);
        }
    }
}

fn locked(what: &str, perm: &str, shared: bool) -> Error {
    let shared = if shared { "shared " } else { "" };
    Error::ImageLocked(format!(
        "Failed to get {shared}\"{perm}\" lock: is another process using the image [{what}]?"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::file::FileStorage;
    use crate::backend::Storage;
    use crate::error::ErrorKind;

    #[test]
    fn opens_conflict_as_qemu_opens_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let open = |ro| FileStorage::open(&p, ro).unwrap();
        let writer = open(false);
        writer.lock(Perm::image(false, false)).unwrap();
        let e = open(false).lock(Perm::image(false, false)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ImageLocked);
        assert!(e.to_string().contains("\"write\" lock"), "{e}");
        let e = open(true).lock(Perm::image(true, false)).unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        open(true).lock(Perm::image(true, true)).unwrap(); // force share
        open(false).lock(Perm::raw(false)).unwrap_err(); // a raw writer still meets the denial
                                                         // Readers share with readers; a refused open holds nothing afterwards.
        writer.lock(Perm::NONE).unwrap();
        let r1 = open(true);
        r1.lock(Perm::image(true, false)).unwrap();
        open(true).lock(Perm::image(true, false)).unwrap();
        assert!(open(false).lock(Perm::image(false, false)).is_err());
        drop(r1);
        open(false).lock(Perm::image(false, false)).unwrap();
    }
}
