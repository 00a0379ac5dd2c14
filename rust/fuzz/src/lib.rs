//! The fuzz harness shared by every target: open hostile bytes as one format
//! on a read-only memory backend, then ask the driver everything a reader
//! would: info, snapshots, block status over the disk, bounded reads, check.
//!
//! Errors are the expected outcome for most inputs and are ignored; a panic,
//! a hang (libFuzzer's -timeout) or an oversized allocation (-malloc_limit_mb,
//! -rss_limit_mb) is a finding.
//!
//! The image goes through the driver directly, not `Image::open`, because an
//! `Image` opens its storage from a `Location` and cannot sit on memory. The
//! read loop below mirrors `Image::read_layer` (without a backing chain).
//! The location is a protocol we do not serve, so any file the image names
//! (a vmdk extent, a qcow2 data file, a backing file) fails to open and the
//! host filesystem is never touched.

use qblock_core::backend::memory::MemoryStorage;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use qblock_core::driver::{Driver, Mapped, Repair};
use qblock_core::registry::{self, OpenCtx};
use qblock_core::{Format, Location};
use std::sync::Arc;

/// At most this many block-status calls over the disk: a hostile image may
/// describe terabytes cluster by cluster.
pub const MAX_STATUS_CALLS: usize = 4096;
/// Read at most this much from the start of the virtual disk...
pub const HEAD_READ: u64 = 2 << 20;
/// ...in reads of this size...
pub const READ_CHUNK: u64 = 256 << 10;
/// ...plus this much at each of a few scattered offsets.
pub const SCATTERED_READ: u64 = 64 << 10;

/// The heap one input may add while it runs, beyond its own bytes (held
/// twice: libFuzzer's and the memory backend's copy) and our read buffer:
/// what the issue allows any hostile image (64 MiB beyond the caches the
/// drivers declare, which are smaller than that). Overridden by the
/// environment variable QBLOCK_FUZZ_HEAP_MB.
pub const HEAP_BUDGET: usize = 64 << 20;

/// The system allocator, counting live bytes and their high-water mark, so
/// each input's peak heap can be held to [`HEAP_BUDGET`] whatever the
/// sanitizer (libFuzzer's -malloc_limit_mb sees single allocations only).
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are
// plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn heap_budget() -> usize {
    static B: AtomicUsize = AtomicUsize::new(0);
    match B.load(Ordering::Relaxed) {
        0 => {
            let b = std::env::var("QBLOCK_FUZZ_HEAP_MB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(HEAP_BUDGET, |mb| mb << 20);
            B.store(b, Ordering::Relaxed);
            b
        }
        b => b,
    }
}

/// Run `f` and panic (a finding) if the heap grew by more than the budget
/// at any moment while it ran.
fn within_budget(data: &[u8], f: impl FnOnce()) {
    let budget = heap_budget();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let allowed = budget + data.len() + READ_CHUNK as usize;
    assert!(
        grown <= allowed,
        "one input of {} bytes grew the heap by {} KiB (budget {} KiB)",
        data.len(),
        grown >> 10,
        allowed >> 10
    );
}

/// Names inside the input resolve to the fuzz location (see `location`),
/// which no file opens from: let them through the reference check, so the
/// drivers go on as far as they would with a missing file (a vmdk parent
/// hint, for one, is then just unreadable, not a refusal of the image).
static RULES: qblock_core::reference::RefRules = qblock_core::reference::RefRules {
    policy: qblock_core::References::Any,
    allow_protocols: true,
    roots: Vec::new(),
};

/// Where the image claims to be: nowhere we can open.
pub fn location() -> Location {
    Location::Other {
        protocol: "fuzz".into(),
        target: "input".into(),
    }
}

/// Open `data` as `format`, read-only; None when the driver refuses it (the
/// common case) or the format cannot be opened at all.
pub fn open(format: Format, data: &[u8]) -> Option<Box<dyn Driver>> {
    let open = registry::open_fn(format).ok()?;
    let loc = location();
    let ctx = OpenCtx {
        location: &loc,
        read_only: true,
        direct: false,
        check: false,
        force_share: false,
        refs: &RULES,
        inspect: None,
    };
    open(Arc::new(MemoryStorage::new(data.to_vec(), true)), &ctx).ok()
}

