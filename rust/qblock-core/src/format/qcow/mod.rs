//! qcow: QEMU's first copy-on-write format (version 1), as QEMU's
//! block/qcow.c reads and writes it.
//!
//! Layout (all integers big-endian): a 48-byte header (magic `QFI\xfb`,
//! version 1, backing file offset/size, mtime, size, cluster_bits, l2_bits,
//! crypt_method, l1_table_offset), the backing file name, the L1 table of
//! `ceil(size / 2^(cluster_bits + l2_bits))` entries, then L2 tables of
//! `2^l2_bits` entries and data clusters in any order. An L2 entry is 0
//! (unallocated), a host offset of a cluster, or, with bit 63 set, a
//! compressed cluster: raw deflate of `csize` bytes, where `csize` is the
//! `cluster_bits` bits below bit 63 and the host offset the bits below.
//!
//! Supported: reading (plain and compressed clusters), backing files (no
//! backing format: qcow cannot record one), writing (a write over a
//! compressed cluster decompresses it into a new plain cluster, as QEMU
//! does) and creating with QEMU's geometry. Not supported: AES encryption
//! (`Unsupported` on open and create), writing compressed clusters,
//! resizing.
//!
//! Checks beyond QEMU's: the L1 table, every L2 table and every cluster
//! must lie in the file (a data cluster may be cut short by the file end,
//! which reads as zeroes as in QEMU); L2 tables may not lie on the header
//! or the L1 table; a data cluster lying on metadata is read as QEMU reads
//! it but never written into.
//!
//! Locking: the L1 table sits behind a `RwLock`, L2 tables in the shared
//! chunk cache of [`table`]; `map` takes read locks only and data I/O runs
//! outside them. Writes are serialised by one mutex (allocation appends to
//! the file).

pub mod table;

use super::bytes::{be32, be64};
use super::paged::{read_u64s, Order};
use crate::backend::Storage;
use crate::driver::{BackingRef, Below, Driver, DriverInfo, HostFile, Mapped, Mapping};
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};
use crate::format_name::Format;
use crate::location::Location;
use crate::options::CreateOptions;
use crate::registry::{FormatEntry, OpenCtx};
use parking_lot::{Mutex, RwLock};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use table::{ranges_meet, TableCache, TableSet};

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Qcow,
    probe: Some(probe),
    open: Some(open),
    create: Some(create),
};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
pub const VERSION: u32 = 1;
/// Size of the on-disk header.
pub const HEADER_SIZE: usize = 48;
/// Bit 63 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 63;
/// QEMU's limit on the backing file name (it reads it into a 1024-byte
/// buffer with a terminating NUL).
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU reads the whole L1 table in one request; it refuses more than
/// INT_MAX / 8 entries.
pub const MAX_L1_ENTRIES: u64 = (i32::MAX as u64) / 8;
/// Distinguishes driver instances in the per-thread decompression cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last cluster this thread inflated: (driver id, L2 entry, bytes).
    static DECOMPRESSED: RefCell<(u64, u64, Vec<u8>)> = const { RefCell::new((0, 0, Vec::new())) };
}

/// Whole clusters allocated by one write at most (one L2 update each).
const MAX_RUN_CLUSTERS: u64 = 8192;

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    // Shares qcow2's magic; the version tells them apart.
    if h.starts_with(MAGIC) && be32(h, 4) == Some(VERSION) {
        100
    } else {
        0
    }
}

/// The header fields, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub mtime: u32,
    pub size: u64,
    pub cluster_bits: u8,
    pub l2_bits: u8,
    pub crypt_method: u32,
    pub l1_table_offset: u64,
}

