//! A fault-injecting storage, for crash-consistency tests: it counts the
//! mutating operations (write, write zeroes, allocate, set_len, flush) that
//! reach the files of a folder and, at a chosen one, fails it, drops it, or
//! cuts the power.
//!
//! A plan is armed on a folder ([`arm`]); every file opened or created under
//! that folder while it is armed (the image, its data file, its extents) is
//! wrapped ([`wrap`]) and shares the plan's count, so "the Nth write" is
//! counted across the whole image as a disk would see it.
//!
//! With a volatile cache, writes are held in memory until a flush, as a disk
//! with a write cache holds them. A power cut then keeps a chosen part of
//! what was not flushed (nothing, everything, or a seeded random subset: a
//! disk may persist its cache in any order) and fails everything after it.
//! What the flushes made durable always survives, so a format whose
//! metadata updates are ordered by flushes must reopen consistent.

use super::{HostExtent, Perm, Storage};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// What happens at the chosen operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Nothing: the plan only counts (a dry run sizes the workload).
    Count,
    /// The operation fails with EIO and changes nothing; later ones work.
    Fail,
    /// The operation reports success and changes nothing (a lying disk).
    Drop,
    /// Power is cut: the operation and every later one fail with EIO, and
    /// unflushed writes are kept as [`Unflushed`] says.
    Cut,
}

/// At a power cut, which writes not yet flushed reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unflushed {
    /// All of them, in order: a process killed, the kernel's cache intact.
    Keep,
    /// None.
    Lose,
    /// Each one independently, decided by the plan's seed.
    Random,
}

/// One armed plan, shared by every file of the folder.
pub struct FaultPlan {
    kind: FaultKind,
    at: u64,
    unflushed: Unflushed,
    seed: u64,
    /// Writes are held until a flush (only matters for a cut).
    volatile: bool,
    ops: AtomicU64,
    cut: AtomicBool,
    files: Mutex<Vec<Weak<Cache>>>,
}

/// What a plan has seen, for the tests' report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultStatus {
    /// Mutating operations counted so far.
    pub ops: u64,
    /// Whether the fault happened (the chosen operation was reached).
    pub fired: bool,
}

impl FaultPlan {
    pub fn new(kind: FaultKind, at: u64, unflushed: Unflushed, seed: u64) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            kind,
            at,
            unflushed,
            seed,
            volatile: kind == FaultKind::Cut && unflushed != Unflushed::Keep,
            ops: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            files: Mutex::new(Vec::new()),
        })
    }

    pub fn status(&self) -> FaultStatus {
        let ops = self.ops.load(Ordering::Acquire);
        FaultStatus {
            ops,
            fired: self.kind != FaultKind::Count && ops > self.at,
        }
    }

    /// Count one mutating operation: what to do with it.
    fn next(&self) -> Action {
        if self.cut.load(Ordering::Acquire) {
            return Action::Fail;
        }
        let n = self.ops.fetch_add(1, Ordering::AcqRel);
        if n != self.at {
            return Action::Do;
        }
        match self.kind {
            FaultKind::Count => Action::Do,
            FaultKind::Fail => Action::Fail,
            FaultKind::Drop => Action::Skip,
            FaultKind::Cut => {
                self.power_cut();
                Action::Fail
            }
        }
    }

    /// Persist the chosen part of every file's unflushed writes, then stop.
    fn power_cut(&self) {
        self.cut.store(true, Ordering::Release);
        let mut rng = SplitMix(self.seed);
        for file in self.files.lock().iter().filter_map(Weak::upgrade) {
            let pending = std::mem::take(&mut *file.pending.lock());
            for w in pending {
                let keep = match self.unflushed {
                    Unflushed::Keep => true,
                    Unflushed::Lose => false,
                    Unflushed::Random => rng.next() & 1 == 1,
                };
                if keep {
                    // Best effort: the test's verdict is what the file holds.
                    let _ = file.inner.write_at(&w.data, w.offset);
                }
            }
        }
    }
}

enum Action {
    Do,
    Fail,
    Skip,
}

/// Larger zero writes (preallocation) go to the file at once, behind what
/// is held, rather than as a buffer of zeroes in memory.
const MAX_HELD_ZEROES: u64 = 16 << 20;

/// A write held by the volatile cache.
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

/// The per-file state a plan reaches at a power cut.
struct Cache {
    inner: Arc<dyn Storage>,
    pending: Mutex<Vec<Pending>>,
}

