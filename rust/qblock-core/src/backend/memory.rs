//! An in-memory backend: for unit tests and fuzz targets, which must parse
//! hostile bytes without touching the disk.

use super::Storage;
use crate::error::{Error, Result};
use parking_lot::RwLock;

/// Growable bytes behind a lock.
pub struct MemoryStorage {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

/// Largest size a memory backend may grow to, so a hostile image cannot make
/// a fuzz target allocate without bound.
const MAX_MEMORY_STORAGE: u64 = 1 << 30;

impl MemoryStorage {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        MemoryStorage {
            data: RwLock::new(data),
            read_only,
        }
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner()
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read();
        let start = offset.min(data.len() as u64) as usize;
        let end = (offset.saturating_add(buf.len() as u64)).min(data.len() as u64) as usize;
        let n = end - start;
        buf[..n].copy_from_slice(&data[start..end]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::InvalidParam("memory storage is read-only".into()));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= MAX_MEMORY_STORAGE)
            .ok_or_else(|| Error::NoMemory("memory storage limit exceeded".into()))?;
        let mut data = self.data.write();
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.read().len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        if len > MAX_MEMORY_STORAGE {
            return Err(Error::NoMemory("memory storage limit exceeded".into()));
        }
        self.data.write().resize(len as usize, 0);
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn describe(&self) -> String {
        "<memory>".into()
    }
}
