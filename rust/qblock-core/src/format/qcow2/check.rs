//! Consistency check and repair (`qemu-img check [-r leaks|all]`), per
//! docs/interop/qcow2.txt ("Host cluster management", "Cluster mapping",
//! "Copied flag"), classifying and wording what it finds as QEMU does.
//!
//! A walk counts every reference the metadata makes (header, L1/L2 tables
//! and the clusters they map, snapshots, the refcount table and blocks,
//! bitmaps), cluster by cluster; a range reaching a whole cluster or more
//! past the end of the file is a corruption and is not counted (QEMU's
//! rule: nothing is rebuilt for it). The counts are then compared with the stored refcounts: a stored
//! refcount above the count is a leak (wasted space), one below it a
//! corruption (a cluster that could be handed out twice). Last, the copied
//! flag of every L1 and L2 entry of the active table must say "refcount is
//! exactly 1".
//!
//! Repairs, crash order: a leak is fixed by lowering its refcount in place
//! and a corruption (`Repair::All`) by raising it; each is safe alone at any
//! point. When a stored refcount is 0 under a used cluster (or the refcount
//! structure itself is damaged), `Repair::All` writes a whole new structure
//! past the last used cluster, then switches the header to it
//! (`repair::write_refcounts`): a crash before the switch leaves the old
//! structure in force. `Repair::All` also turns a misaligned preallocated
//! zero cluster into a plain zero cluster. Copied flags are fixed last, from
//! the refcounts now on disk. A repaired image with no corruption left is marked clean (the
//! dirty and corrupt bits cleared after a flush).

use super::header::{Header, OFF_INCOMPAT};
use super::refcount::{byte_range, get_entry, set_entry};
use super::repair::{self, RefSink, MAX_REPAIR_CLUSTERS, MAX_REPAIR_READ};
use super::snapshot;
use super::types::*;
use super::Qcow2;
use crate::backend::Storage;
use crate::driver::{CheckReport, Repair};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Findings kept as messages: QEMU prints every one, but a hostile image
/// can have millions; the counts stay exact.
const MAX_MESSAGES: usize = 10_000;
/// Distinct clusters past the end of the file that references may name
/// (each costs a map entry). Only the cluster a range ends in may lie past
/// the end (see `Walk::add`), so this is a guard, never reached by QEMU's
/// rules.
const MAX_BEYOND: usize = 1 << 20;
/// Stored refcounts past the end of the file the comparison looks at (only
/// refcount blocks under references past the end are read there): a guard
/// like `MAX_BEYOND`.
const MAX_BEYOND_VISITS: u64 = 1 << 26;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED: u64 = 0x1ff;

fn say(rep: &mut CheckReport, msg: impl Into<String>) {
    if rep.messages.len() < MAX_MESSAGES {
        rep.messages.push(msg.into());
    }
}

fn corruption(rep: &mut CheckReport, msg: impl Into<String>) {
    rep.corruptions += 1;
    say(rep, msg);
}

/// References per cluster: dense over the file, sparse past its end (the
/// last cluster of a range may reach past a file whose tail is unwritten).
#[derive(Default)]
struct Refs {
    dense: Vec<u32>,
    beyond: BTreeMap<u64, u32>,
}

impl Refs {
    fn get(&self, c: u64) -> u32 {
        match usize::try_from(c).ok().and_then(|i| self.dense.get(i)) {
            Some(&n) => n,
            None => self.beyond.get(&c).copied().unwrap_or(0),
        }
    }

    /// Clusters the comparison covers: the file, and as far as references reach.
    fn limit(&self) -> u64 {
        let n = self.dense.len() as u64;
        self.beyond.keys().next_back().map_or(n, |&c| n.max(c + 1))
    }

    /// The referenced clusters in `[lo, hi)`, with their counts.
    fn used_in(&self, lo: u64, hi: u64) -> Vec<(u64, u32)> {
        let n = self.dense.len() as u64;
        let mut out: Vec<(u64, u32)> = (lo.min(n)..hi.min(n))
            .map(|c| (c, self.dense[c as usize]))
            .filter(|&(_, r)| r > 0)
            .collect();
        out.extend(self.beyond.range(lo.max(n)..hi.max(n)).map(|(&c, &r)| (c, r)));
        out
    }
}

/// One walk over the metadata: the references it makes and the damage seen
/// on the way.
struct Walk<'a> {
    file: &'a dyn Storage,
    g: Geometry,
    data_file: bool,
    file_len: u64,
    /// The largest count this image's refcount width holds (QEMU counts in
    /// that width too, and calls a count beyond it an overflow).
    max_ref: u32,
    refs: Refs,
    read: u64,
    rep: CheckReport,
    /// The refcount structure needs rewriting from scratch.
    rebuild: bool,
    /// Metadata other than L2 tables, for the overlap check before a
    /// repair writes into an L2 table.
    meta: Vec<(u64, u64)>,
    /// Clusters of the refcount table and blocks, once per reference: a
    /// rebuild does not carry them over.
    refcount_clusters: Vec<u64>,
    /// Repair what the walk itself can (`Repair::All`).
    fix_errors: bool,
    /// Metadata known before the walk (sorted, with running maximum ends):
    /// the walk never writes an L2 entry into it.
    protect: Ranges,
    /// L2 tables the walk changed.
    fixed_l2: Vec<u64>,
}

