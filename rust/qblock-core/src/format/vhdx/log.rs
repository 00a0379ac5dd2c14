//! The VHDX log (section 2.3): a circular buffer of entries, each a header,
//! descriptors (data or zero) and 4 KiB data sectors, sealed by a CRC-32C.
//! A file whose header names a log GUID may hold metadata updates that did
//! not reach their place; they are found (the active sequence: the valid
//! run of consecutive entries with the highest sequence number, from its
//! head's tail to its head) and replayed before the file is used.

use super::guid::Guid;
use super::header::{checksum, HEADER_SECTION_END};
use crate::error::{corrupt, try_zeroed, Result};
use crate::format::bytes::{le32, le64};

pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const DATA_DESC: &[u8; 4] = b"desc";
const ZERO_DESC: &[u8; 4] = b"zero";
const DATA_SECTOR: &[u8; 4] = b"data";
pub const SECTOR: usize = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;
/// Largest log we load to search (QEMU's logs are 1 MiB by default, Hyper-V
/// writes 1 MiB too; the format allows up to 4 GiB). The whole log is read
/// once, so this bounds memory.
pub const MAX_LOG: u64 = 256 << 20;
/// Largest file offset a log entry may name: 64 TiB of payload plus its
/// metadata stays far below this.
const MAX_FILE_OFFSET: u64 = 1 << 48;

/// One update the log makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// 4 KiB at a 4 KiB-aligned file offset.
    Data { offset: u64, bytes: Vec<u8> },
    /// A run of zeroes.
    Zero { offset: u64, len: u64 },
}

/// What replaying the active sequence does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub updates: Vec<Update>,
    /// The file must be at least this long afterwards.
    pub last_file_offset: u64,
    /// Sequence number of the head entry (for messages).
    pub head_sequence: u64,
}

struct Entry {
    len: usize,
    tail: u64,
    sequence: u64,
    last_file_offset: u64,
}

/// Bytes `[pos, pos+len)` of the circular log: borrowed unless they wrap,
/// so checking an entry as long as the log does not copy the log.
fn circular(log: &[u8], pos: usize, len: usize) -> std::borrow::Cow<'_, [u8]> {
    let n = log.len();
    let p = pos % n;
    if let Some(b) = log.get(p..p.saturating_add(len)) {
        return std::borrow::Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(len);
    let mut p = pos % n;
    let mut left = len;
    while left > 0 {
        let k = left.min(n - p);
        out.extend_from_slice(&log[p..p + k]);
        left -= k;
        p = (p + k) % n;
    }
    std::borrow::Cow::Owned(out)
}

/// The valid entry at `pos`, if there is one, with its updates.
/// Work budget of a log search, in bytes checksummed. Every 4 KiB sector
/// may claim to start an entry as long as the log: without a budget, a
/// hostile log costs (log size / 4 KiB) x log size of CRC work.
struct Budget(std::cell::Cell<u64>);

impl Budget {
    fn take(&self, n: usize) -> bool {
        let left = self.0.get();
        self.0.set(left.saturating_sub(n as u64));
        left >= n as u64
    }
    fn exhausted(&self) -> bool {
        self.0.get() == 0
    }
}

fn entry_at(log: &[u8], pos: usize, guid: &Guid, budget: &Budget) -> Option<(Entry, Vec<Update>)> {
    let n = log.len();
    let h = circular(log, pos, ENTRY_HEADER);
    if !h.starts_with(ENTRY_SIGNATURE) {
        return None;
    }
    let len = le32(&h, 8)? as usize;
    if len == 0 || !len.is_multiple_of(SECTOR) || len > n || h[32..48] != guid[..] {
        return None;
    }
    if !budget.take(len) {
        return None;
    }
    let e = circular(log, pos, len);
    if le32(&e, 4)? != checksum(&e, 4) {
        return None;
    }
    let entry = Entry {
        len,
        tail: le32(&e, 12)? as u64,
        sequence: le64(&e, 16)?,
        last_file_offset: le64(&e, 56)?,
    };
    let count = le32(&e, 24)? as usize;
    let desc_sectors = (ENTRY_HEADER + count.checked_mul(DESCRIPTOR)?).div_ceil(SECTOR);
    if desc_sectors * SECTOR > len || !(entry.tail as usize).is_multiple_of(SECTOR) || entry.tail as usize >= n {
        return None;
    }
    let mut updates = Vec::new();
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = &e[ENTRY_HEADER + DESCRIPTOR * i..ENTRY_HEADER + DESCRIPTOR * (i + 1)];
        let offset = le64(d, 16)?;
        if le64(d, 24)? != entry.sequence || !offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        if &d[0..4] == ZERO_DESC {
            let zlen = le64(d, 8)?;
            if !zlen.is_multiple_of(SECTOR as u64) || offset.checked_add(zlen)? > MAX_FILE_OFFSET {
                return None;
            }
            updates.push(Update::Zero { offset, len: zlen });
        } else if &d[0..4] == DATA_DESC {
            let s = e.get(data_sector * SECTOR..(data_sector + 1) * SECTOR)?;
            data_sector += 1;
            if !s.starts_with(DATA_SECTOR)
                || le32(s, 4)? != (entry.sequence >> 32) as u32
                || le32(s, 4092)? != entry.sequence as u32
                || offset > MAX_FILE_OFFSET
            {
                return None;
            }
            let mut bytes = Vec::with_capacity(SECTOR);
            bytes.extend_from_slice(&d[8..16]); // leading bytes
            bytes.extend_from_slice(&s[8..4092]);
            bytes.extend_from_slice(&d[4..8]); // trailing bytes
            updates.push(Update::Data { offset, bytes });
        } else {
            return None;
        }
    }
    Some((entry, updates))
}

