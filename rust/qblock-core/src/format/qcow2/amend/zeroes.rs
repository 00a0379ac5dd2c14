//! Zero clusters out of every L2 table, for a version 2 image, which has
//! no zero flag (docs/interop/qcow2.txt: "Cluster mapping", bit 0 of a
//! standard L2 entry, version 3 only).
//!
//! As QEMU does: a zero cluster without a host cluster becomes
//! unallocated when no backing file can show through, else a freshly
//! allocated cluster of zeroes; a zero cluster with a host cluster keeps
//! it, now filled with zeroes. Where that host cluster is also referenced
//! from elsewhere (a snapshot's data), it is left alone and a fresh
//! cluster is used instead, so no other view of the disk changes.
//!
//! Runs with the dirty bit set: new clusters are appended past the end of
//! the file with no refcount, and the caller recounts afterwards. Crash
//! order per L2 table: the zeroed clusters are written and flushed before
//! the table points at them, so the guest reads zeroes at every point.

use super::super::header::Header;
use super::super::repair::count_references;
use super::super::snapshot::read_table;
use super::super::types::*;
use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Result};
use std::collections::HashSet;

/// Every L1 table of the image: the active one, then each snapshot's.
fn l1_tables(file: &dyn Storage, h: &Header) -> Result<Vec<(u64, u64)>> {
    let mut out = vec![(h.l1_table_offset, u64::from(h.l1_size))];
    if h.nb_snapshots > 0 {
        let (snaps, _) = read_table(file, h, file.len()?)?;
        out.extend(snaps.iter().map(|s| (s.l1_table_offset, u64::from(s.l1_size))));
    }
    Ok(out)
}

/// The L2 tables of the image, each once, in the order first met.
fn l2_tables(file: &dyn Storage, h: &Header) -> Result<Vec<u64>> {
    let cs = h.cluster_size();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (off, size) in l1_tables(file, h)? {
        let mut raw = try_zeroed((size * 8) as usize, "L1 table")?; // checked at open: at most 32 MiB
        file.read_at(&mut raw, off)?;
        for c in raw.chunks_exact(8) {
            let l2 = be64(c, 0) & OFFSET_MASK;
            if l2 != 0 && seen.insert(l2) {
                if !l2.is_multiple_of(cs) {
                    return Err(corrupt(format!("L2 table at {l2:#x} is not cluster aligned")));
                }
                out.push(l2);
            }
        }
    }
    Ok(out)
}

/// Whether any L1 table maps a compressed cluster.
pub fn has_compressed(file: &dyn Storage, h: &Header) -> Result<bool> {
    let cs = h.cluster_size() as usize;
    let mut l2 = try_zeroed(cs, "L2 table")?;
    for off in l2_tables(file, h)? {
        file.read_at(&mut l2, off)?;
        if l2.chunks_exact(8).any(|e| be64(e, 0) & COMPRESSED != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Rewrite every zero cluster as described above. `backed`: the image has
/// a backing file. `report(done, total)` counts L2 tables.
pub fn expand(
    file: &dyn Storage,
    h: &Header,
    backed: bool,
    report: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let cs = h.cluster_size();
    let counts = count_references(file, h, h.l1_table_offset, u64::from(h.l1_size))?;
    let count = |off: u64| counts.get((off / cs) as usize).copied().unwrap_or(0);
    let tables = l2_tables(file, h)?;
    let mut next = align_up(file.len()?, cs)?;
    let zero = try_zeroed(cs as usize, "zero cluster")?;
    let mut l2 = try_zeroed(cs as usize, "L2 table")?;
    let total = tables.len() as u64;
    for (i, &l2_off) in tables.iter().enumerate() {
        report(i as u64, total)?;
        file.read_at(&mut l2, l2_off)?;
        // Shared tables count once per L1 table naming them; so do the
        // clusters they map.
        let shared = count(l2_off);
        let copied = if shared == 1 { COPIED } else { 0 };
        let mut zeroed = Vec::new();
        let mut changed = false;
        for e in l2.chunks_exact_mut(8) {
            let v = be64(e, 0);
            if v & COMPRESSED != 0 || v & ZERO_FLAG == 0 {
                continue;
            }
            let host = v & OFFSET_MASK;
            let new = if host != 0 && count(host) == shared {
                zeroed.push(host);
                host | copied
            } else if backed || host != 0 {
                zeroed.push(next);
                next += cs;
                (next - cs) | copied
            } else {
                0
            };
            e.copy_from_slice(&new.to_be_bytes());
            changed = true;
        }
        if !changed {
            continue;
        }
        for &z in &zeroed {
            file.write_at(&zero, z)?;
        }
        file.flush()?;
        file.write_at(&l2, l2_off)?;
        file.flush()?;
    }
    report(total, total)
}
