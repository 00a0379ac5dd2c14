//! A qcow2 image written front to back, for a pipe: every table's place is
//! fixed before the first byte from the clusters the sources' block status
//! says hold data (`plan`). Layout, in clusters:
//!
//! ```text
//! header | L1 table | data slots (one per planned cluster, guest order)
//!        | L2 tables (one per L1 entry with a slot) | refcount table | refcount blocks
//! ```
//!
//! The header and the L1 table are written first; the L2 tables and the
//! refcounts, which depend on what the data turned out to be, last. A slot
//! whose bytes are all zero stays out of the tables: its cluster on the
//! wire is a free cluster of zeroes (refcount 0), as the guest reads
//! zeroes there anyway.

use super::create::{l1_table, params, refcount_clusters};
use super::header::NewHeader;
use super::refcount::set_entry;
use super::types::*;
use crate::error::{invalid, unsupported, Error, Result};
use crate::options::CreateOptions;
use crate::tools::convert::Target;
use crate::tools::stream::{Out, StreamTarget};
use parking_lot::Mutex;

/// Where the data goes: guest clusters in runs, and where the tables are.
struct Layout {
    cs: u64,
    l2_entries: u64,
    refcount_order: u32,
    /// Guest cluster runs `(first, count)` that get a slot, in order.
    slots: Vec<(u64, u64)>,
    data_start: u64,
    l2_start: u64,
    rt_start: u64,
    rt_clusters: u64,
    rb_start: u64,
    rb_clusters: u64,
    total: u64,
}

struct State {
    out: Out,
    /// Cursor over the slots: run index, cluster within it, slot rank.
    run: usize,
    in_run: u64,
    rank: u64,
    /// The slot being filled (its guest cluster), when a write began it.
    open: Option<u64>,
    buf: Vec<u8>,
    /// One bit per slot: its bytes were all zero.
    zero: Vec<u64>,
    finished: bool,
}

pub struct Qcow2Stream {
    size: u64,
    layout: Layout,
    state: Mutex<State>,
}