/// Find the active sequence of a log (the whole log region in `log`) and
/// the updates it makes; None when nothing needs replaying.
pub fn find_replay(log: &[u8], guid: &Guid) -> Result<Option<Replay>> {
    let n = log.len();
    if n == 0 || !n.is_multiple_of(SECTOR) {
        return Err(corrupt(format!("VHDX log of {n} bytes is not whole 4 KiB sectors")));
    }
    // Enough to check every entry of a sane log a few times over.
    let budget = Budget(std::cell::Cell::new(8 * n as u64 + (64 << 20)));
    // Runs of consecutive valid entries: (positions, head sequence).
    let mut best: Option<(Vec<usize>, u64)> = None;
    let mut pos = 0usize;
    while pos < n {
        let Some((first, _)) = entry_at(log, pos, guid, &budget) else {
            pos += SECTOR;
            continue;
        };
        let mut run = vec![pos];
        let (mut cur, mut seq, mut len, mut walked) = (pos, first.sequence, first.len, first.len);
        loop {
            let next = (cur + len) % n;
            if walked >= n || next == pos {
                break;
            }
            match entry_at(log, next, guid, &budget) {
                Some((e, _)) if Some(e.sequence) == seq.checked_add(1) => {
                    run.push(next);
                    walked += e.len;
                    (cur, seq, len) = (next, e.sequence, e.len);
                }
                _ => break,
            }
        }
        let better = match &best {
            None => true,
            Some((r, s)) => seq > *s || (seq == *s && run.len() > r.len()),
        };
        let end = cur + len;
        if better {
            best = Some((run, seq));
        }
        // Continue after the run; a run that wrapped has seen the rest.
        if end <= pos || end >= n {
            break;
        }
        pos = end;
    }
    if budget.exhausted() {
        return Err(corrupt(
            "VHDX log: too many overlapping entry candidates to search (a hostile log?)",
        ));
    }
    let Some((run, head_seq)) = best else {
        return Ok(None);
    };
    // The active sequence was checked once within the budget; reading it
    // again costs at most one log size.
    let unbounded = Budget(std::cell::Cell::new(u64::MAX));
    let head_pos = *run.last().unwrap_or(&0);
    let (head, _) = entry_at(log, head_pos, guid, &unbounded).ok_or_else(|| corrupt("VHDX log head vanished"))?;
    let Some(start) = run.iter().position(|&p| p as u64 == head.tail) else {
        return Err(corrupt(format!(
            "VHDX log: the tail ({}) of the active sequence's head is not one of its entries",
            head.tail
        )));
    };
    let mut updates = Vec::new();
    for &p in &run[start..] {
        let (_, u) = entry_at(log, p, guid, &unbounded).ok_or_else(|| corrupt("VHDX log entry vanished"))?;
        for x in &u {
            let off = match x {
                Update::Data { offset, .. } | Update::Zero { offset, .. } => *offset,
            };
            if off < HEADER_SECTION_END {
                return Err(corrupt(format!(
                    "VHDX log entry writes into the header section (at {off})"
                )));
            }
        }
        updates.extend(u);
    }
    if head.last_file_offset > MAX_FILE_OFFSET {
        return Err(corrupt(format!(
            "VHDX log names a file size of {}",
            head.last_file_offset
        )));
    }
    Ok(Some(Replay {
        updates,
        last_file_offset: head.last_file_offset,
        head_sequence: head_seq,
    }))
}

/// Read the log region into memory for `find_replay`.
pub fn load(storage: &dyn crate::backend::Storage, offset: u64, len: u64) -> Result<Vec<u8>> {
    if len > MAX_LOG {
        return Err(crate::error::unsupported(format!(
            "VHDX log of {len} bytes is larger than the {} MiB this reader replays",
            MAX_LOG >> 20
        )));
    }
    let mut b = try_zeroed(len as usize, "the VHDX log")?;
    storage.read_at(&mut b, offset)?;
    Ok(b)
}