impl RefSink for Walk<'_> {
    fn add(&mut self, off: u64, len: u64, _what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // As QEMU: the last cluster may be partly past the end of the file
        // (a write may not have filled it yet), but a range reaching a
        // whole cluster or more past it is a corruption and is not counted.
        let end = match off.checked_add(len) {
            Some(e) if e < self.file_len.saturating_add(self.g.cluster_size) => e - 1,
            _ => {
                corruption(
                    &mut self.rep,
                    format!(
                        "ERROR: counting reference for region exceeding the end of the file by one cluster \
                         or more: offset {off:#x} size {len:#x}"
                    ),
                );
                return Ok(());
            }
        };
        let cb = self.g.cluster_bits;
        for c in (off >> cb)..=(end >> cb) {
            let max = self.max_ref;
            let slot = match usize::try_from(c).ok().filter(|&i| i < self.refs.dense.len()) {
                Some(i) => &mut self.refs.dense[i],
                None => {
                    if self.refs.beyond.len() >= MAX_BEYOND && !self.refs.beyond.contains_key(&c) {
                        return Err(corrupt(format!(
                            "more than {MAX_BEYOND} clusters past the end of the file are referenced"
                        )));
                    }
                    self.refs.beyond.entry(c).or_insert(0)
                }
            };
            let full = *slot >= max;
            if !full {
                *slot += 1;
            }
            if full {
                corruption(&mut self.rep, format!("ERROR: overflow cluster offset={:#x}", c << cb));
            }
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.read += bytes;
        if self.read > MAX_REPAIR_READ {
            return Err(unsupported("checking this image needs more than 2 GiB of table reads"));
        }
        Ok(())
    }
}