impl Header {
    /// Parse and check the fields that do not depend on the file length.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != MAGIC {
            return Err(corrupt("not a qcow image (bad magic)"));
        }
        let version = be32(b, 4).unwrap_or(0);
        if version != VERSION {
            return Err(unsupported(format!("qcow version {version} (only version 1 is qcow)")));
        }
        let h = Header {
            backing_file_offset: be64(b, 8).unwrap_or(0),
            backing_file_size: be32(b, 16).unwrap_or(0),
            mtime: be32(b, 20).unwrap_or(0),
            size: be64(b, 24).unwrap_or(0),
            cluster_bits: b[32],
            l2_bits: b[33],
            crypt_method: be32(b, 36).unwrap_or(0),
            l1_table_offset: be64(b, 40).unwrap_or(0),
        };
        // QEMU's checks, in its order.
        if h.size <= 1 {
            return Err(corrupt(format!(
                "image size {} is too small (must be at least 2 bytes)",
                h.size
            )));
        }
        if !(9..=16).contains(&h.cluster_bits) {
            return Err(corrupt(format!("cluster_bits {} out of range 9..16", h.cluster_bits)));
        }
        // l2_bits counts 8-byte entries: tables of 512 B to 64 KiB.
        if !(6..=13).contains(&h.l2_bits) {
            return Err(corrupt(format!("l2_bits {} out of range 6..13", h.l2_bits)));
        }
        match h.crypt_method {
            0 => {}
            1 => return Err(unsupported("encrypted qcow images (AES) are not supported")),
            m => return Err(corrupt(format!("invalid encryption method {m}"))),
        }
        h.l1_entries()?;
        if h.backing_file_offset != 0 && h.backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt(format!(
                "backing file name of {} bytes is longer than {MAX_BACKING_NAME}",
                h.backing_file_size
            )));
        }
        Ok(h)
    }

    pub fn l1_entries(&self) -> Result<u64> {
        let shift = u32::from(self.cluster_bits) + u32::from(self.l2_bits);
        let span = 1u64 << shift;
        let n = self
            .size
            .checked_add(span - 1)
            .map(|s| s >> shift)
            .ok_or_else(|| corrupt(format!("image size {} is too large", self.size)))?;
        if n > MAX_L1_ENTRIES {
            return Err(corrupt(format!(
                "image size {} needs {n} L1 entries, more than {MAX_L1_ENTRIES}",
                self.size
            )));
        }
        Ok(n)
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits;
        b[33] = self.l2_bits;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b
    }
}

pub struct Qcow {
    storage: Arc<dyn Storage>,
    /// Guest size: QEMU uses whole sectors of the header's size.
    size: u64,
    cluster_bits: u32,
    l2_bits: u32,
    l1_offset: u64,
    l1: RwLock<Vec<u64>>,
    l2: TableCache,
    /// Where the L2 tables are, and the header (with the backing name) and
    /// L1 table: a data cluster on any of them is never written into.
    l2_tables: TableSet,
    fixed_meta: [(u64, u64); 2],
    backing: Option<String>,
    /// End of the host file: where the next cluster or table goes, and the
    /// bound every table entry is checked against.
    end: AtomicU64,
    write_lock: Mutex<()>,
    /// Tells driver instances apart in the per-thread decompression cache.
    id: u64,
}

