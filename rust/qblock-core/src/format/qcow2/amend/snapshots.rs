//! The snapshot table as a version change sees it (docs/interop/qcow2.txt:
//! "Snapshots"): each entry's VM state size and disk size, and the table
//! rewritten with complete version 3 extra data.
//!
//! Version 3 requires at least 16 bytes of extra data per snapshot (the
//! 64-bit VM state size and the disk size); a version 2 image may have
//! none, and then the disk size is the image's current size and the VM
//! state size the 32-bit field, as QEMU reads them.

use super::super::header::Header;
use super::super::snapshot::read_table;
use super::super::types::*;
use crate::backend::Storage;
use crate::error::{try_zeroed, Result};

/// Fixed part of a snapshot entry.
const FIXED: usize = 40;
/// The extra data QEMU writes: VM state size (64 bits), disk size, icount.
const EXTRA_V3: usize = 24;
/// What version 3 requires at least.
const EXTRA_MIN_V3: usize = 16;

/// One entry, split into its parts.
pub struct Entry {
    pub fixed: [u8; FIXED],
    pub extra: Vec<u8>,
    /// The id and name strings as they follow the extra data.
    pub strings: Vec<u8>,
}

impl Entry {
    pub fn vm_state_size(&self) -> u64 {
        if self.extra.len() >= 8 {
            be64(&self.extra, 0)
        } else {
            u64::from(be32(&self.fixed, 32))
        }
    }

    /// The disk size recorded, or `current` where the entry has none.
    pub fn disk_size(&self, current: u64) -> u64 {
        if self.extra.len() >= 16 {
            be64(&self.extra, 8)
        } else {
            current
        }
    }
}

/// Every entry of the table (already checked by `read_table`'s bounds).
pub fn entries(file: &dyn Storage, h: &Header) -> Result<Vec<Entry>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let (_, table_len) = read_table(file, h, file.len()?)?; // bounded at 64 MiB
    let mut raw = try_zeroed(table_len as usize, "snapshot table")?;
    file.read_at(&mut raw, h.snapshots_offset)?;
    let mut out = Vec::new();
    let mut p = 0usize;
    for _ in 0..h.nb_snapshots {
        let fixed: [u8; FIXED] = raw[p..p + FIXED].try_into().unwrap_or([0; FIXED]);
        let extra = be32(&fixed, 36) as usize;
        let strings = usize::from(be16(&fixed, 12)) + usize::from(be16(&fixed, 14));
        let e0 = p + FIXED;
        out.push(Entry {
            fixed,
            extra: raw[e0..e0 + extra].to_vec(),
            strings: raw[e0 + extra..e0 + extra + strings].to_vec(),
        });
        p = (e0 + extra + strings + 7) & !7;
    }
    Ok(out)
}

/// Whether any entry lacks what version 3 requires.
pub fn need_v3_update(entries: &[Entry]) -> bool {
    entries.iter().any(|e| e.extra.len() < EXTRA_MIN_V3)
}

/// The table with every entry's extra data made version 3 complete:
/// VM state size, disk size (`current` where missing) and icount (-1,
/// unknown, where missing); longer extra data is kept after them.
pub fn v3_table(entries: &[Entry], current: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut extra = e.extra.clone();
        if extra.len() < EXTRA_V3 {
            let mut full = vec![0u8; EXTRA_V3];
            full[..8].copy_from_slice(&e.vm_state_size().to_be_bytes());
            full[8..16].copy_from_slice(&e.disk_size(current).to_be_bytes());
            full[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // icount unknown
            extra = full;
        }
        let mut fixed = e.fixed;
        fixed[36..40].copy_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&e.strings);
        out.resize((out.len() + 7) & !7, 0);
    }
    out
}
