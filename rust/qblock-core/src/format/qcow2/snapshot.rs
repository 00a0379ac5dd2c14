//! The internal snapshot table (docs/interop/qcow2.txt: "Snapshots"). We
//! never change snapshots; we read the table at open to check it as QEMU
//! does, and to know which clusters snapshots use (refcount repair).

use super::header::Header;
use super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, Result};

/// QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the whole table is at most 64 MiB.
pub const MAX_SNAPSHOT_TABLE: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA.
pub const MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// Fixed part of a snapshot header.
const FIXED: u64 = 40;

#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
}

/// Read and check every snapshot header. Returns the snapshots and the
/// table's length in bytes. Reads are bounded by the caps above.
pub fn read_table(file: &dyn Storage, h: &Header, file_len: u64) -> Result<(Vec<Snapshot>, u64)> {
    let cs = h.cluster_size();
    let aligned_len = align_up(file_len, cs)?;
    let mut out = Vec::new();
    let mut p = 0u64; // offset within the table
    for i in 0..h.nb_snapshots {
        let mut fixed = [0u8; FIXED as usize];
        file.read_at(&mut fixed, h.snapshots_offset + p)?;
        let extra = u64::from(be32(&fixed, 36));
        let id = u64::from(be16(&fixed, 12));
        let name = u64::from(be16(&fixed, 14));
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(format!(
                "snapshot {i} claims {extra} bytes of extra data (at most 1024)"
            )));
        }
        p = align_up(p + FIXED + extra + id + name, 8)?;
        if p > MAX_SNAPSHOT_TABLE {
            return Err(corrupt("the snapshot table is larger than 64 MiB"));
        }
        if h.snapshots_offset.checked_add(p).is_none_or(|e| e > aligned_len) {
            return Err(corrupt(format!("snapshot {i} lies past the end of the file")));
        }
        let s = Snapshot {
            l1_table_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
        };
        let l1_bytes = u64::from(s.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "snapshot {i} has an L1 table of {} entries",
                s.l1_size
            )));
        }
        if l1_bytes > 0
            && (!s.l1_table_offset.is_multiple_of(cs)
                || s.l1_table_offset < cs
                || s.l1_table_offset.checked_add(l1_bytes).is_none_or(|e| e > aligned_len))
        {
            return Err(corrupt(format!(
                "snapshot {i} L1 table at {:#x} is invalid",
                s.l1_table_offset
            )));
        }
        out.push(s);
    }
    Ok((out, p))
}