impl<'a> Walk<'a> {
    fn new(file: &'a dyn Storage, g: &Geometry, h: &Header) -> Result<Walk<'a>> {
        let file_len = file.len()?;
        let nclusters = align_up(file_len, g.cluster_size)? >> g.cluster_bits;
        if nclusters > MAX_REPAIR_CLUSTERS {
            return Err(unsupported(format!(
                "images of more than {MAX_REPAIR_CLUSTERS} clusters cannot be checked yet"
            )));
        }
        let mut dense = Vec::new();
        dense
            .try_reserve_exact(nclusters as usize)
            .map_err(|_| Error::NoMemory("refcount check".into()))?;
        dense.resize(nclusters as usize, 0u32);
        let max_ref = if h.refcount_order >= 5 {
            u32::MAX
        } else {
            (1u32 << (1u32 << h.refcount_order)) - 1
        };
        Ok(Walk {
            file,
            g: *g,
            data_file: h.data_file.is_some(),
            file_len,
            max_ref,
            refs: Refs {
                dense,
                beyond: BTreeMap::new(),
            },
            read: 0,
            rep: CheckReport::default(),
            rebuild: false,
            meta: Vec::new(),
            refcount_clusters: Vec::new(),
            fix_errors: false,
            protect: Ranges::default(),
            fixed_l2: Vec::new(),
        })
    }

    fn read_table(&mut self, off: u64, len: u64) -> Result<Vec<u8>> {
        self.charge(len)?;
        let mut t = try_zeroed(len as usize, "metadata table")?;
        self.file.read_at(&mut t, off)?;
        Ok(t)
    }

    /// Everything QEMU counts, in its order: header, active L1/L2,
    /// snapshots, refcount table, bitmaps, refcount blocks.
    fn walk(&mut self, h: &Header, l1: (u64, u64), reftable: &[u64], fix_errors: bool) -> Result<()> {
        let cs = self.g.cluster_size;
        self.fix_errors = fix_errors;
        if fix_errors {
            let mut known = vec![(0, cs), (l1.0, l1.0 + l1.1 * 8)];
            known.push((
                h.refcount_table_offset,
                h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs,
            ));
            known.extend(
                reftable
                    .iter()
                    .map(|e| e & REFT_OFFSET_MASK)
                    .filter(|&o| o != 0)
                    .map(|o| (o, o.saturating_add(cs))),
            );
            if h.nb_snapshots > 0 {
                let (snaps, len) = snapshot::read_table(self.file, h, self.file.len()?)?;
                known.push((h.snapshots_offset, h.snapshots_offset + len));
                known.extend(
                    snaps
                        .iter()
                        .map(|s| (s.l1_table_offset, s.l1_table_offset + u64::from(s.l1_size) * 8)),
                );
            }
            self.protect = Ranges::new(known);
        }
        self.add(0, cs, "header")?;
        self.meta.push((0, cs));
        self.l1(l1.0, l1.1, true)?;
        if self.data_file && h.nb_snapshots > 0 {
            corruption(
                &mut self.rep,
                format!("ERROR {} snapshots in image with data file", h.nb_snapshots),
            );
        }
        if h.nb_snapshots > 0 {
            let (snaps, len) = snapshot::read_table(self.file, h, self.file.len()?)?;
            for sn in &snaps {
                self.l1(sn.l1_table_offset, u64::from(sn.l1_size), false)?;
            }
            self.add(h.snapshots_offset, len, "snapshot table")?;
            self.meta.push((h.snapshots_offset, h.snapshots_offset + len));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        self.add(h.refcount_table_offset, rt_bytes, "refcount table")?;
        self.meta
            .push((h.refcount_table_offset, h.refcount_table_offset + rt_bytes));
        let first = h.refcount_table_offset >> self.g.cluster_bits;
        self.refcount_clusters
            .extend(first..first + u64::from(h.refcount_table_clusters));
        // QEMU ignores the bitmaps of an image whose autoclear bit says a
        // program without bitmap support changed it.
        if let (Some(b), true) = (&h.bitmaps, h.autoclear & AUTOCLEAR_BITMAPS != 0) {
            repair::bitmap_refs(self.file, b, cs, self)?;
            self.meta
                .push((b.directory_offset, b.directory_offset.saturating_add(b.directory_size)));
        }
        self.refblocks(reftable, fix_errors)
    }

    fn l1(&mut self, off: u64, entries: u64, active: bool) -> Result<()> {
        let bytes = entries * 8; // at most 32 MiB: checked at open
        if bytes == 0 {
            return Ok(());
        }
        self.add(off, bytes, "L1 table")?;
        self.meta.push((off, off + bytes));
        let raw = self.read_table(off, bytes)?;
        let cs = self.g.cluster_size;
        for c in raw.chunks_exact(8) {
            let e = be64(c, 0);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED != 0 {
                corruption(
                    &mut self.rep,
                    format!("ERROR found L1 entry with reserved bits set: {e:x}"),
                );
            }
            let l2 = e & OFFSET_MASK;
            self.add(l2, cs, "L2 table")?;
            if l2 & (cs - 1) != 0 {
                corruption(
                    &mut self.rep,
                    format!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"),
                );
            }
            self.l2(l2, active)?;
        }
        Ok(())
    }

    /// One L2 table; the statistics count the active table only.
    fn l2(&mut self, off: u64, active: bool) -> Result<()> {
        let cs = self.g.cluster_size;
        let t = self.read_table(off, cs)?;
        let w = self.g.words();
        let mut next = 0u64;
        for (i, ent) in t.chunks_exact(8 * w).enumerate() {
            let mut e = be64(ent, 0);
            let bm = if self.g.extended { be64(ent, 8) } else { 0 };
            if e & COMPRESSED != 0 {
                if e & COPIED != 0 {
                    let coff = e & ((1u64 << self.g.csize_shift) - 1);
                    corruption(
                        &mut self.rep,
                        format!("ERROR: coffset=0x{coff:x}: copied flag must never be set for compressed clusters"),
                    );
                    e &= !COPIED;
                }
                if self.data_file {
                    corruption(
                        &mut self.rep,
                        format!("ERROR compressed cluster {i} with data file, entry=0x{e:x}"),
                    );
                    continue;
                }
                if bm != 0 {
                    corruption(
                        &mut self.rep,
                        format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e:x}"
                        ),
                    );
                    continue;
                }
                let (o, n) = self.g.compressed(e);
                self.add(o, n, "compressed cluster")?;
                if active {
                    // Compressed clusters count as fragmented, as in QEMU.
                    bump(&mut self.rep.allocated_clusters);
                    bump(&mut self.rep.compressed_clusters);
                    bump(&mut self.rep.fragmented_clusters);
                }
                continue;
            }
            let Some(zero) = host_cluster(&self.g, e, self.data_file) else {
                if bm & 0xffff_ffff != 0 {
                    corruption(
                        &mut self.rep,
                        "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap",
                    );
                }
                continue;
            };
            let host = e & OFFSET_MASK;
            if (bm >> 32) & bm != 0 {
                corruption(
                    &mut self.rep,
                    format!("ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"),
                );
            }
            if host & (cs - 1) != 0 {
                let what = if zero { "Preallocated" } else { "Data" };
                if zero && self.fix_errors && off & (cs - 1) == 0 && off >= cs && !self.protect.meets(off, cs) {
                    // As QEMU: the entry becomes a plain zero cluster (what
                    // it named becomes unused: a leak at worst).
                    say(
                        &mut self.rep,
                        format!(
                            "Repairing offset={host:x}: {what} cluster is not properly aligned; L2 entry corrupted."
                        ),
                    );
                    self.file.write_at(&ZERO_FLAG.to_be_bytes(), off + (i * 8 * w) as u64)?;
                    self.file.flush()?;
                    self.rep.corruptions_fixed += 1;
                    self.fixed_l2.push(off);
                    continue;
                }
                corruption(
                    &mut self.rep,
                    format!("ERROR offset={host:x}: {what} cluster is not properly aligned; L2 entry corrupted."),
                );
            }
            if active {
                bump(&mut self.rep.allocated_clusters);
                if next != 0 && host != next {
                    bump(&mut self.rep.fragmented_clusters);
                }
                next = host + cs;
            }
            if !self.data_file {
                self.add(host, cs, "data cluster")?;
            }
        }
        Ok(())
    }