/// The target body: open and exercise. Never panics on its own account.
pub fn run(format: Format, data: &[u8]) {
    within_budget(data, || {
        if let Some(d) = open(format, data) {
            exercise(d.as_ref(), data);
            let _ = d.close();
        }
    });
}

/// Probe as `Image::open` does with no format given, then `run` as that.
pub fn run_probed(data: &[u8]) {
    let s = MemoryStorage::new(data.to_vec(), true);
    if let Ok(f) = registry::probe(&s) {
        run(f, data);
    }
}

/// Everything a read-only user may ask of an open driver.
pub fn exercise(d: &dyn Driver, data: &[u8]) {
    let _ = d.format();
    let _ = d.backing();
    let _ = d.info();
    let _ = d.snapshots();
    let _ = d.compressed_unit();
    let size = d.virtual_size();
    if size == 0 {
        return;
    }
    status_walk(d, size);
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let mut pos = 0;
    while pos < size.min(HEAD_READ) {
        let n = (size - pos).min(READ_CHUNK);
        let _ = read(d, &mut buf[..n as usize], pos);
        pos += n;
    }
    // A few offsets further in: the middle, the end, and two picked by the
    // input's bytes so the fuzzer can steer them.
    let h = fnv1a(data);
    for at in [size / 2, size.saturating_sub(SCATTERED_READ), h % size, (h >> 17) % size] {
        let at = at & !511; // sector aligned, as most callers read
        let n = (size - at).min(SCATTERED_READ);
        let _ = read(d, &mut buf[..n as usize], at);
    }
    let _ = d.check(Repair::None);
}

/// Block status from the start, as `Image::map` walks it (bounded).
fn status_walk(d: &dyn Driver, size: u64) {
    let mut pos = 0;
    for _ in 0..MAX_STATUS_CALLS {
        if pos >= size {
            break;
        }
        let Ok(m) = d.map_status(pos, size - pos) else { break };
        // `Image::block_status` clamps a run to [1, asked].
        pos += m.len.clamp(1, size - pos);
        if let Mapped::Data { file, .. } | Mapped::Hole { file, .. } = m.kind {
            let _ = d.host_file(file);
        }
    }
}

/// Guest bytes at `offset`, the way `Image::read_layer` reads one layer
/// with no backing file.
pub fn read(d: &dyn Driver, buf: &mut [u8], offset: u64) -> qblock_core::Result<()> {
    let mut rest = buf;
    let mut pos = offset;
    while !rest.is_empty() {
        let want = rest.len() as u64;
        let m = d.map(pos, want)?;
        let n = m.len.min(want) as usize;
        if n == 0 {
            return Err(qblock_core::Error::Internal("empty run".into()));
        }
        let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(n);
        match m.kind {
            Mapped::Data { file, offset } => match d.host_file(file) {
                Some(s) => s.read_at(chunk, offset)?,
                None => return Err(qblock_core::Error::Internal("unknown host file".into())),
            },
            Mapped::Hole { .. } | Mapped::Zero { .. } | Mapped::Unallocated => chunk.fill(0),
            Mapped::Encoded => d.read_encoded(chunk, pos)?,
        }
        rest = tail;
        pos += n as u64;
    }
    Ok(())
}

/// FNV-1a over the input: cheap, deterministic offsets for scattered reads.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The format each target fuzzes, by target name (as in Cargo.toml).
pub const TARGETS: &[(&str, Option<Format>)] = &[
    ("qcow2", Some(Format::Qcow2)),
    ("qcow", Some(Format::Qcow)),
    ("qed", Some(Format::Qed)),
    ("cow", Some(Format::Cow)),
    ("raw", Some(Format::Raw)),
    ("vdi", Some(Format::Vdi)),
    ("vmdk", Some(Format::Vmdk)),
    ("vpc", Some(Format::Vpc)),
    ("vhdx", Some(Format::Vhdx)),
    ("parallels", Some(Format::Parallels)),
    ("dmg", Some(Format::Dmg)),
    ("bochs", Some(Format::Bochs)),
    ("cloop", Some(Format::Cloop)),
    ("probe", None),
];

/// Run the target named `name` on one input.
pub fn run_target(name: &str, data: &[u8]) {
    match TARGETS.iter().find(|t| t.0 == name) {
        Some((_, Some(f))) => run(*f, data),
        Some((_, None)) => run_probed(data),
        None => panic!("unknown fuzz target {name}"),
    }
}
