//! Local files: positioned I/O (pread/pwrite, safe from many threads at once),
//! fdatasync for flush, SEEK_DATA/SEEK_HOLE for allocation, fallocate.

use super::direct::Direct;
use super::{HostExtent, Storage};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Set when the file is open with O_DIRECT: I/O goes through aligned
    /// bounce buffers.
    direct: Option<Direct>,
}

impl FileStorage {
    pub fn open(path: &Path, read_only: bool) -> Result<FileStorage> {
        Self::open_with(path, read_only, false)
    }

    /// Open, with `direct` bypassing the page cache (O_DIRECT).
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<FileStorage> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::Unsupported(format!(
                    "the file system holding '{}' does not support O_NOCACHE (O_DIRECT)",
                    path.display()
                ))
            } else {
                Error::os(format!("cannot open '{}'", path.display()), e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::os(format!("cannot stat '{}'", path.display()), e))?;
        if meta.is_dir() {
            return Err(Error::InvalidParam(format!("'{}' is a directory", path.display())));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            read_only,
            direct: direct.then(|| Direct::new(path)),
        })
    }

    /// Create (or truncate) a file for a new image. The file is locked
    /// before it is truncated, as QEMU's create does: an image another
    /// process has open (a running VM's disk) is refused, not emptied.
    pub fn create(path: &Path) -> Result<FileStorage> {
        #[allow(clippy::suspicious_open_options)] // truncated below, once locked
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(path)
            .map_err(|e| Error::os(format!("cannot create '{}'", path.display()), e))?;
        let s = FileStorage {
            file,
            path: path.to_path_buf(),
            read_only: false,
            direct: None,
        };
        s.lock(super::Perm::create())?;
        // (O_TRUNC would leave a block device as it is: so does this.)
        if s.file.metadata().is_ok_and(|m| m.is_file()) {
            s.set_len(0)?;
        }
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: io::Error) -> Error {
        Error::os(format!("{what} '{}'", self.path.display()), e)
    }

    /// lseek with SEEK_DATA/SEEK_HOLE; ENXIO means "none after offset".
    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>> {
        let off = libc::off_t::try_from(offset).map_err(|_| Error::OutOfRange("offset too large".into()))?;
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(self.err("cannot seek in", e));
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(d) = &self.direct {
            offset
                .checked_add(buf.len() as u64)
                .ok_or_else(|| Error::OutOfRange("read offset overflows".into()))?;
            return d
                .read_at(&self.file, buf, offset)
                .map_err(|e| self.err("cannot read", e));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::OutOfRange("read offset overflows".into()))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("cannot read", e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::InvalidParam(format!(
                "'{}' is open read-only",
                self.path.display()
            )));
        }
        offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::OutOfRange("write offset overflows".into()))?;
        match &self.direct {
            Some(d) => d.write_at(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
        .map_err(|e| self.err("cannot write", e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.err("cannot sync", e))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.err("cannot stat", e))?.len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        match &self.direct {
            Some(d) => d.set_len(&self.file, len),
            None => self.file.set_len(len),
        }
        .map_err(|e| self.err("cannot resize", e))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn lock(&self, perm: super::Perm) -> Result<()> {
        super::lock::apply(self.file.as_raw_fd(), perm, &self.path.display().to_string())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<HostExtent> {
        let size = self.len()?;
        if offset >= size {
            return Ok(HostExtent { data: false, len });
        }
        let end = offset.saturating_add(len);
        match self.seek(offset, libc::SEEK_DATA)? {
            // Hole up to `next` (or to EOF when no data follows).
            Some(next) if next > offset => Ok(HostExtent {
                data: false,
                len: (next.min(end)) - offset,
            }),
            None => Ok(HostExtent { data: false, len }),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(size);
                Ok(HostExtent {
                    data: true,
                    len: hole.clamp(offset + 1, end) - offset,
                })
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(Error::OutOfRange("range too large".into()));
        };
        // Punching a hole frees the space and reads back as zeroes; fall back
        // to writing zeroes where the file system cannot.
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            let size = self.len()?;
            if offset + len > size {
                self.set_len(offset + len)?;
            }
            return Ok(());
        }
        super::write_zero_buffers(self, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(Error::OutOfRange("range too large".into()));
        };
        // SAFETY: posix_fallocate on our own descriptor; no memory is passed.
        let r = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), off, l) };
        if r != 0 {
            return Err(self.err("cannot preallocate", io::Error::from_raw_os_error(r)));
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}
