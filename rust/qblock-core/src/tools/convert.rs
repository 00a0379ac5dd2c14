//! `convert`: copy the guest content of one or more images (concatenated)
//! into a target image of any writable format.
//!
//! Worker threads read and classify fixed-size chunks; the caller's thread
//! writes them in guest order, so a target allocates its clusters in the
//! same order as `qemu-img convert` does and the host file stays sequential.
//! At most `window` (2 x workers + 1) chunks are in flight, and their
//! buffers are reused: memory is bounded by `window x chunk x 2` (the
//! source's bytes and, for a target that already holds data, its old
//! bytes) whatever the image size.
//!
//! What is written: each chunk is compared, in units of `sparse_min`
//! bytes, with what the target reads there now (zeroes for a fresh target,
//! found from block status without reading; the target's backing file for
//! an overlay; the old content for an existing target). Units that already
//! read right are skipped; units that must become zero are written as
//! zeroes (`write_zeroes`); the rest as data. Ranges the source reports as
//! zero are never read. With `sparse_min` 0 every byte is written as data,
//! fully allocating the target.

use super::{cancelled, caught, worker_count, zeroes, Progress};
use crate::error::{invalid, try_zeroed, Result};
use crate::image::Image;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};

/// Chunk of work: big enough for large sequential I/O, small enough that
/// a few per worker stay cheap in memory.
pub const CHUNK: u64 = 2 << 20;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Zero runs at least this long are not written as data (`qemu-img
    /// convert -S`); a multiple of 512. 0 writes everything as data.
    pub sparse_min: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Store the data compressed (`qemu-img convert -c`): the target's
    /// compressed unit (a qcow2 cluster, a vmdk grain) is then the unit of
    /// comparison, and each unit is encoded by a worker. Implied for a
    /// target that stores everything compressed (streamOptimized vmdk).
    pub compress: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            sparse_min: 4096,
            threads: 0,
            compress: false,
        }
    }
}

/// What `convert` writes into: an open image, or a writer that lays an
/// image out in order on a stream (`super::stream`). The writer thread
/// calls the write methods in guest order; workers call the others.
pub trait Target: Sync {
    fn virtual_size(&self) -> u64;
    /// The format's name, for messages.
    fn format_name(&self) -> String;
    fn compressed_unit(&self) -> Option<u64>;
    fn compressed_only(&self) -> bool;
    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>>;
    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()>;
    fn write_at(&self, buf: &[u8], at: u64) -> Result<()>;
    fn write_zeroes(&self, at: u64, len: u64) -> Result<()>;
    /// Whether `[at, at+len)` reads as zeroes now, known without reading.
    fn reads_zero(&self, at: u64, len: u64) -> Result<bool>;
    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()>;
}

impl Target for Image {
    fn virtual_size(&self) -> u64 {
        Image::virtual_size(self)
    }
    fn format_name(&self) -> String {
        self.format().to_string()
    }
    fn compressed_unit(&self) -> Option<u64> {
        Image::compressed_unit(self)
    }
    fn compressed_only(&self) -> bool {
        Image::compressed_only(self)
    }
    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        Image::compress_unit(self, data)
    }
    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        Image::write_compressed(self, units)
    }
    fn write_at(&self, buf: &[u8], at: u64) -> Result<()> {
        Image::write_at(self, buf, at)
    }
    fn write_zeroes(&self, at: u64, len: u64) -> Result<()> {
        Image::write_zeroes(self, at, len)
    }
    fn reads_zero(&self, at: u64, len: u64) -> Result<bool> {
        reads_zero(self, at, len)
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        Image::read_at(self, buf, at)
    }
}

/// A slice of a source image: `len` bytes from `start`.
#[derive(Clone, Copy)]
pub struct Piece<'a> {
    pub image: &'a Image,
    pub start: u64,
    pub len: u64,
}

/// What a worker found a chunk needs.
enum Op {
    Data {
        at: u64,
        from: usize,
        len: usize,
    },
    Zero {
        at: u64,
        len: u64,
    },
    /// One unit, encoded by the target's `compress_unit`.
    Compressed {
        at: u64,
        blob: Vec<u8>,
    },
}

/// Bytes of compressed units (and of the writes between them) the writer
/// holds back to store in one go: each run of compressed units costs one
/// durability barrier, so runs should be long.
const COMPRESSED_BATCH: usize = 16 << 20;

/// A write held back behind compressed units, to keep guest order (and so
/// the target's layout sequential).
enum Held {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
    Compressed(u64, Vec<u8>),
}

#[derive(Default)]
struct Queue {
    ops: Vec<Held>,
    bytes: usize,
}

impl Queue {
    fn push(&mut self, h: Held) {
        // What the buffers hold in memory, not only their bytes.
        self.bytes += match &h {
            Held::Data(_, b) | Held::Compressed(_, b) => b.capacity(),
            Held::Zero(..) => 0,
        };
        self.ops.push(h);
    }