/// Build one log entry (tests, and the fuzz seeds): `sequence`, `tail`, data
/// sectors at the given offsets.
#[cfg(test)]
pub fn build_entry(guid: &Guid, sequence: u64, tail: u32, writes: &[(u64, Vec<u8>)], zeroes: &[(u64, u64)]) -> Vec<u8> {
    let count = writes.len() + zeroes.len();
    let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(SECTOR);
    let len = (desc_sectors + writes.len()) * SECTOR;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(ENTRY_SIGNATURE);
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&sequence.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[56..64].copy_from_slice(&(64u64 << 20).to_le_bytes());
    let mut d = ENTRY_HEADER;
    for (i, (off, bytes)) in writes.iter().enumerate() {
        e[d..d + 4].copy_from_slice(DATA_DESC);
        e[d + 4..d + 8].copy_from_slice(&bytes[4092..4096]);
        e[d + 8..d + 16].copy_from_slice(&bytes[0..8]);
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        d += DESCRIPTOR;
        let s = (desc_sectors + i) * SECTOR;
        e[s..s + 4].copy_from_slice(DATA_SECTOR);
        e[s + 4..s + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&bytes[8..4092]);
        e[s + 4092..s + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
    }
    for (off, zlen) in zeroes {
        e[d..d + 4].copy_from_slice(ZERO_DESC);
        e[d + 8..d + 16].copy_from_slice(&zlen.to_le_bytes());
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        d += DESCRIPTOR;
    }
    super::header::seal(&mut e, 4);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Guid = [3; 16];

    fn sector(v: u8) -> Vec<u8> {
        (0..SECTOR).map(|i| v.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn empty_log_needs_nothing() {
        assert_eq!(find_replay(&vec![0u8; 1 << 20], &G).unwrap(), None);
    }

    #[test]
    fn replays_the_highest_sequence_from_its_tail() {
        let mut log = vec![0u8; 64 * SECTOR];
        let a = build_entry(&G, 10, 0, &[(2 << 20, sector(1))], &[]);
        let b = build_entry(&G, 11, 0, &[(3 << 20, sector(2))], &[(4 << 20, 8192)]);
        log[..a.len()].copy_from_slice(&a);
        log[a.len()..a.len() + b.len()].copy_from_slice(&b);
        // An older, unrelated entry further on.
        let old = build_entry(&G, 3, (40 * SECTOR) as u32, &[(5 << 20, sector(3))], &[]);
        log[40 * SECTOR..40 * SECTOR + old.len()].copy_from_slice(&old);
        let r = find_replay(&log, &G).unwrap().unwrap();
        assert_eq!(r.head_sequence, 11);
        assert_eq!(
            r.updates,
            vec![
                Update::Data {
                    offset: 2 << 20,
                    bytes: sector(1)
                },
                Update::Data {
                    offset: 3 << 20,
                    bytes: sector(2)
                },
                Update::Zero {
                    offset: 4 << 20,
                    len: 8192
                },
            ]
        );
        // Another log GUID: nothing to replay.
        assert_eq!(find_replay(&log, &[4; 16]).unwrap(), None);
    }

    #[test]
    fn wrapping_sequence() {
        let mut log = vec![0u8; 8 * SECTOR];
        let a = build_entry(&G, 7, (6 * SECTOR) as u32, &[(2 << 20, sector(5))], &[]);
        let b = build_entry(&G, 8, (6 * SECTOR) as u32, &[(2 << 20, sector(6))], &[]);
        log[6 * SECTOR..8 * SECTOR].copy_from_slice(&a);
        log[..2 * SECTOR].copy_from_slice(&b);
        let r = find_replay(&log, &G).unwrap().unwrap();
        assert_eq!(r.updates.len(), 2);
        assert_eq!(
            r.updates[1],
            Update::Data {
                offset: 2 << 20,
                bytes: sector(6)
            }
        );
    }

    #[test]
    fn rejections() {
        // Bad checksum: the entry is not valid, so nothing replays.
        let mut log = vec![0u8; 16 * SECTOR];
        let mut a = build_entry(&G, 1, 0, &[(2 << 20, sector(1))], &[]);
        a[5000] ^= 1;
        log[..a.len()].copy_from_slice(&a);
        assert_eq!(find_replay(&log, &G).unwrap(), None);
        // Tail outside the sequence.
        let a = build_entry(&G, 1, (8 * SECTOR) as u32, &[(2 << 20, sector(1))], &[]);
        log[..a.len()].copy_from_slice(&a);
        assert!(find_replay(&log, &G).unwrap_err().to_string().contains("tail"));
        // A write into the header section.
        let a = build_entry(&G, 1, 0, &[(64 << 10, sector(1))], &[]);
        log[..a.len()].copy_from_slice(&a);
        assert!(find_replay(&log, &G)
            .unwrap_err()
            .to_string()
            .contains("header section"));
        assert!(find_replay(&[0u8; 100], &G).is_err());
        // Every sector claims an entry as long as the log, all with bad CRCs:
        // the search gives up instead of doing quadratic work.
        let mut log = vec![0u8; 4 << 20];
        for pos in (0..log.len()).step_by(SECTOR) {
            log[pos..pos + 4].copy_from_slice(ENTRY_SIGNATURE);
            log[pos + 8..pos + 12].copy_from_slice(&(4u32 << 20).to_le_bytes());
            log[pos + 32..pos + 48].copy_from_slice(&G);
        }
        let t = std::time::Instant::now();
        assert!(find_replay(&log, &G).unwrap_err().to_string().contains("hostile"));
        assert!(t.elapsed().as_secs() < 5);
    }
}
