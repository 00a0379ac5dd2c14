//! The format driver interface.
//!
//! A driver translates guest offsets of ONE layer into places in its storage
//! (`map`) and performs writes (allocation is format knowledge). The read
//! loop, backing-chain fall-through, bounds checks and block status across
//! layers live in [`crate::image`], once for every format. Because `map`
//! returns a contiguous run, data I/O happens outside any metadata lock.

use crate::backend::Storage;
use crate::error::{unsupported, Result};
use crate::format_name::Format;
use crate::info::InfoValue;

/// Index of a host file of a driver: 0 is the image file itself; formats
/// with external data (qcow2 data_file, vmdk extents) number the others.
pub type HostFile = u32;

/// Where one run of guest bytes of this layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// Allocated here; the bytes are at `offset` in host file `file`.
    Data { file: HostFile, offset: u64 },
    /// Allocated here, and the host range is a hole known to read as zeroes
    /// (raw files); `data` is false in block status, as QEMU reports it.
    Hole { file: HostFile, offset: u64 },
    /// Allocated here as zeroes (qcow2 zero clusters); `host` is a
    /// preallocated place, if any.
    Zero { host: Option<(HostFile, u64)> },
    /// Allocated here but stored encoded (compressed); only the driver can
    /// decode it, through [`Driver::read_encoded`].
    Encoded,
    /// Not allocated in this layer: read from the backing image, or as
    /// zeroes when there is none.
    Unallocated,
}

/// A run of `len` guest bytes (at least 1) that map the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub kind: Mapped,
    pub len: u64,
}

/// What a driver may read from the layers below it (copy-on-write of
/// partial clusters). Past the backing image's end it reads zeroes.
pub trait Below: Sync {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// True when a backing image is open below this layer.
    fn has_backing(&self) -> bool;
}

/// Below an image without backing file: zeroes.
pub struct NoBacking;

impl Below for NoBacking {
    fn read_below(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn has_backing(&self) -> bool {
        false
    }
}

/// The backing file an image names, as recorded in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    pub filename: String,
    /// The format recorded beside the name (qcow2's backing format
    /// extension); `None` means "probe".
    pub format: Option<String>,
}

/// Static facts a driver knows about its layer; the image adds the rest.
#[derive(Debug, Clone, Default)]
pub struct DriverInfo {
    pub cluster_size: Option<u64>,
    pub encrypted: bool,
    pub dirty: bool,
    /// Format-specific facts, named as `qemu-img info` names them.
    pub format_specific: Vec<(String, InfoValue)>,
}

/// How far [`Driver::check`] may repair what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Report only (`qemu-img check`).
    #[default]
    None,
    /// Free leaked clusters (`-r leaks`).
    Leaks,
    /// Also fix corruptions where that is safe (`-r all`).
    All,
}

/// What a consistency check found, counted as `qemu-img check` counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Metadata errors that can lose data or break the image.
    pub corruptions: u64,
    /// Clusters allocated but unused: wasted space only.
    pub leaks: u64,
    /// Failures of the check itself (an unreadable table).
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Where the image's used clusters end in its file.
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// One line per finding, worded as QEMU words it.
    pub messages: Vec<String>,
}

/// An internal snapshot, as `qemu-img snapshot -l` and `info` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

/// One open layer of one format.
pub trait Driver: Send + Sync {
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// The backing file recorded in the image, if any.
    fn backing(&self) -> Option<BackingRef> {
        None
    }
    /// How `[offset, offset+len)` maps, as far as it maps one way.
    /// The caller guarantees `len >= 1` and the range within the virtual size.
    fn map(&self, offset: u64, len: u64) -> Result<Mapping>;
    /// Like `map`, for block status: may look deeper (raw asks the host
    /// file for holes), which the read path does not need to pay for.
    fn map_status(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.map(offset, len)
    }
    /// The storage behind a host file index returned by `map`.
    fn host_file(&self, file: HostFile) -> Option<&dyn Storage>;
    /// Decode bytes `map` called `Encoded`; `buf` never crosses a mapping.
    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(unsupported(format!("{} has no encoded clusters", self.format())))
    }
    /// Write guest bytes, allocating as needed and copying from `below`
    /// the parts of new clusters the write does not cover.
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()>;
    /// Make a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], offset + done, below)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Drop a range's data; what it reads afterwards is format-defined.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(unsupported(format!("discard is not supported for {}", self.format())))
    }
    /// Write back cached metadata and make everything durable.
    fn flush(&self) -> Result<()>;
    fn info(&self) -> Result<DriverInfo>;
    /// Change the virtual size.
    fn truncate(&self, size: u64) -> Result<()> {
        let _ = size;
        Err(unsupported(format!(
            "resizing {} images is not supported yet",
            self.format()
        )))
    }
    /// Flush and mark the image cleanly closed.
    fn close(&self) -> Result<()> {
        self.flush()
    }
    /// Check this layer's metadata, repairing as far as `repair` allows
    /// (only when open read-write). The counts are those found before the
    /// repair; the caller checks again to confirm it.
    fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _ = repair;
        Err(unsupported(format!("{} images cannot be checked", self.format())))
    }
    /// The internal snapshots, oldest first; none for formats without them.
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }
    /// Record the current state as a new internal snapshot named `name`.
    fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        let _ = name;
        Err(unsupported(format!("{} has no internal snapshots", self.format())))
    }
    /// Make the snapshot with this id or name the current state.
    fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let _ = id_or_name;
        Err(unsupported(format!("{} has no internal snapshots", self.format())))
    }
    /// Delete the snapshot with this id or name.
    fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        let _ = id_or_name;
        Err(unsupported(format!("{} has no internal snapshots", self.format())))
    }
    /// The size of the units this layer can store compressed (its cluster
    /// size), or None when it cannot.
    fn compressed_unit(&self) -> Option<u64> {
        None
    }
    /// Whether this layer stores every unit compressed (a streamOptimized
    /// vmdk): writers must then hand it whole units through
    /// [`Driver::write_compressed`], and `compress_unit` never says None.
    fn compressed_only(&self) -> bool {
        false
    }
    /// Encode one whole unit of guest bytes (the last unit of the disk may
    /// be shorter: it is padded with zeroes) for [`Driver::write_compressed`];
    /// None when it would not shrink and should be written plainly. Pure
    /// computation, so workers may call it in parallel.
    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = data;
        Err(unsupported(format!("{} cannot store compressed data", self.format())))
    }
    /// Store units `compress_unit` encoded, each at a unit-aligned guest
    /// offset, in one batch (one durability barrier for all of them).
    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        let _ = units;
        Err(unsupported(format!("{} cannot store compressed data", self.format())))
    }
    /// Make every cluster of this layer unallocated, so that it reads
    /// through to its backing file (after `commit`).
    fn make_empty(&self) -> Result<()> {
        Err(unsupported(format!("{} images cannot be emptied", self.format())))
    }
    /// Record another backing file (or none) in the image, without
    /// touching its data (`qemu-img rebase -u`). The open chain below is
    /// not reopened: the caller reopens the image to read through it.
    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        let _ = backing;
        Err(unsupported(format!(
            "{} images cannot change their backing file",
            self.format()
        )))
    }
}