    /// The refcount blocks: each a reference, each counted exactly once.
    fn refblocks(&mut self, table: &[u64], fix_errors: bool) -> Result<()> {
        let (cs, cb) = (self.g.cluster_size, self.g.cluster_bits);
        for (i, &e) in table.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if e & REFT_RESERVED != 0 {
                corruption(
                    &mut self.rep,
                    format!("ERROR refcount table entry {i} has reserved bits set"),
                );
                self.rebuild = true;
                continue;
            }
            if off & (cs - 1) != 0 {
                corruption(
                    &mut self.rep,
                    format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"),
                );
                self.rebuild = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            if off >> cb >= self.refs.limit() {
                // QEMU grows the file to cover the block; a rebuild replaces it.
                let verb = if fix_errors { "Repairing" } else { "ERROR" };
                corruption(&mut self.rep, format!("{verb} refcount block {i} is outside image"));
                self.rebuild |= fix_errors;
                continue;
            }
            self.add(off, cs, "refcount block")?;
            self.meta.push((off, off + cs));
            self.refcount_clusters.push(off >> cb);
            let n = self.refs.get(off >> cb);
            if n != 1 {
                corruption(&mut self.rep, format!("ERROR refcount block {i} refcount={n}"));
                self.rebuild = true;
            }
        }
        Ok(())
    }

    /// The counts a rebuilt structure records: every reference, minus
    /// those of the old refcount structure, over as many clusters as
    /// references reach.
    fn rebuild_counts(self) -> Result<Vec<u32>> {
        let limit = self.refs.limit();
        if limit > MAX_REPAIR_CLUSTERS {
            return Err(unsupported(
                "cannot rebuild the refcounts: references reach too far past the end of the file",
            ));
        }
        let mut counts = self.refs.dense;
        counts
            .try_reserve_exact(limit as usize - counts.len())
            .map_err(|_| Error::NoMemory("refcount rebuild".into()))?;
        counts.resize(limit as usize, 0);
        for (c, n) in self.refs.beyond {
            counts[c as usize] = n;
        }
        for c in self.refcount_clusters {
            if let Some(n) = counts.get_mut(c as usize) {
                *n = n.saturating_sub(1);
            }
        }
        Ok(counts)
    }
}

fn bump(v: &mut Option<u64>) {
    *v = Some(v.unwrap_or(0) + 1);
}

/// Whether an uncompressed L2 entry holds a host cluster (QEMU's "normal"
/// and "zero, allocated" types): `Some(zero flag)`, or None when it holds
/// none. With a data file, offset 0 is a real cluster when the copied flag
/// says so (the spec's exception).
fn host_cluster(g: &Geometry, e: u64, data_file: bool) -> Option<bool> {
    let zero = e & ZERO_FLAG != 0 && !g.extended;
    let host = e & OFFSET_MASK != 0 || (!zero && data_file && e & COPIED != 0);
    host.then_some(zero)
}

/// Where a refcount block is, by its table entry.
enum Place {
    Missing,
    /// Not cluster aligned: its refcounts cannot be read.
    Unaligned,
    At(u64),
}

/// The refcounts as stored on disk, one block at a time; a repair changes
/// entries in the current block and writes them back when moving on.
struct Stored<'a> {
    file: &'a dyn Storage,
    cluster_bits: u32,
    order: u32,
    epb_bits: u32,
    table: Vec<u64>,
    block: Option<(u64, Vec<u8>)>,
    /// Bytes of the current block a repair changed, not yet written.
    dirty: Option<(usize, usize)>,
    read: u64,
}

impl<'a> Stored<'a> {
    fn load(file: &'a dyn Storage, h: &Header) -> Result<Stored<'a>> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs; // capped by disk_header
        let mut raw = try_zeroed(bytes as usize, "refcount table")?;
        file.read_at(&mut raw, h.refcount_table_offset)?;
        Ok(Stored {
            file,
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            epb_bits: h.cluster_bits + 3 - h.refcount_order,
            table: raw.chunks_exact(8).map(|c| be64(c, 0)).collect(),
            block: None,
            dirty: None,
            read: 0,
        })
    }

    fn place(&self, bi: u64) -> Place {
        let off = usize::try_from(bi)
            .ok()
            .and_then(|i| self.table.get(i))
            .map_or(0, |e| e & REFT_OFFSET_MASK);
        if off == 0 {
            Place::Missing
        } else if off & ((1 << self.cluster_bits) - 1) != 0 {
            Place::Unaligned
        } else {
            Place::At(off)
        }
    }

    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.read += bytes;
        if self.read > MAX_REPAIR_READ {
            return Err(unsupported(
                "checking this image needs more than 2 GiB of refcount reads",
            ));
        }
        Ok(())
    }

    /// Make the block at `off` current (a block past the end of the file
    /// reads as zeroes, as in QEMU).
    fn open(&mut self, off: u64) -> Result<()> {
        if self.block.as_ref().is_some_and(|(o, _)| *o == off) {
            return Ok(());
        }
        self.write_back()?;
        let cs = 1u64 << self.cluster_bits;
        self.charge(cs)?;
        let mut b = try_zeroed(cs as usize, "refcount block")?;
        self.file.read_at(&mut b, off)?;
        self.block = Some((off, b));
        Ok(())
    }

    /// Entry `i` of the current block.
    fn entry(&self, i: usize) -> u64 {
        self.block.as_ref().map_or(0, |(_, b)| get_entry(b, i, self.order))
    }

    /// The stored refcount of a cluster; None when it cannot be read.
    fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
        match self.place(cluster >> self.epb_bits) {
            Place::Missing => Ok(Some(0)),
            Place::Unaligned => Ok(None),
            Place::At(off) => {
                self.open(off)?;
                Ok(Some(self.entry((cluster & ((1 << self.epb_bits) - 1)) as usize)))
            }
        }
    }

    /// Change the refcount of a cluster whose block exists.
    fn set(&mut self, cluster: u64, v: u64) -> Result<()> {
        let Place::At(off) = self.place(cluster >> self.epb_bits) else {
            return Err(Error::Internal(format!(
                "cluster {cluster} has no refcount block to repair"
            )));
        };
        self.open(off)?;
        let i = (cluster & ((1 << self.epb_bits) - 1)) as usize;
        let order = self.order;
        if let Some((_, b)) = self.block.as_mut() {
            set_entry(b, i, order, v);
        }
        let (b0, b1) = byte_range(i, i, order);
        self.dirty = Some(self.dirty.map_or((b0, b1), |(a, b)| (a.min(b0), b.max(b1))));
        Ok(())
    }

    fn write_back(&mut self) -> Result<()> {
        if let (Some((a, b)), Some((off, buf))) = (self.dirty.take(), &self.block) {
            self.file.write_at(&buf[a..b], off + a as u64)?;
        }
        Ok(())
    }
}