/// A file under an armed plan.
pub struct FaultStorage {
    plan: Arc<FaultPlan>,
    cache: Arc<Cache>,
}

fn injected(what: &str) -> Error {
    Error::os(
        format!("injected fault: {what}"),
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

impl FaultStorage {
    pub fn new(inner: Arc<dyn Storage>, plan: Arc<FaultPlan>) -> FaultStorage {
        let cache = Arc::new(Cache {
            inner,
            pending: Mutex::new(Vec::new()),
        });
        plan.files.lock().push(Arc::downgrade(&cache));
        FaultStorage { plan, cache }
    }

    fn inner(&self) -> &dyn Storage {
        self.cache.inner.as_ref()
    }

    /// Count a mutating operation and run `op` unless the plan says otherwise.
    fn mutate(&self, what: &str, op: impl FnOnce() -> Result<()>) -> Result<()> {
        match self.plan.next() {
            Action::Do => op(),
            Action::Fail => Err(injected(what)),
            Action::Skip => Ok(()),
        }
    }

    /// Apply the held writes to the file, in order.
    fn drain(&self) -> Result<()> {
        let mut pending = self.cache.pending.lock();
        for w in pending.iter() {
            self.inner().write_at(&w.data, w.offset)?;
        }
        pending.clear();
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Under the cache's lock, so a flush draining it is not half seen.
        let pending = self.cache.pending.lock();
        self.inner().read_at(buf, offset)?;
        // The cache's newer bytes win, oldest first.
        let end = offset + buf.len() as u64;
        for w in pending.iter() {
            let (ws, we) = (w.offset, w.offset + w.data.len() as u64);
            let (s, e) = (ws.max(offset), we.min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&w.data[(s - ws) as usize..(e - ws) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.mutate("write", || {
            if self.plan.volatile {
                self.cache.pending.lock().push(Pending {
                    offset,
                    data: buf.to_vec(),
                });
                Ok(())
            } else {
                self.inner().write_at(buf, offset)
            }
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.mutate("write zeroes", || {
            if self.plan.volatile && len <= MAX_HELD_ZEROES {
                // Held as a write, so a cut may lose it like any other.
                self.cache.pending.lock().push(Pending {
                    offset,
                    data: vec![0; len as usize],
                });
                Ok(())
            } else {
                self.drain()?;
                self.inner().write_zeroes(offset, len)
            }
        })
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.mutate("allocate", || {
            self.drain()?;
            self.inner().allocate(offset, len)
        })
    }
    fn flush(&self) -> Result<()> {
        self.mutate("flush", || {
            self.drain()?;
            self.inner().flush()
        })
    }
    fn len(&self) -> Result<u64> {
        let held = self
            .cache
            .pending
            .lock()
            .iter()
            .map(|w| w.offset + w.data.len() as u64)
            .max();
        Ok(self.inner().len()?.max(held.unwrap_or(0)))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        // Applied at once, after what is held: a truncate is ordered
        // behind the writes before it.
        self.mutate("set_len", || {
            self.drain()?;
            self.inner().set_len(len)
        })
    }
    fn read_only(&self) -> bool {
        self.inner().read_only()
    }
    fn describe(&self) -> String {
        self.inner().describe()
    }
    fn extent(&self, offset: u64, len: u64) -> Result<HostExtent> {
        if self.cache.pending.lock().is_empty() {
            self.inner().extent(offset, len)
        } else {
            Ok(HostExtent { data: true, len })
        }
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner().allocated_bytes()
    }
    fn lock(&self, perm: Perm) -> Result<()> {
        self.inner().lock(perm)
    }
}

/// The folders armed now, and their plans.
static ARMED: Mutex<Vec<(PathBuf, Arc<FaultPlan>)>> = Mutex::new(Vec::new());

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Arm `plan` on `dir`: files opened or created under it from now on are
/// wrapped. Arming a folder again replaces its plan.
pub fn arm(dir: &Path, plan: Arc<FaultPlan>) {
    let dir = absolute(dir);
    let mut armed = ARMED.lock();
    armed.retain(|(d, _)| *d != dir);
    armed.push((dir, plan));
}

/// Disarm `dir`, returning its plan's last status. Files already open
/// keep their plan.
pub fn disarm(dir: &Path) -> Option<FaultStatus> {
    let dir = absolute(dir);
    let mut armed = ARMED.lock();
    let i = armed.iter().position(|(d, _)| *d == dir)?;
    Some(armed.remove(i).1.status())
}

/// The status of the plan armed on `dir`.
pub fn status(dir: &Path) -> Option<FaultStatus> {
    let dir = absolute(dir);
    ARMED.lock().iter().find(|(d, _)| *d == dir).map(|(_, p)| p.status())
}

/// `storage` (the file at `path`) under the plan armed on a folder holding
/// it, if any: the hook every file open and create goes through.
pub fn wrap(path: &Path, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let armed = ARMED.lock();
    if armed.is_empty() {
        return storage;
    }
    let path = absolute(path);
    match armed.iter().find(|(d, _)| path.starts_with(d)) {
        Some((_, plan)) => Arc::new(FaultStorage::new(storage, plan.clone())),
        None => storage,
    }
}

/// splitmix64: a tiny, seedable generator for the cut's choices (the
/// core needs no general-purpose random numbers).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    fn mem() -> Arc<dyn Storage> {
        Arc::new(MemoryStorage::new(vec![0; 16], false))
    }

    fn bytes(s: &dyn Storage) -> Vec<u8> {
        let mut b = vec![0; s.len().unwrap() as usize];
        s.read_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn a_cut_keeps_what_was_flushed_and_loses_the_cache() {
        let inner = mem();
        let plan = FaultPlan::new(FaultKind::Cut, 3, Unflushed::Lose, 1);
        let f = FaultStorage::new(inner.clone(), plan.clone());
        f.write_at(&[1; 4], 0).unwrap(); // op 0
        f.flush().unwrap(); // op 1
        f.write_at(&[2; 4], 4).unwrap(); // op 2: held
        assert_eq!(&bytes(&f)[4..8], &[2; 4], "reads see the cache");
        assert_eq!(&bytes(inner.as_ref())[4..8], &[0; 4]);
        assert!(f.flush().is_err(), "op 3 is the cut");
        assert!(f.write_at(&[3; 4], 8).is_err(), "the world has stopped");
        let disk = bytes(inner.as_ref());
        assert_eq!(&disk[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(plan.status(), FaultStatus { ops: 4, fired: true });
    }

    #[test]
    fn keep_persists_the_cache_in_order_and_fail_is_one_error() {
        let inner = mem();
        let plan = FaultPlan::new(FaultKind::Cut, 2, Unflushed::Keep, 1);
        let f = FaultStorage::new(inner.clone(), plan);
        f.write_at(&[1; 4], 0).unwrap();
        f.write_at(&[2; 2], 2).unwrap();
        assert!(f.write_at(&[9; 4], 0).is_err());
        assert_eq!(&bytes(inner.as_ref())[..4], &[1, 1, 2, 2]);

        let plan = FaultPlan::new(FaultKind::Fail, 0, Unflushed::Keep, 1);
        let f = FaultStorage::new(mem(), plan);
        assert!(f.write_at(&[1; 4], 0).is_err());
        f.write_at(&[2; 4], 0).unwrap();
        assert_eq!(&bytes(&f)[..4], &[2; 4]);
    }

    #[test]
    fn random_keeps_a_seeded_subset() {
        let run = |seed| {
            let inner = mem();
            let f = FaultStorage::new(
                inner.clone(),
                FaultPlan::new(FaultKind::Cut, 16, Unflushed::Random, seed),
            );
            for i in 0..16u8 {
                f.write_at(&[i + 1], i as u64).unwrap();
            }
            let _ = f.flush();
            bytes(inner.as_ref())
        };
        assert_eq!(run(7), run(7));
        let kept = run(7).iter().filter(|&&b| b != 0).count();
        assert!(kept > 0 && kept < 16, "{kept} of 16 kept");
    }

    #[test]
    fn arming_wraps_files_under_the_folder_only() {
        let plan = FaultPlan::new(FaultKind::Count, 0, Unflushed::Keep, 0);
        let dir = Path::new("/nonexistent-qblock-fault-test");
        arm(dir, plan);
        let inside = wrap(&dir.join("a.qcow2"), mem());
        let outside = wrap(Path::new("/elsewhere/a.qcow2"), mem());
        inside.write_at(&[1], 0).unwrap();
        outside.write_at(&[1], 0).unwrap();
        assert_eq!(disarm(dir), Some(FaultStatus { ops: 1, fired: false }));
        assert_eq!(disarm(dir), None);
    }
}
