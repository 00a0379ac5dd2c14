//! raw: the guest disk byte for byte. Allocation comes from the host file's
//! holes (SEEK_DATA/SEEK_HOLE), as QEMU reports it.

use crate::backend::Storage;
use crate::driver::{Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{invalid, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::registry::{FormatEntry, OpenCtx};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Raw,
    // Raw never claims an image; it is what remains when nothing else does.
    probe: Some(|_, _| 1),
    open: Some(open),
    create: Some(create),
};

pub struct Raw {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
}

fn open(storage: Arc<dyn Storage>, _ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    let size = storage.len()?;
    Ok(Box::new(Raw {
        storage,
        size: AtomicU64::new(size),
    }))
}

fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let prealloc = opts.take_str("preallocation")?.unwrap_or_else(|| "off".into());
    opts.finish("raw")?;
    let storage = location.create_storage()?;
    match prealloc.as_str() {
        "off" => storage.set_len(size)?,
        "falloc" => {
            storage.set_len(size)?;
            if size > 0 {
                storage.allocate(0, size)?;
            }
        }
        "full" => {
            crate::backend::write_zero_buffers(storage.as_ref(), 0, size)?;
            storage.set_len(size)?;
        }
        other => {
            return Err(invalid(format!(
                "raw preallocation must be off, falloc or full, not '{other}'"
            )))
        }
    }
    storage.flush()
}

impl Driver for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(Mapping {
            kind: Mapped::Data { file: 0, offset },
            len,
        })
    }
    fn map_status(&self, offset: u64, len: u64) -> Result<Mapping> {
        let e = self.storage.extent(offset, len)?;
        let kind = if e.data {
            Mapped::Data { file: 0, offset }
        } else {
            Mapped::Hole { file: 0, offset }
        };
        Ok(Mapping {
            kind,
            len: e.len.clamp(1, len),
        })
    }
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _below: &dyn Below) -> Result<()> {
        self.storage.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn Below) -> Result<()> {
        self.storage.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.storage.write_zeroes(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }
    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo::default())
    }
    fn truncate(&self, size: u64) -> Result<()> {
        self.storage.set_len(size)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