/// Compare counted references with stored refcounts over every cluster
/// either reaches, fixing what `fix` allows (QEMU's rules: a refcount above
/// the count is a leak, below it a corruption; a refcount of 0 under a used
/// cluster can only be fixed by a rebuild). Returns the highest cluster in
/// use by either.
fn compare(refs: &Refs, st: &mut Stored, fix: Repair, rep: &mut CheckReport, rebuild: &mut bool) -> Result<u64> {
    let n = refs.dense.len() as u64;
    let limit = refs.limit();
    let eb = st.epb_bits;
    let mut blocks: Vec<u64> = (0..n.div_ceil(1 << eb)).collect();
    for (bi, &e) in st.table.iter().enumerate() {
        let lo = (bi as u64) << eb;
        if e & REFT_OFFSET_MASK != 0 && lo >= n && lo < limit {
            blocks.push(bi as u64);
        }
    }
    blocks.extend(refs.beyond.keys().map(|c| c >> eb));
    blocks.sort_unstable();
    blocks.dedup();
    let mut t = Tally {
        rep,
        rebuild,
        fix,
        highest: 0,
    };
    let mut visits = 0u64;
    for bi in blocks {
        let lo = bi << eb;
        let hi = ((bi + 1) << eb).min(limit);
        match st.place(bi) {
            Place::At(off) => {
                st.open(off)?;
                for c in lo..hi {
                    if c >= n {
                        visits += 1;
                        if visits > MAX_BEYOND_VISITS {
                            return Err(corrupt("too many refcounts past the end of the file to check"));
                        }
                    }
                    let s = st.entry((c - lo) as usize);
                    t.one(st, c, s, refs.get(c))?;
                }
            }
            Place::Missing => {
                for (c, r) in refs.used_in(lo, hi) {
                    t.one(st, c, 0, r)?;
                }
            }
            Place::Unaligned => {
                // QEMU fails to read each of these refcounts.
                t.rep.check_errors += hi - lo;
                for c in lo..hi.min(lo + MAX_MESSAGES as u64) {
                    say(t.rep, format!("Can't get refcount for cluster {c}: Input/output error"));
                }
            }
        }
    }
    st.write_back()?;
    Ok(t.highest)
}

/// The running result of one comparison.
struct Tally<'r> {
    rep: &'r mut CheckReport,
    rebuild: &'r mut bool,
    fix: Repair,
    highest: u64,
}

impl Tally<'_> {
    /// Cluster `c`: stored refcount `s`, counted references `r`.
    fn one(&mut self, st: &mut Stored, c: u64, s: u64, r: u32) -> Result<()> {
        if s > 0 || r > 0 {
            self.highest = c;
        }
        let r64 = u64::from(r);
        if s == r64 {
            return Ok(());
        }
        if s == 0 {
            *self.rebuild = true;
        }
        let fixing = s != 0 && ((s > r64 && self.fix != Repair::None) || (s < r64 && self.fix == Repair::All));
        let verb = if fixing {
            "Repairing"
        } else if s < r64 {
            "ERROR"
        } else {
            "Leaked"
        };
        say(self.rep, format!("{verb} cluster {c} refcount={s} reference={r}"));
        match (fixing, s > r64) {
            (true, true) => self.rep.leaks_fixed += 1,
            (true, false) => self.rep.corruptions_fixed += 1,
            (false, true) => self.rep.leaks += 1,
            (false, false) => self.rep.corruptions += 1,
        }
        if fixing {
            st.set(c, r64)?;
        }
        Ok(())
    }
}

/// Repairs of the copied flags: L1 entries rewritten, L2 tables changed.
#[derive(Default)]
struct CopiedFixes {
    l1: Vec<(usize, u64)>,
    l2: Vec<u64>,
}

/// Byte ranges of metadata, sorted, with the running maximum of their ends
/// (they may overlap each other in a damaged image).
#[derive(Default)]
struct Ranges {
    ranges: Vec<(u64, u64)>,
    ends: Vec<u64>,
}

impl Ranges {
    fn new(mut ranges: Vec<(u64, u64)>) -> Ranges {
        ranges.sort_unstable();
        let ends = ranges
            .iter()
            .scan(0u64, |m, r| {
                *m = (*m).max(r.1);
                Some(*m)
            })
            .collect();
        Ranges { ranges, ends }
    }

