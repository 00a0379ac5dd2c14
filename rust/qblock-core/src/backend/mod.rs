//! Storage backends: where an image's bytes live (a local file, memory; later
//! NBD, RBD, HTTP). Format drivers see only this trait, so every format works
//! over every backend.

pub mod direct;
pub mod fault;
pub mod file;
pub mod lock;
pub mod memory;

use crate::error::Result;
pub use lock::Perm;

/// One contiguous run of a backend's bytes and whether it holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostExtent {
    /// True when the range may hold data; false for a hole that reads as zeroes.
    pub data: bool,
    pub len: u64,
}

/// Byte-addressed storage under a format driver.
///
/// Reads past the end return zeroes (as QEMU's file driver does), so a driver
/// must compare against `len()` itself when a short file means corruption.
// `len` is a size in bytes, not a collection's count: an `is_empty` would say nothing.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Grow or shrink to exactly `len` bytes (new bytes read as zeroes).
    fn set_len(&self, len: u64) -> Result<()>;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// A name for messages (a path, a URL).
    fn describe(&self) -> String;

    /// Allocation of `[offset, offset+len)`: the first run and its kind.
    /// Backends that cannot tell report everything as data.
    fn extent(&self, offset: u64, len: u64) -> Result<HostExtent> {
        let _ = offset;
        Ok(HostExtent { data: true, len })
    }
    /// Make `[offset, offset+len)` read as zeroes, freeing space where possible.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        write_zero_buffers(self, offset, len)
    }
    /// Reserve space for `[offset, offset+len)` (fallocate); default writes zeroes.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Bytes the storage really occupies (for `actual-size`); None if unknown.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// Take the permissions `perm` as QEMU's image locking does, failing
    /// with `ImageLocked` while another open (another process, a VM) holds
    /// the image in a conflicting way. Backends nobody else shares (memory)
    /// have nothing to lock.
    fn lock(&self, perm: Perm) -> Result<()> {
        let _ = perm;
        Ok(())
    }
}

/// Write `len` zero bytes at `offset` with plain writes, 1 MiB at a time.
pub fn write_zero_buffers<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> Result<()> {
    let chunk = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        s.write_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A storage whose flushes do nothing: O_NO_FLUSH, QEMU's cache=unsafe.
/// The ordering barriers drivers put between dependent writes go too, so a
/// crash (of the process or the machine) may leave the image inconsistent;
/// `qemu-img convert` writes its targets so, for speed, and so may we.
pub struct Unsynced(pub std::sync::Arc<dyn Storage>);

impl Storage for Unsynced {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.0.set_len(len)
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn extent(&self, offset: u64, len: u64) -> Result<HostExtent> {
        self.0.extent(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.0.allocate(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.0.allocated_bytes()
    }
    fn lock(&self, perm: Perm) -> Result<()> {
        self.0.lock(perm)
    }
}