    /// Everything held, in order; each run of compressed units in one call.
    fn write(&mut self, target: &dyn Target) -> Result<()> {
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        let mut run: Vec<(u64, &[u8])> = Vec::new();
        for h in &ops {
            if !matches!(h, Held::Compressed(..)) && !run.is_empty() {
                target.write_compressed(&run)?;
                run.clear();
            }
            match h {
                Held::Compressed(at, b) => run.push((*at, &b[..])),
                Held::Data(at, b) => target.write_at(b, *at)?,
                Held::Zero(at, len) => target.write_zeroes(*at, *len)?,
            }
        }
        if !run.is_empty() {
            target.write_compressed(&run)?;
        }
        Ok(())
    }
}

struct Plan {
    buf: Vec<u8>,
    /// The target's old bytes, when they had to be read to compare.
    old: Option<Vec<u8>>,
    ops: Vec<Op>,
    len: u64,
}

struct Flow {
    next_take: u64,
    next_write: u64,
    ready: BTreeMap<u64, Result<Plan>>,
    /// Chunk buffers the writer is done with, for the workers to reuse:
    /// allocating and zeroing 2 MiB per chunk cost a third of a read.
    spare: Vec<Vec<u8>>,
    stop: bool,
}

impl Flow {
    fn buffer(&mut self) -> Result<Vec<u8>> {
        match self.spare.pop() {
            Some(b) => Ok(b),
            None => try_zeroed(CHUNK as usize, "a convert chunk"),
        }
    }
}

/// Copy `pieces`, one after another, into `target` from its offset 0.
/// `target` must be at least as long as the pieces together.
pub fn convert(
    pieces: &[Piece<'_>],
    target: &dyn Target,
    opts: &ConvertOptions,
    progress: &mut dyn Progress,
) -> Result<()> {
    if !opts.sparse_min.is_multiple_of(SECTOR) {
        return Err(invalid(format!(
            "the sparse size must be a multiple of 512 bytes, not {}",
            opts.sparse_min
        )));
    }
    for p in pieces {
        if p.start.checked_add(p.len).is_none_or(|e| e > p.image.virtual_size()) {
            return Err(invalid("a source range reaches past the end of its image"));
        }
    }
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    if total > target.virtual_size() {
        return Err(invalid(format!(
            "the target is {} bytes, smaller than the {} bytes to copy",
            target.virtual_size(),
            total
        )));
    }
    // A target that stores everything compressed is always given
    // compressed units, encoded by the workers.
    let compress = opts.compress || target.compressed_only();
    let unit = if compress {
        target.compressed_unit().ok_or_else(|| {
            let hint = if target.format_name() == "vmdk" {
                " (only streamOptimized vmdk images can)"
            } else {
                ""
            };
            crate::error::unsupported(format!(
                "{} images cannot store compressed data{hint}",
                target.format_name()
            ))
        })?
    } else {
        opts.sparse_min
    };
    if compress && !CHUNK.is_multiple_of(unit) {
        return Err(invalid(format!(
            "a compressed unit of {unit} bytes does not divide the 2 MiB chunks"
        )));
    }
    let chunks = total.div_ceil(CHUNK);
    let workers = worker_count(opts.threads).min(chunks.max(1) as usize);
    let window = (workers as u64) * 2 + 1;
    let flow = Mutex::new(Flow {
        next_take: 0,
        next_write: 0,
        ready: BTreeMap::new(),
        spare: Vec::new(),
        stop: false,
    });
    let changed = Condvar::new();
    let ctx = Ctx {
        pieces,
        target,
        unit,
        compress,
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = {
                    let mut f = flow.lock().unwrap();
                    while !f.stop && f.next_take < chunks && f.next_take >= f.next_write + window {
                        f = changed.wait(f).unwrap();
                    }
                    if f.stop || f.next_take >= chunks {
                        return;
                    }
                    f.next_take += 1;
                    f.next_take - 1
                };
                let plan = caught(|| ctx.plan(k, total, &flow));
                let mut f = flow.lock().unwrap();
                f.ready.insert(k, plan);
                changed.notify_all();
            });
        }
        let result = write_in_order(&flow, &changed, chunks, target, total, progress);
        let mut f = flow.lock().unwrap();
        f.stop = true;
        changed.notify_all();
        result
    })
}

fn write_in_order(
    flow: &Mutex<Flow>,
    changed: &Condvar,
    chunks: u64,
    target: &dyn Target,
    total: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let mut done = 0u64;
    if !progress.report(0, total) {
        return Err(cancelled());
    }
    let mut queue = Queue::default();
    for k in 0..chunks {
        let plan = {
            let mut f = flow.lock().unwrap();
            loop {
                if let Some(p) = f.ready.remove(&k) {
                    break p;
                }
                f = changed.wait(f).unwrap();
            }
        }?;
        let mut plan = plan;
        for op in std::mem::take(&mut plan.ops) {
            match op {
                // Without compressed units in flight, write at once.
                Op::Data { at, from, len } if queue.ops.is_empty() => {
                    target.write_at(&plan.buf[from..from + len], at)?
                }
                Op::Zero { at, len } if queue.ops.is_empty() => target.write_zeroes(at, len)?,
                Op::Data { at, from, len } => queue.push(Held::Data(at, plan.buf[from..from + len].to_vec())),
                Op::Zero { at, len } => queue.push(Held::Zero(at, len)),
                Op::Compressed { at, blob } => queue.push(Held::Compressed(at, blob)),
            }
        }
        if queue.bytes >= COMPRESSED_BATCH || k + 1 == chunks {
            queue.write(target)?;
        }
        done += plan.len;
        {
            let mut f = flow.lock().unwrap();
            f.next_write = k + 1;
            f.spare
                .extend(std::iter::once(plan.buf).chain(plan.old).filter(|b| !b.is_empty()));
            changed.notify_all();
        }
        if !progress.report(done, total) {
            return Err(cancelled());
        }
    }
    Ok(())
}

