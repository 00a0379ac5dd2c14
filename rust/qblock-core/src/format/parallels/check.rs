//! `qemu-img check` for parallels, as QEMU's parallels check decides what
//! this driver can open (a BAT entry outside the file or two entries on one
//! cluster are refused at open already): an image not closed cleanly is a
//! corruption (`Repair::All` repairs it: close clears the in-use flag),
//! space past the last used cluster is leaked (either repair truncates it).
//! Statistics as QEMU counts them: a cluster after an unallocated entry
//! starts a new run, so it is never counted as fragmented.
//!
//! Crash order: truncating drops only clusters no BAT entry names.

use super::Parallels;
use crate::driver::{CheckReport, Repair};
use crate::error::Result;
use std::sync::atomic::Ordering;

impl Parallels {
    pub(super) fn check_impl(&self, repair: Repair) -> Result<CheckReport> {
        let mut st = self.alloc.lock();
        let cs = self.header.cluster_size();
        let mut rep = CheckReport {
            total_clusters: Some(u64::from(self.header.bat_entries)),
            compressed_clusters: Some(0),
            ..Default::default()
        };
        if st.unclean {
            // Only an image whose close clears the flag (open for writing,
            // without a format extension) can be repaired.
            let fix = repair == Repair::All && st.marked;
            let verb = if fix { "Repairing" } else { "ERROR" };
            rep.messages.push(format!("{verb} image was not closed correctly"));
            if fix {
                // The flag itself is cleared when the image closes.
                st.unclean = false;
                rep.corruptions_fixed += 1;
            } else {
                rep.corruptions += 1;
            }
        }
        let (mut allocated, mut fragmented, mut high, mut prev) = (0u64, 0u64, None::<u64>, 0u64);
        for e in self.bat.iter().map(|e| e.load(Ordering::Acquire)) {
            if e == 0 {
                prev = 0;
                continue;
            }
            let off = self.host_of(e);
            allocated += 1;
            if prev != 0 && prev + cs != off {
                fragmented += 1;
            }
            prev = off;
            high = Some(high.map_or(off, |h: u64| h.max(off)));
        }
        rep.allocated_clusters = Some(allocated);
        rep.fragmented_clusters = Some(fragmented);
        let mut end = high.map_or(self.header.data_start, |h| h + cs);
        if self.header.ext_off != 0 {
            end = end.max(self.header.ext_off + cs);
        }
        rep.image_end_offset = Some(end);
        let len = self.storage.len()?;
        if len > end {
            let count = (len - end).div_ceil(cs);
            let fix = repair != Repair::None;
            let verb = if fix { "Repairing" } else { "ERROR" };
            rep.messages
                .push(format!("{verb} space leaked at the end of the image {}", len - end));
            if fix {
                self.storage.flush()?;
                self.storage.set_len(end)?;
                st.data_end = end;
                rep.leaks_fixed += count;
            } else {
                rep.leaks += count;
            }
        }
        Ok(rep)
    }
}