impl Qcow2Stream {
    /// Start a stream of a disk of `size` bytes whose data lies only in
    /// the guest ranges `plan` (sorted, disjoint); writes the header and
    /// the L1 table. `opts` are qcow2 creation options; those that need
    /// a file (backing and data files, preallocation) are refused.
    pub fn new(mut out: Out, size: u64, opts: &mut CreateOptions, plan: Vec<(u64, u64)>) -> Result<Qcow2Stream> {
        opts.set("size", crate::options::OptValue::Int(size));
        let p = params(opts)?;
        let (size, cluster_bits, refcount_order) = (p.size, p.cluster_bits, p.refcount_order);
        for (bad, what) in [
            (p.backing.is_some(), "a backing file"),
            (p.data_file.is_some(), "an external data file"),
            (p.prealloc != "off", "preallocation"),
            (p.extended, "extended L2 entries"),
        ] {
            if bad {
                return Err(unsupported(format!(
                    "a qcow2 image written to a stream cannot have {what}"
                )));
            }
        }
        let g = Geometry::new(cluster_bits, false);
        let cs = g.cluster_size;
        let (l1_size, l1_clusters) = l1_table(&g, size)?;
        let mut slots: Vec<(u64, u64)> = Vec::new();
        for (s, l) in plan {
            if l == 0 || s + l > size {
                continue;
            }
            let (first, last) = (s / cs, (s + l - 1) / cs);
            match slots.last_mut() {
                Some((f, n)) if *f + *n > first => *n = (*n).max(last + 1 - *f),
                Some((f, n)) if *f + *n == first => *n += last + 1 - first,
                _ => slots.push((first, last + 1 - first)),
            }
        }
        let n_slots: u64 = slots.iter().map(|r| r.1).sum();
        let l2_entries = g.l2_entries();
        let l1_used = l1_indices(&slots, l2_entries);
        let data_start = 1 + l1_clusters;
        let l2_start = data_start + n_slots;
        let fixed = l2_start + l1_used.len() as u64;
        let (blocks, table) = refcount_clusters(fixed, cs, refcount_order)?;
        let layout = Layout {
            cs,
            l2_entries,
            refcount_order,
            slots,
            data_start,
            l2_start,
            rt_start: fixed,
            rt_clusters: table,
            rb_start: fixed + table,
            rb_clusters: blocks,
            total: fixed + table + blocks,
        };
        let hdr = NewHeader {
            version: p.version,
            cluster_bits,
            size,
            l1_size: l1_size as u32,
            l1_table_offset: cs,
            refcount_table_offset: layout.rt_start * cs,
            refcount_table_clusters: table as u32,
            incompatible: if p.compression_type != COMPRESSION_ZLIB {
                INCOMPAT_COMPRESSION
            } else {
                0
            },
            compatible: if p.lazy { COMPAT_LAZY_REFCOUNTS } else { 0 },
            autoclear: 0,
            refcount_order,
            compression_type: p.compression_type,
            backing_file: None,
            backing_format: None,
            data_file: None,
        };
        let first = hdr
            .serialize()
            .ok_or_else(|| invalid("the header does not fit in one cluster"))?;
        out.put(&first)?;
        out.pad_to(cs)?;
        let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
        for (k, i) in l1_used.iter().enumerate() {
            let e = ((l2_start + k as u64) * cs) | COPIED;
            l1[(*i * 8) as usize..(*i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        }
        out.put(&l1)?;
        Ok(Qcow2Stream {
            size,
            state: Mutex::new(State {
                out,
                run: 0,
                in_run: 0,
                rank: 0,
                open: None,
                buf: vec![0u8; cs as usize],
                zero: vec![0u64; n_slots.div_ceil(64) as usize],
                finished: false,
            }),
            layout,
        })
    }
}

/// The L1 indices that have at least one slot, in order.
fn l1_indices(slots: &[(u64, u64)], l2_entries: u64) -> Vec<u64> {
    let mut v: Vec<u64> = Vec::new();
    for &(f, n) in slots {
        for i in f / l2_entries..=(f + n - 1) / l2_entries {
            if v.last() != Some(&i) {
                v.push(i);
            }
        }
    }
    v
}

impl State {
    /// The guest cluster of the next slot, None past the last.
    fn next_slot(&self, l: &Layout) -> Option<u64> {
        l.slots.get(self.run).map(|(f, _)| f + self.in_run)
    }

    /// Write the next slot's cluster: `data` (a whole cluster), or zeroes.
    fn emit(&mut self, l: &Layout, data: Option<&[u8]>) -> Result<()> {
        let all_zero = match data {
            Some(d) => {
                let z = crate::tools::zeroes::is_zero(d);
                self.out.put(d)?;
                z
            }
            None => {
                self.out.zeroes(l.cs)?;
                true
            }
        };
        if all_zero {
            self.zero[(self.rank / 64) as usize] |= 1 << (self.rank % 64);
        }
        self.rank += 1;
        self.in_run += 1;
        if self.in_run == l.slots[self.run].1 {
            self.run += 1;
            self.in_run = 0;
        }
        Ok(())
    }

    /// Write the slot being filled, if any.
    fn close_open(&mut self, l: &Layout) -> Result<()> {
        if self.open.take().is_some() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.emit(l, Some(&buf));
            self.buf = buf;
            self.buf.fill(0);
            r?;
        }
        Ok(())
    }

    /// Write every slot before guest cluster `c` (the one being filled,
    /// then untouched ones as zeroes).
    fn advance_to(&mut self, l: &Layout, c: u64) -> Result<()> {
        if self.open.is_some_and(|o| o < c) {
            self.close_open(l)?;
        }
        while self.open.is_none() && self.next_slot(l).is_some_and(|s| s < c) {
            self.emit(l, None)?;
        }
        Ok(())
    }

    fn is_zero_slot(&self, rank: u64) -> bool {
        self.zero[(rank / 64) as usize] & (1 << (rank % 64)) != 0
    }
}

impl Target for Qcow2Stream {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn format_name(&self) -> String {
        "qcow2".into()
    }
    fn compressed_unit(&self) -> Option<u64> {
        None
    }
    fn compressed_only(&self) -> bool {
        false
    }
    fn compress_unit(&self, _data: &[u8]) -> Result<Option<Vec<u8>>> {
        Err(unsupported("compressed qcow2 cannot be written to a stream"))
    }
    fn write_compressed(&self, _units: &[(u64, &[u8])]) -> Result<()> {
        Err(unsupported("compressed qcow2 cannot be written to a stream"))
    }
    fn write_at(&self, buf: &[u8], at: u64) -> Result<()> {
        let l = &self.layout;
        let cs = l.cs;
        let mut st = self.state.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = at + done as u64;
            let c = pos / cs;
            let in_c = (pos % cs) as usize;
            let n = (cs as usize - in_c).min(buf.len() - done);
            let piece = &buf[done..done + n];
            st.advance_to(l, c)?;
            let next = st.next_slot(l);
            if st.open == Some(c) || next == Some(c) {
                if st.open.is_none() && n == cs as usize {
                    st.emit(l, Some(piece))?; // a whole cluster: straight out
                } else {
                    st.open = Some(c);
                    st.buf[in_c..in_c + n].copy_from_slice(piece);
                }
            } else if next.is_some_and(|s| s < c) || !crate::tools::zeroes::is_zero(piece) {
                // Behind the cursor, or data where block status said
                // zeroes: the plan no longer holds.
                return Err(Error::Internal(format!(
                    "data at {pos} where the stream's layout has no cluster (did the source change \
                     while it was read?)"
                )));
            }
            done += n;
        }
        Ok(())
    }
    /// A new image reads zeroes wherever nothing was written.
    fn write_zeroes(&self, _at: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn reads_zero(&self, _at: u64, _len: u64) -> Result<bool> {
        Ok(true)
    }
    fn read_at(&self, _buf: &mut [u8], _at: u64) -> Result<()> {
        Err(unsupported("an image being written to a stream cannot be read"))
    }
}

impl StreamTarget for Qcow2Stream {
    fn finish(&self) -> Result<u64> {
        let l = &self.layout;
        let cs = l.cs;
        let mut st = self.state.lock();
        if std::mem::replace(&mut st.finished, true) {
            return Err(invalid("the stream is already finished"));
        }
        st.advance_to(l, u64::MAX)?;
        debug_assert_eq!(st.out.pos(), l.l2_start * cs);
        // L2 tables, one per L1 entry with slots, in the L1 order.
        let mut table = vec![0u8; cs as usize];
        let mut rank = 0u64;
        let mut current: Option<u64> = None;
        for &(f, n) in &l.slots {
            for c in f..f + n {
                let i = c / l.l2_entries;
                if current.is_some_and(|k| k != i) {
                    st.out.put(&table)?;
                    table.fill(0);
                }
                current = Some(i);
                if !st.is_zero_slot(rank) {
                    let e = ((l.data_start + rank) * cs) | COPIED;
                    let k = (c % l.l2_entries) as usize * 8;
                    table[k..k + 8].copy_from_slice(&e.to_be_bytes());
                }
                rank += 1;
            }
        }
        if current.is_some() {
            st.out.put(&table)?;
        }
        // Refcount table, then blocks: 1 for every cluster but free slots.
        let mut rt = vec![0u8; (l.rt_clusters * cs) as usize];
        for b in 0..l.rb_clusters {
            let o = (l.rb_start + b) * cs;
            rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&o.to_be_bytes());
        }
        st.out.put(&rt)?;
        let epb = (cs * 8) >> l.refcount_order;
        let mut block = vec![0u8; cs as usize];
        for b in 0..l.rb_clusters {
            block.fill(0);
            let first = b * epb;
            for c in first..l.total.min(first + epb) {
                let free = (l.data_start..l.l2_start).contains(&c) && st.is_zero_slot(c - l.data_start);
                if !free {
                    set_entry(&mut block, (c - first) as usize, l.refcount_order, 1);
                }
            }
            st.out.put(&block)?;
        }
        st.out.flush()?;
        Ok(st.out.pos())
    }
}