fn open(storage: Arc<dyn Storage>, _ctx: &OpenCtx) -> Result<Box<dyn Driver>> {
    Ok(Box::new(Qcow::open(storage)?))
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

impl Qcow {
    pub fn open(storage: Arc<dyn Storage>) -> Result<Qcow> {
        let file_len = storage.len()?;
        if file_len < HEADER_SIZE as u64 {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the qcow header"
            )));
        }
        let mut hb = [0u8; HEADER_SIZE];
        storage.read_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        let cluster_bits = u32::from(h.cluster_bits);
        let l2_bits = u32::from(h.l2_bits);
        let l1_entries = h.l1_entries()?;
        let l1_bytes = l1_entries * 8;
        // The L1 table must lie in the file: this bounds its memory by the
        // file's own size.
        match h.l1_table_offset.checked_add(l1_bytes) {
            Some(end) if end <= file_len && h.l1_table_offset >= HEADER_SIZE as u64 => {}
            _ => {
                return Err(corrupt(format!(
                    "L1 table at {} of {l1_bytes} bytes is outside the file ({file_len} bytes)",
                    h.l1_table_offset
                )))
            }
        }
        let l1 = read_u64s(
            storage.as_ref(),
            h.l1_table_offset,
            l1_entries as usize,
            Order::Big,
            "the qcow L1 table",
        )?;
        let l2_bytes = 8u64 << l2_bits;
        let header_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
                .saturating_add(u64::from(h.backing_file_size))
                .max(HEADER_SIZE as u64)
        } else {
            HEADER_SIZE as u64
        };
        let fixed_meta = [(0, header_end), (h.l1_table_offset, h.l1_table_offset + l1_bytes)];
        let l2_tables = TableSet::new(l2_bytes);
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            match e.checked_add(l2_bytes) {
                Some(end) if end <= file_len && e >= HEADER_SIZE as u64 => {
                    if fixed_meta.iter().any(|&m| ranges_meet(m, (e, end))) {
                        return Err(corrupt(format!(
                            "L1 entry {i}: L2 table at {e} overlaps the header or L1 table"
                        )));
                    }
                }
                _ => {
                    return Err(corrupt(format!(
                        "L1 entry {i}: L2 table at {e} is outside the file ({file_len} bytes)"
                    )))
                }
            }
            l2_tables.insert(e);
        }
        let backing = if h.backing_file_offset != 0 && h.backing_file_size != 0 {
            let n = u64::from(h.backing_file_size);
            match h.backing_file_offset.checked_add(n) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(corrupt(format!(
                        "backing file name at {} of {n} bytes is outside the file",
                        h.backing_file_offset
                    )))
                }
            }
            let mut name = vec![0u8; n as usize];
            storage.read_at(&mut name, h.backing_file_offset)?;
            // QEMU keeps it as a C string: a NUL ends it.
            if let Some(z) = name.iter().position(|&c| c == 0) {
                name.truncate(z);
            }
            let s = String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?;
            (!s.is_empty()).then_some(s)
        } else {
            None
        };
        Ok(Qcow {
            storage,
            size: h.size / 512 * 512,
            cluster_bits,
            l2_bits,
            l1_offset: h.l1_table_offset,
            l1: RwLock::new(l1),
            l2: TableCache::new(true),
            l2_tables,
            fixed_meta,
            backing,
            end: AtomicU64::new(file_len),
            write_lock: Mutex::new(()),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    fn indices(&self, offset: u64) -> (usize, u64) {
        (
            (offset >> (self.cluster_bits + self.l2_bits)) as usize,
            (offset >> self.cluster_bits) & (self.l2_entries() - 1),
        )
    }

    /// What an L2 entry means, checked against the file.
    fn decode(&self, e: u64) -> Result<Entry> {
        if e == 0 {
            return Ok(Entry::Unallocated);
        }
        let end = self.end.load(Ordering::Acquire);
        let cs = self.cluster_size();
        if e & OFLAG_COMPRESSED != 0 {
            let shift = 63 - self.cluster_bits;
            let csize = (e >> shift) & (cs - 1);
            let off = e & ((1u64 << shift) - 1);
            if csize == 0 || off.checked_add(csize).is_none_or(|x| x > end) {
                return Err(corrupt(format!(
                    "compressed cluster at {off} of {csize} bytes is outside the file"
                )));
            }
            return Ok(Entry::Compressed { off, csize });
        }
        // QEMU fails reads of clusters not on a sector boundary.
        if e & 511 != 0 {
            return Err(corrupt(format!("data cluster offset {e:#x} is not sector aligned")));
        }
        // A last cluster may be cut short by the file end (it reads zeroes
        // there, as in QEMU); one that starts past the end is corrupt.
        if e < HEADER_SIZE as u64 || e >= end {
            return Err(corrupt(format!(
                "data cluster at {e:#x} is outside the file ({end} bytes)"
            )));
        }
        Ok(Entry::Data(e))
    }

    fn l2_entry(&self, offset: u64) -> Result<(u64, u64)> {
        let (i1, i2) = self.indices(offset);
        let l2 = self.l1.read().get(i1).copied().unwrap_or(0);
        if l2 == 0 {
            return Ok((0, 0));
        }
        Ok((l2, self.l2.entry(self.storage.as_ref(), l2, self.l2_entries(), i2)?))
    }

    fn read_compressed(&self, off: u64, csize: u64, out: &mut [u8]) -> Result<()> {
        let mut input = try_zeroed(csize as usize, "a compressed qcow cluster")?;
        self.storage.read_at(&mut input, off)?;
        crate::format::inflate::raw_exact(&input, out)
    }
}

enum Entry {
    Unallocated,
    Data(u64),
    Compressed { off: u64, csize: u64 },
}

impl Driver for Qcow {
    fn format(&self) -> Format {
        Format::Qcow
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn backing(&self) -> Option<BackingRef> {
        self.backing.as_ref().map(|b| BackingRef {
            filename: b.clone(),
            format: None,
        })
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let cs = self.cluster_size();
        let (i1, i2) = self.indices(offset);
        let l2 = self.l1.read().get(i1).copied().unwrap_or(0);
        let in_cluster = offset & (cs - 1);
        if l2 == 0 {
            // The whole L2 span is unallocated, and so are the spans of the
            // following empty L1 entries.
            let shift = self.cluster_bits + self.l2_bits;
            let want_end = offset.saturating_add(len);
            let l1 = self.l1.read();
            let mut i = i1 + 1;
            while i < l1.len() && ((i as u64) << shift) < want_end && l1[i] == 0 {
                i += 1;
            }
            let span_end = (i as u64) << shift;
            return Ok(Mapping {
                kind: Mapped::Unallocated,
                len: len.min(span_end - offset),
            });
        }
        let chunk = self.l2.get(self.storage.as_ref(), l2, self.l2_entries(), i2)?;
        let entries = &chunk.entries[chunk.index..];
        let first = self.decode(entries[0])?;
        let mut run = cs - in_cluster;
        match first {
            Entry::Compressed { .. } => Ok(Mapping {
                kind: Mapped::Encoded,
                len: run.min(len),
            }),
            Entry::Unallocated => {
                for &e in &entries[1..] {
                    if run >= len || e != 0 {
                        break;
                    }
                    run += cs;
                }
                Ok(Mapping {
                    kind: Mapped::Unallocated,
                    len: run.min(len),
                })
            }
            Entry::Data(host) => {
                let mut next = host + cs;
                for &e in &entries[1..] {
                    if run >= len || e != next {
                        break;
                    }
                    // Checked like the first: it must start inside the file.
                    self.decode(e)?;
                    run += cs;
                    next += cs;
                }
                Ok(Mapping {
                    kind: Mapped::Data {
                        file: 0,
                        offset: host + in_cluster,
                    },
                    len: run.min(len),
                })
            }
        }
    }

    fn host_file(&self, file: HostFile) -> Option<&dyn Storage> {
        (file == 0).then_some(self.storage.as_ref())
    }

    fn read_encoded(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let (_, e) = self.l2_entry(offset)?;
        match self.decode(e)? {
            Entry::Compressed { off, csize } => DECOMPRESSED.with(|c| {
                // Small sequential reads of one compressed cluster inflate
                // it once. We never write compressed clusters, so an L2
                // entry value names immutable bytes.
                let mut c = c.borrow_mut();
                let at = (offset & (cs - 1)) as usize;
                if c.0 != self.id || c.1 != e || c.2.len() != cs as usize {
                    c.0 = 0;
                    if c.2.len() != cs as usize {
                        c.2 = try_zeroed(cs as usize, "a qcow cluster")?;
                    }
                    self.read_compressed(off, csize, &mut c.2)?;
                    c.0 = self.id;
                    c.1 = e;
                }
                buf.copy_from_slice(&c.2[at..at + buf.len()]);
                Ok(())
            }),
            _ => Err(crate::error::Error::Internal(
                "qcow cluster changed under a compressed read".into(),
            )),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let _g = self.write_lock.lock();
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            let rem = (buf.len() - done) as u64;
            if in_cluster == 0 && rem >= cs {
                // Whole unallocated clusters: one data write, one L2 write.
                let n = self.unallocated_run(pos, rem / cs)?;
                if n > 0 {
                    let (i1, i2) = self.indices(pos);
                    let l2 = self.l1.read()[i1];
                    let bytes = (n * cs) as usize;
                    self.place_new(i1, i2, l2, &buf[done..done + bytes])?;
                    done += bytes;
                    continue;
                }
            }
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            self.write_cluster(&buf[done..done + n], pos, below)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn info(&self) -> Result<DriverInfo> {
        Ok(DriverInfo {
            cluster_size: Some(self.cluster_size()),
            ..Default::default()
        })
    }
}

impl Qcow {
    /// Write `data` (within one cluster) at guest `pos`. Crash order: a new
    /// L2 table is written (zeroed) and a new data cluster filled before the
    /// L2 entry that points at it, and the L2 entry before the L1 entry that
    /// makes the table reachable (with a flush in between, since a reachable
    /// table that did not reach the disk would be garbage); a crash leaves
    /// at worst leaked space at the end of the file.
    fn write_cluster(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let cs = self.cluster_size();
        let in_cluster = pos & (cs - 1);
        let start = pos - in_cluster;
        let (i1, i2) = self.indices(pos);
        let l2 = self.l1.read()[i1];
        let e = if l2 == 0 {
            0
        } else {
            self.l2.entry(self.storage.as_ref(), l2, self.l2_entries(), i2)?
        };
        let old = self.decode(e)?;
        if let Entry::Data(host) = old {
            let range = (host, host + cs);
            if self.fixed_meta.iter().any(|&m| ranges_meet(m, range)) || self.l2_tables.overlaps(range.0, range.1) {
                return Err(corrupt(format!(
                    "data cluster at {host:#x} overlaps metadata; not writing into it"
                )));
            }
            self.storage.write_at(data, host + in_cluster)?;
            // A last cluster cut short by the file end grows with this
            // write: new clusters go after all of it, never into its tail.
            self.end.fetch_max(host + cs, Ordering::AcqRel);
            return Ok(());
        }
        // A new cluster: its full content, from the old compressed cluster
        // or from below, with the write on top.
        let mut content = try_zeroed(cs as usize, "a qcow cluster")?;
        if data.len() as u64 != cs {
            match old {
                Entry::Compressed { off, csize } => self.read_compressed(off, csize, &mut content)?,
                _ => {
                    let inside = self.size.saturating_sub(start).min(cs) as usize;
                    below.read_below(&mut content[..inside], start)?;
                }
            }
        }
        content[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        self.place_new(i1, i2, l2, &content)
    }

    /// How many clusters from `pos` on (at most `max`, within one L2 table
    /// and one cache chunk) are unallocated.
    fn unallocated_run(&self, pos: u64, max: u64) -> Result<u64> {
        let (i1, i2) = self.indices(pos);
        let limit = max.min(self.l2_entries() - i2).min(MAX_RUN_CLUSTERS);
        let l2 = self.l1.read()[i1];
        if l2 == 0 {
            return Ok(limit);
        }
        let chunk = self.l2.get(self.storage.as_ref(), l2, self.l2_entries(), i2)?;
        Ok(chunk.entries[chunk.index..]
            .iter()
            .take(limit as usize)
            .take_while(|&&e| e == 0)
            .count() as u64)
    }

    /// Put `content` (whole clusters) in new clusters at the end of the
    /// file and point L2 entries `i2..` of L1 entry `i1` (table `l2`, 0 for
    /// none yet) at them, in the crash order of [`Self::write_cluster`].
    fn place_new(&self, i1: usize, i2: u64, mut l2: u64, content: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let n = content.len() as u64 / cs;
        let mut new_table = false;
        let mut end = self.end.load(Ordering::Acquire);
        if l2 == 0 {
            l2 = align_up(end, cs).ok_or_else(|| invalid("qcow image file is too large"))?;
            let zeroes = try_zeroed((self.l2_entries() * 8) as usize, "a qcow L2 table")?;
            self.storage.write_at(&zeroes, l2)?;
            end = l2 + zeroes.len() as u64;
            new_table = true;
            self.l2_tables.insert(l2);
        }
        let host = align_up(end, cs).ok_or_else(|| invalid("qcow image file is too large"))?;
        if host + n * cs > 1u64 << (63 - self.cluster_bits) {
            return Err(invalid("qcow image file is too large for its cluster offsets"));
        }
        self.storage.write_at(content, host)?;
        self.end.store(host + n * cs, Ordering::Release);
        if new_table {
            self.storage.flush()?;
        }
        let entries: Vec<u64> = (0..n).map(|k| host + k * cs).collect();
        self.l2
            .set_many(self.storage.as_ref(), l2, self.l2_entries(), i2, &entries)?;
        if new_table {
            self.storage
                .write_at(&l2.to_be_bytes(), self.l1_offset + i1 as u64 * 8)?;
            self.l1.write()[i1] = l2;
        }
        Ok(())
    }
}

/// Create an image with QEMU's geometry: 4 KiB clusters and 512-entry L2
/// tables, or, over a backing file, 512-byte clusters (so copy-on-write
/// copies single sectors) and 4096-entry L2 tables; the header, the backing
/// name, the L1 table at the next 8-byte boundary, zeroed to whole sectors.
fn create(location: &Location, opts: &mut CreateOptions) -> Result<()> {
    let size = opts.take_u64("size")?.unwrap_or(0);
    let backing = opts.take_str("backing_file")?.filter(|s| !s.is_empty());
    // qcow has no field for a backing format; QEMU accepts and drops it.
    let _ = opts.take_str("backing_fmt")?;
    let encrypt = opts.take_bool("encrypt")?.unwrap_or(false);
    opts.finish("qcow")?;
    if encrypt {
        return Err(unsupported("creating encrypted qcow images is not supported"));
    }
    // QEMU refuses too: a header size below 2 cannot be opened.
    if size < 512 {
        return Err(invalid(format!(
            "qcow images cannot be smaller than one sector (size {size})"
        )));
    }
    let bytes = build_image(size, backing.as_deref())?;
    let storage = location.create_storage()?;
    storage.write_at(&bytes, 0)?;
    storage.flush()
}

/// The bytes of a new, empty image.
pub fn build_image(size: u64, backing: Option<&str>) -> Result<Vec<u8>> {
    let size = size / 512 * 512;
    let (cluster_bits, l2_bits) = if backing.is_some() { (9u8, 12u8) } else { (12u8, 9u8) };
    let mut header_size = HEADER_SIZE as u64;
    let (mut bo, mut bs) = (0u64, 0u32);
    if let Some(b) = backing {
        if b.len() as u64 > u64::from(MAX_BACKING_NAME) {
            return Err(invalid(format!(
                "backing file name is longer than {MAX_BACKING_NAME} bytes"
            )));
        }
        bo = header_size;
        bs = b.len() as u32;
        header_size += b.len() as u64;
    }
    header_size = (header_size + 7) & !7;
    let h = Header {
        backing_file_offset: bo,
        backing_file_size: bs,
        mtime: 0,
        size,
        cluster_bits,
        l2_bits,
        crypt_method: 0,
        l1_table_offset: header_size,
    };
    let l1_entries = h
        .l1_entries()
        .map_err(|_| invalid(format!("size {size} is too large for qcow")))?;
    let total = header_size + (l1_entries * 8).div_ceil(512) * 512;
    let mut out = try_zeroed(total as usize, "a new qcow image")?;
    out[..HEADER_SIZE].copy_from_slice(&h.encode());
    if let Some(b) = backing {
        out[HEADER_SIZE..HEADER_SIZE + b.len()].copy_from_slice(b.as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::driver::NoBacking;
    use crate::error::ErrorKind;

    fn header() -> Header {
        Header {
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 1 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
        }
    }

    fn image_with(h: &Header, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..48].copy_from_slice(&h.encode());
        v
    }

    fn open_bytes(v: Vec<u8>) -> Result<Qcow> {
        Qcow::open(Arc::new(MemoryStorage::new(v, false)))
    }

    fn kind(r: Result<Qcow>) -> ErrorKind {
        r.err().expect("must fail").kind()
    }

    #[test]
    fn created_header_bytes_match_qemu() {
        let img = build_image(10 << 20, None).unwrap();
        // QEMU 10 `qemu-img create -f qcow a.qcow 10M` writes 560 bytes.
        assert_eq!(img.len(), 560);
        assert_eq!(&img[..8], b"QFI\xfb\0\0\0\x01");
        assert_eq!(&img[24..34], &[0, 0, 0, 0, 0, 0xa0, 0, 0, 12, 9]);
        assert_eq!(be64(&img, 40), Some(48));
        let b = build_image(1 << 20, Some("base.img")).unwrap();
        assert_eq!(be64(&b, 8), Some(48));
        assert_eq!(be32(&b, 16), Some(8));
        assert_eq!(&b[48..56], b"base.img");
        assert_eq!((b[32], b[33]), (9, 12));
        assert_eq!(be64(&b, 40), Some(56));
    }

    #[test]
    fn round_trip_in_memory() {
        let img = build_image(1 << 20, None).unwrap();
        let q = open_bytes(img).unwrap();
        assert_eq!(q.virtual_size(), 1 << 20);
        assert_eq!(
            q.map(0, 1 << 20).unwrap(),
            Mapping {
                kind: Mapped::Unallocated,
                len: 1 << 20
            }
        );
        q.write_at(&[7u8; 5000], 1000, &NoBacking).unwrap();
        let m = q.map(1000, 5000).unwrap();
        assert!(matches!(m.kind, Mapped::Data { .. }));
        assert_eq!(m.len, 5000);
        let Mapped::Data { offset, .. } = m.kind else {
            unreachable!()
        };
        let mut b = [0u8; 5000];
        q.storage.read_at(&mut b, offset).unwrap();
        assert_eq!(b, [7u8; 5000]);
        // Reopen from the bytes.
        let q2 = Qcow::open(q.storage.clone()).unwrap();
        assert_eq!(q2.map(1000, 5000).unwrap(), m);
    }

    #[test]
    fn rejects_bad_headers() {
        let ok = image_with(&header(), 4096);
        assert!(open_bytes(ok.clone()).is_ok());
        let mut h = header();
        h.size = 1;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.cluster_bits = 8;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.cluster_bits = 17;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.l2_bits = 14;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.l2_bits = 5;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.crypt_method = 1;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::Unsupported);
        let mut h = header();
        h.crypt_method = 2;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.size = u64::MAX - 10;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        // An L1 table bigger than QEMU reads, or outside the file.
        let mut h = header();
        h.size = 1 << 62;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.size = 1 << 40;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.l1_table_offset = u64::MAX - 3;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.backing_file_offset = 48;
        h.backing_file_size = 1024;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        let mut h = header();
        h.backing_file_offset = 4000;
        h.backing_file_size = 200;
        assert_eq!(kind(open_bytes(image_with(&h, 4096))), ErrorKind::CorruptImage);
        // Short file, wrong version.
        assert_eq!(kind(open_bytes(ok[..40].to_vec())), ErrorKind::CorruptImage);
        let mut v = ok.clone();
        v[7] = 2;
        assert_eq!(kind(open_bytes(v)), ErrorKind::Unsupported);
    }

    #[test]
    fn rejects_bad_entries() {
        // L1 entry pointing past the end.
        let mut v = image_with(&header(), 4096);
        v[48..56].copy_from_slice(&100_000u64.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        // L2 entries: unaligned, past the end, compressed past the end.
        for bad in [4097u64, 1 << 40, OFLAG_COMPRESSED | (100u64 << 51) | 8192] {
            let mut v = image_with(&header(), 8192);
            v[48..56].copy_from_slice(&4096u64.to_be_bytes());
            v[4096..4104].copy_from_slice(&bad.to_be_bytes());
            let q = open_bytes(v).unwrap();
            assert_eq!(q.map(0, 4096).unwrap_err().kind(), ErrorKind::CorruptImage, "{bad:#x}");
        }
        // Garbage deflate data.
        let mut v = image_with(&header(), 8192);
        v[48..56].copy_from_slice(&4096u64.to_be_bytes());
        let e = OFLAG_COMPRESSED | (100u64 << 51) | 6000;
        v[4096..4104].copy_from_slice(&e.to_be_bytes());
        v[6000..6100].fill(0xff);
        let q = open_bytes(v).unwrap();
        assert_eq!(q.map(0, 4096).unwrap().kind, Mapped::Encoded);
        let mut b = [0u8; 512];
        assert_eq!(q.read_encoded(&mut b, 0).unwrap_err().kind(), ErrorKind::CorruptImage);
    }

    #[test]
    fn metadata_overlaps() {
        // An L2 table on the L1 table.
        let mut v = image_with(&header(), 8192);
        v[48..56].copy_from_slice(&48u64.to_be_bytes());
        assert_eq!(kind(open_bytes(v)), ErrorKind::CorruptImage);
        // A data cluster on its own L2 table: read, never written into.
        let mut v = image_with(&header(), 8192);
        v[48..56].copy_from_slice(&4096u64.to_be_bytes());
        v[4096..4104].copy_from_slice(&4096u64.to_be_bytes());
        let q = open_bytes(v).unwrap();
        assert!(matches!(q.map(0, 4096).unwrap().kind, Mapped::Data { .. }));
        let e = q.write_at(&[1], 0, &NoBacking).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptImage);
    }

    #[test]
    fn short_last_cluster_is_not_reused() {
        // A data cluster at 8704 in a file of 9000 bytes: a write into it
        // must not let the next new cluster start inside its tail.
        let mut v = image_with(&header(), 9000);
        v[48..56].copy_from_slice(&4096u64.to_be_bytes());
        v[4096..4104].copy_from_slice(&8704u64.to_be_bytes());
        let q = open_bytes(v).unwrap();
        q.write_at(&[5u8; 4096], 0, &NoBacking).unwrap();
        q.write_at(&[6u8; 4096], 4096, &NoBacking).unwrap();
        assert_eq!(q.map(4096, 4096).unwrap().kind, Mapped::Data { file: 0, offset: 16384 });
        let mut b = vec![0u8; 4096];
        q.storage.read_at(&mut b, 8704).unwrap();
        assert_eq!(b, vec![5u8; 4096]);
    }

    #[test]
    fn compressed_cluster_reads() {
        use std::io::Write;
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let c = enc.finish().unwrap();
        let mut v = image_with(&header(), 8192);
        v[48..56].copy_from_slice(&4096u64.to_be_bytes());
        let e = OFLAG_COMPRESSED | ((c.len() as u64) << 51) | 8192;
        v[4096..4104].copy_from_slice(&e.to_be_bytes());
        v.resize(8192 + c.len(), 0);
        v[8192..].copy_from_slice(&c);
        let q = open_bytes(v).unwrap();
        let mut b = vec![0u8; 1000];
        q.read_encoded(&mut b, 100).unwrap();
        assert_eq!(b, data[100..1100]);
        // Writing into it decompresses into a new plain cluster.
        q.write_at(&[1, 2, 3], 10, &NoBacking).unwrap();
        let m = q.map(0, 4096).unwrap();
        let Mapped::Data { offset, .. } = m.kind else {
            panic!("{m:?}")
        };
        let mut out = vec![0u8; 4096];
        q.storage.read_at(&mut out, offset).unwrap();
        let mut want = data.clone();
        want[10..13].copy_from_slice(&[1, 2, 3]);
        assert_eq!(out, want);
    }
}
