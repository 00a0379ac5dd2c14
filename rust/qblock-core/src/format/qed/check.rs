//! `qemu-img check` for qed, as QEMU's qed-check.c decides it: every L1
//! and L2 entry must name a place inside the file, and no cluster may be
//! used twice (each second use is a corruption); clusters after the header
//! that nothing uses are leaks. A repair (either mode: QEMU has just one)
//! clears entries naming places outside the file, then clears the
//! need-check flag when no corruption is left. Leaks are never fixed, and
//! there are no messages (QEMU prints none for qed).
//!
//! Crash order: an entry is cleared in place (what it named is unreachable
//! anyway); the flag is cleared after a flush.

use super::{Qed, ZERO_CLUSTER};
use crate::driver::{CheckReport, Repair};
use crate::error::{unsupported, Error, Result};
use std::sync::atomic::Ordering;

/// Clusters a check tracks, one bit each: an 8 MiB bitmap, 4 TiB of
/// 64 KiB clusters.
const MAX_CHECK_CLUSTERS: u64 = 1 << 26;

/// Which clusters of the file something uses.
struct Used(Vec<u64>);

impl Used {
    fn get(&self, c: u64) -> bool {
        self.0.get((c / 64) as usize).is_some_and(|w| w >> (c % 64) & 1 != 0)
    }

    /// Mark `n` clusters from `first`; each already marked is a corruption.
    /// True when none was.
    fn mark(&mut self, first: u64, n: u64, rep: &mut CheckReport) -> bool {
        let mut twice = 0;
        for c in first..first.saturating_add(n) {
            if let Some(w) = self.0.get_mut((c / 64) as usize) {
                twice += *w >> (c % 64) & 1;
                *w |= 1 << (c % 64);
            }
        }
        rep.corruptions += twice;
        twice == 0
    }
}

impl Qed {
    pub(super) fn check_impl(&self, repair: Repair) -> Result<CheckReport> {
        let fix = repair != Repair::None;
        let _writers = self.write_lock.lock();
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let nclusters = self.end.load(Ordering::Acquire) >> cb;
        if nclusters > MAX_CHECK_CLUSTERS {
            return Err(unsupported(format!(
                "qed images of more than {MAX_CHECK_CLUSTERS} clusters cannot be checked yet"
            )));
        }
        let mut bits = Vec::new();
        bits.try_reserve_exact(nclusters.div_ceil(64) as usize)
            .map_err(|_| Error::NoMemory("qed check".into()))?;
        bits.resize(nclusters.div_ceil(64) as usize, 0u64);
        let mut used = Used(bits);
        let mut rep = CheckReport {
            total_clusters: Some(self.size.load(Ordering::Relaxed).div_ceil(cs)),
            allocated_clusters: Some(0),
            fragmented_clusters: Some(0),
            compressed_clusters: Some(0),
            ..Default::default()
        };
        let table_clusters = self.table_bytes() >> cb;
        used.mark(self.l1_offset >> cb, table_clusters, &mut rep);
        let (mut allocated, mut fragmented) = (0u64, 0u64);
        let mut l1 = self.l1.write();
        for i in 0..l1.len() {
            let t = l1[i];
            if t == 0 {
                continue;
            }
            if !self.table_ok(t) {
                if fix {
                    self.storage
                        .write_at(&0u64.to_le_bytes(), self.l1_offset + i as u64 * 8)?;
                    l1[i] = 0;
                    rep.corruptions_fixed += 1;
                } else {
                    rep.corruptions += 1;
                }
                continue;
            }
            if !used.mark(t >> cb, table_clusters, &mut rep) {
                continue;
            }
            let mut last = 0u64;
            let mut j = 0u64;
            while j < self.entries {
                let chunk = self.l2.get(self.storage.as_ref(), t, self.entries, j)?;
                let n = chunk.entries.len() - chunk.index;
                for k in 0..n {
                    let e = chunk.entries[chunk.index + k];
                    if e == 0 || e == ZERO_CLUSTER {
                        continue;
                    }
                    allocated += 1;
                    if last != 0 && last.wrapping_add(cs) != e {
                        fragmented += 1;
                    }
                    last = e;
                    if !self.cluster_ok(e) {
                        if fix {
                            self.l2.set(self.storage.as_ref(), t, self.entries, j + k as u64, 0)?;
                            rep.corruptions_fixed += 1;
                        } else {
                            rep.corruptions += 1;
                        }
                        continue;
                    }
                    used.mark(e >> cb, 1, &mut rep);
                }
                j += n as u64;
            }
        }
        drop(l1);
        rep.allocated_clusters = Some(allocated);
        rep.fragmented_clusters = Some(fragmented);
        rep.leaks = ((self.header_bytes >> cb)..nclusters).filter(|&c| !used.get(c)).count() as u64;
        if fix && rep.corruptions == 0 && self.need_check.load(Ordering::Acquire) != 0 {
            self.storage.flush()?;
            self.set_need_check(false)?;
        }
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_image;
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::backend::Storage;
    use crate::driver::{Driver, NoBacking};
    use std::sync::Arc;

    const CS: u64 = 4096;

    /// 4 KiB clusters, one-cluster tables; one cluster written at offset 0.
    fn image() -> (Qed, Arc<MemoryStorage>) {
        let v = build_image(1 << 20, CS, 1, None, None).unwrap();
        let m = Arc::new(MemoryStorage::new(v, false));
        let s: Arc<dyn Storage> = m.clone();
        let q = Qed::open_with(s, true, true).unwrap();
        q.write_at(&[7u8; 4096], 0, &NoBacking).unwrap();
        q.flush().unwrap();
        (q, m)
    }

    #[test]
    fn clean_then_leaked_then_repaired() {
        let (q, m) = image();
        let r = q.check(Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (0, 0, Some(1)));
        // An L2 entry naming a cluster far past the end of the file.
        let l2 = q.l1.read()[0];
        m.write_at(&(1u64 << 40).to_le_bytes(), l2 + 8).unwrap();
        q.l2.clear();
        let r = q.check(Repair::None).unwrap();
        assert_eq!((r.corruptions, r.allocated_clusters), (1, Some(2)));
        let r = q.check(Repair::All).unwrap();
        assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1));
        let mut e = [0u8; 8];
        m.read_at(&mut e, l2 + 8).unwrap();
        assert_eq!(e, [0u8; 8]);
        // A cluster past the used ones: a leak nothing fixes.
        m.set_len(m.len().unwrap() + CS).unwrap();
        q.end.fetch_add(CS, Ordering::AcqRel);
        let r = q.check(Repair::All).unwrap();
        assert_eq!((r.leaks, r.leaks_fixed), (1, 0));
    }
}