    /// Whether `[off, off+len)` meets any of them.
    fn meets(&self, off: u64, len: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.0 < off.saturating_add(len));
        i > 0 && self.ends[i - 1] > off
    }
}

impl Qcow2 {
    /// [`crate::driver::Driver::check`] for qcow2.
    pub(super) fn check_impl(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && self.read_only {
            return Err(invalid("a repair needs the image open read-write"));
        }
        // Writers wait meanwhile. Reserved clusters are given back first
        // (they would show as leaks), and the allocation state is dropped:
        // the next write reloads it from what the check leaves on disk.
        let mut alloc = self.alloc.lock();
        if !self.read_only {
            self.release_locked(&mut alloc)?;
        }
        *alloc = None;
        let r = self.check_locked(repair);
        let end = align_up(self.file.len()?, self.g.cluster_size)?;
        self.file_end.fetch_max(end, Ordering::Relaxed);
        r
    }

    fn check_locked(&self, repair: Repair) -> Result<CheckReport> {
        let file = self.file.as_ref();
        let cs = self.g.cluster_size;
        let h = self.disk_header()?;
        let l1 = {
            let l1 = self.l1.read();
            (l1.offset, l1.entries.len() as u64)
        };
        let mut st = Stored::load(file, &h)?;
        let mut w = Walk::new(file, &self.g, &h)?;
        let table = std::mem::take(&mut st.table);
        w.walk(&h, l1, &table, repair == Repair::All)?;
        st.table = table;
        let mut rep = std::mem::take(&mut w.rep);
        let mut rebuild = w.rebuild;
        let pre = rep.clone();
        let mut highest = compare(&w.refs, &mut st, Repair::None, &mut rep, &mut rebuild)?;
        let mut meta = std::mem::take(&mut w.meta);
        let walk_fixed = std::mem::take(&mut w.fixed_l2);
        if rebuild && repair == Repair::All {
            say(&mut rep, "Rebuilding refcount structure");
            let (old_corruptions, old_leaks) = (rep.corruptions, rep.leaks);
            let counts = w.rebuild_counts()?;
            let mut hh = h.clone();
            repair::write_refcounts(file, &mut hh, &counts)?;
            drop(counts);
            // Count again against the new structure: what is left is what
            // the rebuild could not fix (misaligned entries, overflows).
            let h2 = self.disk_header()?;
            st = Stored::load(file, &h2)?;
            let mut w2 = Walk::new(file, &self.g, &h2)?;
            let table = std::mem::take(&mut st.table);
            w2.walk(&h2, l1, &table, false)?;
            st.table = table;
            let after = std::mem::take(&mut w2.rep);
            let mut fresh = CheckReport::default();
            let mut again = false;
            highest = compare(&w2.refs, &mut st, Repair::Leaks, &mut fresh, &mut again)?;
            rep.messages.extend(after.messages);
            rep.messages.extend(fresh.messages);
            if again {
                say(&mut rep, "ERROR rebuilt refcount structure is still broken");
            }
            rep.corruptions_fixed += old_corruptions.saturating_sub(after.corruptions);
            rep.leaks_fixed += old_leaks;
            rep.corruptions = after.corruptions;
            rep.leaks = fresh.leaks;
            rep.check_errors += after.check_errors + fresh.check_errors;
            meta = w2.meta;
        } else if repair != Repair::None {
            if rebuild {
                // QEMU fails the same way (after printing its findings).
                return Err(corrupt(format!(
                    "need to rebuild refcount structures, which only a repair of all errors does \
                     ({} errors and {} leaked clusters found)",
                    rep.corruptions, rep.leaks
                )));
            }
            if rep.leaks > 0 || rep.corruptions > 0 {
                // Again, fixing this time (QEMU's messages of both passes).
                let msgs = std::mem::take(&mut rep.messages);
                rep = pre;
                rep.messages = msgs;
                highest = compare(&w.refs, &mut st, repair, &mut rep, &mut rebuild)?;
            }
        }
        let fix_copied = match repair {
            Repair::All => true,
            // Only when the refcounts are now known to be right.
            Repair::Leaks => rep.check_errors == 0 && rep.corruptions == 0 && rep.leaks == 0,
            Repair::None => false,
        };
        let fixes = self.check_copied(&mut st, l1, fix_copied, &Ranges::new(meta), &mut rep)?;
        {
            let mut l1m = self.l1.write();
            for (i, e) in fixes.l1 {
                if let Some(slot) = l1m.entries.get_mut(i).filter(|s| **s != super::cluster::DAMAGED_L1) {
                    *slot = e;
                }
            }
        }
        for t in fixes.l2.into_iter().chain(walk_fixed) {
            self.l2.forget(t);
        }
        rep.image_end_offset = Some((highest + 1) * cs);
        rep.total_clusters = Some(self.size.load(Ordering::Relaxed).div_ceil(cs));
        for v in [
            &mut rep.allocated_clusters,
            &mut rep.fragmented_clusters,
            &mut rep.compressed_clusters,
        ] {
            v.get_or_insert(0);
        }
        if repair != Repair::None && rep.check_errors == 0 && rep.corruptions == 0 {
            self.mark_clean()?;
        }
        if rep.messages.len() >= MAX_MESSAGES {
            rep.messages
                .push(format!("(only the first {MAX_MESSAGES} findings are listed)"));
        }
        Ok(rep)
    }