struct Ctx<'a> {
    pieces: &'a [Piece<'a>],
    target: &'a dyn Target,
    /// Unit of comparison: `-S`, or the compressed unit.
    unit: u64,
    compress: bool,
}

impl Ctx<'_> {
    fn plan(&self, k: u64, total: u64, flow: &Mutex<Flow>) -> Result<Plan> {
        let at = k * CHUNK;
        let n = (total - at).min(CHUNK);
        let unit = self.unit;
        let runs = self.source_runs(at, n)?;
        let src_zero = runs.iter().all(|r| r.zero);
        let tgt_zero = self.target.reads_zero(at, n)?;
        let empty = |ops| Plan {
            buf: Vec::new(),
            old: None,
            ops,
            len: n,
        };
        if unit > 0 && src_zero && tgt_zero {
            return Ok(empty(Vec::new()));
        }
        let n = n as usize;
        let mut buf = flow.lock().unwrap().buffer()?;
        for r in &runs {
            let dst = &mut buf[r.rel..r.rel + r.len];
            if r.zero {
                dst.fill(0);
            } else {
                r.image.read_at(dst, r.offset)?;
            }
        }
        if unit == 0 {
            let ops = vec![Op::Data { at, from: 0, len: n }];
            return Ok(Plan { buf, ..empty(ops) });
        }
        let old = if tgt_zero {
            None
        } else {
            let mut old = flow.lock().unwrap().buffer()?;
            self.target.read_at(&mut old[..n], at)?;
            Some(old)
        };
        let mut ops: Vec<Op> = Vec::new();
        let unit = unit as usize;
        let mut off = 0usize;
        while off < n {
            let end = (off + unit).min(n);
            let new = &buf[off..end];
            let is_zero = zeroes::is_zero(new);
            let same = match &old {
                None => is_zero,
                Some(o) => &o[off..end] == new,
            };
            if !same {
                let here = at + off as u64;
                let len = end - off;
                match (ops.last_mut(), is_zero) {
                    (Some(Op::Zero { at: a, len: l }), true) if *a + *l == here => *l += len as u64,
                    // A short unit is padded with zeroes: only at the disk's end.
                    (_, false) if self.compress && (len == unit || here + len as u64 == self.target.virtual_size()) => {
                        match self.target.compress_unit(new)? {
                            Some(blob) => ops.push(Op::Compressed { at: here, blob }),
                            None => ops.push(Op::Data {
                                at: here,
                                from: off,
                                len,
                            }),
                        }
                    }
                    (Some(Op::Data { from, len: l, .. }), false) if *from + *l == off => *l += len,
                    (_, true) => ops.push(Op::Zero {
                        at: here,
                        len: len as u64,
                    }),
                    (_, false) => ops.push(Op::Data {
                        at: here,
                        from: off,
                        len,
                    }),
                }
            }
            off = end;
        }
        Ok(Plan { buf, old, ..empty(ops) })
    }

    /// `[at, at+len)` of the concatenated sources as runs that block status
    /// reports as zero or not, asked once per run.
    fn source_runs(&self, at: u64, len: u64) -> Result<Vec<Run<'_>>> {
        let mut runs = Vec::new();
        let mut base = 0u64;
        for p in self.pieces {
            let (lo, hi) = (base, base + p.len);
            base = hi;
            let (s, e) = (at.max(lo), (at + len).min(hi));
            let mut pos = s;
            while pos < e {
                let offset = p.start + (pos - lo);
                let st = p.image.block_status(offset, e - pos)?;
                let n = st.len.min(e - pos);
                runs.push(Run {
                    image: p.image,
                    offset,
                    rel: (pos - at) as usize,
                    len: n as usize,
                    zero: st.zero && !st.data,
                });
                pos += n;
            }
        }
        Ok(runs)
    }
}

/// A run of the source window that block status answers one way for.
struct Run<'a> {
    image: &'a Image,
    /// Where the run starts in its image, and in the chunk.
    offset: u64,
    rel: usize,
    len: usize,
    zero: bool,
}

/// Whether block status says the whole range reads as zeroes.
fn reads_zero(img: &Image, at: u64, len: u64) -> Result<bool> {
    let mut pos = at;
    while pos < at + len {
        let st = img.block_status(pos, at + len - pos)?;
        if !st.zero || st.data {
            return Ok(false);
        }
        pos += st.len;
    }
    Ok(true)
}