    /// The copied flag of every active L1 and L2 entry against the stored
    /// refcounts (QEMU's check_oflag_copied), fixed when `fix`.
    fn check_copied(
        &self,
        st: &mut Stored,
        l1: (u64, u64),
        fix: bool,
        meta: &Ranges,
        rep: &mut CheckReport,
    ) -> Result<CopiedFixes> {
        let file = self.file.as_ref();
        let (cs, cb) = (self.g.cluster_size, self.g.cluster_bits);
        let data_file = self.hdr.data_file.is_some();
        let verb = if fix { "Repairing" } else { "ERROR" };
        let mut out = CopiedFixes::default();
        st.charge(l1.1 * 8)?;
        let mut raw = try_zeroed((l1.1 * 8) as usize, "L1 table")?;
        file.read_at(&mut raw, l1.0)?;
        let mut t = try_zeroed(cs as usize, "L2 table")?;
        let w = self.g.words();
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let l1e = be64(c, 0);
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Some(rc) = st.get(l2 >> cb)? else { continue };
            if (rc == 1) != (l1e & COPIED != 0) {
                corruption(
                    rep,
                    format!("{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"),
                );
                if fix {
                    let ne = if rc == 1 { l1e | COPIED } else { l1e & !COPIED };
                    file.write_at(&ne.to_be_bytes(), l1.0 + i as u64 * 8)?;
                    out.l1.push((i, ne));
                    rep.corruptions -= 1;
                    rep.corruptions_fixed += 1;
                }
            }
            st.charge(cs)?;
            file.read_at(&mut t, l2)?;
            let mut changed: Vec<(usize, u64)> = Vec::new();
            for (j, ent) in t.chunks_exact(8 * w).enumerate() {
                let e = be64(ent, 0);
                if e & COMPRESSED != 0 || host_cluster(&self.g, e, data_file).is_none() {
                    continue;
                }
                let rc = if data_file {
                    1
                } else {
                    match st.get((e & OFFSET_MASK) >> cb)? {
                        Some(v) => v,
                        None => continue,
                    }
                };
                if (rc == 1) != (e & COPIED != 0) {
                    corruption(
                        rep,
                        format!("{verb} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"),
                    );
                    if fix {
                        changed.push((j, if rc == 1 { e | COPIED } else { e & !COPIED }));
                    }
                }
            }
            if changed.is_empty() {
                continue;
            }
            // Never write into other metadata through a damaged L1 entry.
            if l2 & (cs - 1) != 0 || meta.meets(l2, cs) {
                rep.check_errors += 1;
                say(rep, "ERROR: Could not write L2 table; metadata overlap check failed");
                break;
            }
            for &(j, ne) in &changed {
                file.write_at(&ne.to_be_bytes(), l2 + (j * 8 * w) as u64)?;
            }
            rep.corruptions -= changed.len() as u64;
            rep.corruptions_fixed += changed.len() as u64;
            out.l2.push(l2);
        }
        Ok(out)
    }

    /// The header as it is on disk now: the fields a check, a repair or a
    /// write may have changed since the open, read again and bounded as at
    /// open; the extensions as the open found them.
    pub(super) fn disk_header(&self) -> Result<Header> {
        let mut head = [0u8; V3_HEADER_LEN_FULL as usize];
        self.file.read_at(&mut head, 0)?;
        let len = self.file.len()?;
        let fresh = Header::parse_fixed(&head, len)?;
        let mut h = self.hdr.clone();
        h.refcount_table_offset = fresh.refcount_table_offset;
        h.refcount_table_clusters = fresh.refcount_table_clusters;
        h.nb_snapshots = fresh.nb_snapshots;
        h.snapshots_offset = fresh.snapshots_offset;
        h.incompatible = fresh.incompatible;
        let cs = h.cluster_size();
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        let rt_end = h.refcount_table_offset.checked_add(rt_bytes);
        if h.refcount_table_clusters == 0
            || rt_bytes > MAX_REFTABLE_BYTES
            || h.refcount_table_offset & (cs - 1) != 0
            || h.refcount_table_offset == 0
            || rt_end.is_none_or(|e| e > align_up(len, cs).unwrap_or(u64::MAX))
        {
            return Err(corrupt(format!(
                "refcount table at {:#x} of {} clusters is invalid",
                h.refcount_table_offset, h.refcount_table_clusters
            )));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!("{} snapshots exceed the cap", h.nb_snapshots)));
        }
        Ok(h)
    }

    /// After a repair that left no corruption: clear the dirty and corrupt
    /// bits (version 3 only has them), once the repairs are durable.
    fn mark_clean(&self) -> Result<()> {
        let h = self.disk_header()?;
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if h.version >= 3 && h.incompatible & bits != 0 {
            self.file.flush()?;
            self.file
                .write_at(&(h.incompatible & !bits).to_be_bytes(), OFF_INCOMPAT)?;
        }
        self.file.flush()?;
        self.stale.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{base, open_bytes_ctx};
    use super::*;
    use crate::driver::Driver;

    const CS: usize = 512;

    fn check(b: Vec<u8>, repair: Repair) -> (CheckReport, Vec<u8>) {
        let (img, store) = open_bytes_ctx(b, repair == Repair::None, true).unwrap();
        let r = img.check(repair).unwrap();
        drop(img);
        (r, store.snapshot())
    }

    #[test]
    fn a_valid_image_is_clean() {
        let (r, _) = check(base(), Repair::None);
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
        assert_eq!(r.image_end_offset, Some(6 * CS as u64));
        assert_eq!(r.allocated_clusters, Some(1));
        assert_eq!(r.total_clusters, Some((1 << 20) / CS as u64));
    }

    #[test]
    fn a_leak_is_reported_then_repaired() {
        let mut b = base();
        b.resize(7 * CS, 0);
        b[2 * CS + 2 * 6 + 1] = 1; // cluster 6: refcount 1, no reference
        let (r, _) = check(b.clone(), Repair::None);
        assert_eq!((r.corruptions, r.leaks), (0, 1));
        assert_eq!(r.messages, vec!["Leaked cluster 6 refcount=1 reference=0".to_string()]);
        assert_eq!(r.image_end_offset, Some(7 * CS as u64));
        let (r, fixed) = check(b, Repair::Leaks);
        assert_eq!((r.leaks, r.leaks_fixed), (0, 1));
        let (r, _) = check(fixed, Repair::None);
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        assert_eq!(r.image_end_offset, Some(6 * CS as u64));
    }

    #[test]
    fn a_zero_refcount_under_data_needs_a_rebuild() {
        let mut b = base();
        b[2 * CS + 2 * 5 + 1] = 0; // the data cluster
        let (r, _) = check(b.clone(), Repair::None);
        assert_eq!(r.corruptions, 2, "{:?}", r.messages); // refcount, and its copied flag
        assert!(r
            .messages
            .contains(&"ERROR cluster 5 refcount=0 reference=1".to_string()));
        let (img, _) = open_bytes_ctx(b.clone(), false, true).unwrap();
        assert_eq!(
            img.check(Repair::Leaks).unwrap_err().kind(),
            crate::error::ErrorKind::CorruptImage
        );
        let (r, fixed) = check(b, Repair::All);
        assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{:?}", r.messages);
        let (r, _) = check(fixed.clone(), Repair::None);
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
        // The data is where it was.
        let (img, _) = open_bytes_ctx(fixed, true, false).unwrap();
        let mut buf = vec![0u8; CS];
        let m = img.map(0, CS as u64).unwrap();
        assert_eq!(
            m.kind,
            crate::driver::Mapped::Data {
                file: 0,
                offset: 5 * CS as u64
            }
        );
        img.host_file(0).unwrap().read_at(&mut buf, 5 * CS as u64).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
    }

    #[test]
    fn a_wrong_copied_flag_is_fixed() {
        let mut b = base();
        b[4 * CS] &= 0x7f; // the L2 entry loses its copied flag
        let (r, _) = check(b.clone(), Repair::None);
        assert_eq!(r.corruptions, 1);
        assert!(
            r.messages[0].starts_with("ERROR OFLAG_COPIED data cluster: l2_entry=a00 refcount=1"),
            "{:?}",
            r.messages
        );
        let (r, fixed) = check(b, Repair::All);
        assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1));
        assert_eq!(fixed[4 * CS] & 0x80, 0x80);
    }

    #[test]
    fn references_past_the_end_are_not_counted() {
        let mut b = base();
        // A second L2 table far past the end of the file.
        b[3 * CS + 8..3 * CS + 16].copy_from_slice(&(1u64 << 40 | COPIED).to_be_bytes());
        let (r, _) = check(b.clone(), Repair::None);
        assert_eq!(r.corruptions, 2, "{:?}", r.messages); // the reference, and the copied flag
        assert!(r.messages[0].starts_with("ERROR: counting reference for region exceeding the end of the file"));
        assert_eq!(r.image_end_offset, Some(6 * CS as u64));
        // Only the copied flag can be fixed; the image stays unwritable
        // through the damaged entry.
        let (img, store) = open_bytes_ctx(b, false, true).unwrap();
        let r = img.check(Repair::All).unwrap();
        assert_eq!((r.corruptions, r.corruptions_fixed), (1, 1), "{:?}", r.messages);
        assert_eq!(store.snapshot()[3 * CS + 8] & 0x80, 0);
        assert!(img.write_at(&[1u8; 512], 0, &crate::driver::NoBacking).is_err());
    }

    #[test]
    fn a_dirty_image_opened_for_checking_refuses_writes_until_repaired() {
        let mut b = base();
        b[79] |= INCOMPAT_DIRTY as u8;
        b[2 * CS + 2 * 5 + 1] = 0; // the stale refcount a crash left
        let (img, store) = open_bytes_ctx(b, false, true).unwrap();
        let below = crate::driver::NoBacking;
        assert!(img.write_at(&[1u8; 512], 4096, &below).is_err());
        let r = img.check(Repair::All).unwrap();
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        assert_eq!(store.snapshot()[79] & 1, 0, "dirty bit cleared");
        img.write_at(&[1u8; 512], 4096, &below).unwrap();
        img.flush().unwrap();
        assert_eq!(img.check(Repair::None).unwrap().leaks, 0);
    }
}
