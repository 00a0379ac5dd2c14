//! The internal snapshot table (docs/interop/qcow2.txt: "Snapshots"): its
//! entries read and written byte for byte as QEMU lays them out, and the
//! lookups QEMU's tools use. The operations on snapshots (which change
//! refcounts and L1 tables) are in `snapshot_ops`.
//!
//! An entry: a 40-byte fixed part (L1 table offset and size, id and name
//! lengths, date, VM clock, 32-bit VM state size, extra data size), the
//! extra data (64-bit VM state size, disk size, icount; anything after what
//! we know is kept as is), the id, the name, zero padding to 8 bytes.

use super::header::Header;
use super::types::*;
use crate::backend::Storage;
use crate::driver::SnapshotInfo;
use crate::error::{corrupt, invalid, try_zeroed, unsupported, Result};

/// QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the whole table is at most 64 MiB.
pub const MAX_SNAPSHOT_TABLE: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA.
pub const MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// Fixed part of a snapshot header.
const FIXED: u64 = 40;
/// The extra data fields we know (vm_state_size_large, disk_size, icount):
/// what QEMU writes in every entry since it records icount.
const EXTRA_KNOWN: usize = 24;
/// "No icount recorded" (QEMU writes -1; entries without the field mean it too).
pub const NO_ICOUNT: u64 = u64::MAX;
/// QEMU hands names to its tools in 256-byte buffers (QEMUSnapshotInfo's
/// `name`), cutting longer ones: we refuse names it could not show whole.
pub const MAX_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Raw bytes, as stored (QEMU treats them as C strings).
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// The virtual size when the snapshot was taken; an entry too old to
    /// record it takes the image's size at open, as QEMU reads it.
    pub disk_size: u64,
    pub icount: u64,
    /// Extra data past the fields we know, written back unchanged.
    pub extra_rest: Vec<u8>,
}

impl Snapshot {
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: String::from_utf8_lossy(&self.id).into_owned(),
            name: String::from_utf8_lossy(&self.name).into_owned(),
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: (self.icount != NO_ICOUNT).then_some(self.icount),
        }
    }
}

/// The live table: where it is on disk (`len` bytes, 0 without snapshots)
/// and its entries in order.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub offset: u64,
    pub len: u64,
    pub list: Vec<Snapshot>,
}

impl Table {
    /// The snapshot `key` names: an id first, then a name (QEMU's order),
    /// the first match in table order.
    pub fn find(&self, key: &str) -> Option<usize> {
        let k = key.as_bytes();
        self.list
            .iter()
            .position(|s| s.id == k)
            .or_else(|| self.list.iter().position(|s| s.name == k))
    }

    /// The id QEMU gives a new snapshot: one more than the largest id read
    /// as a decimal number (as strtoul reads it: leading digits, else 0).
    pub fn next_id(&self) -> Result<String> {
        let max = self.list.iter().map(|s| leading_number(&s.id)).max().unwrap_or(0);
        max.checked_add(1)
            .map(|n| n.to_string())
            .ok_or_else(|| unsupported("no snapshot id is left after 18446744073709551615"))
    }
}

/// strtoul's value of an id: optional blanks and '+', then digits;
/// saturating as strtoul does.
fn leading_number(s: &[u8]) -> u64 {
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    if i < s.len() && s[i] == b'+' {
        i += 1;
    }
    s[i..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
}

/// Check a name for a new snapshot.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid("a snapshot needs a name"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid(format!(
            "a snapshot name takes at most {MAX_NAME} bytes, not {}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(invalid("a snapshot name cannot contain a NUL byte"));
    }
    Ok(())
}

/// Read and check every snapshot entry. Returns the entries and the
/// table's length in bytes. Reads are bounded by the caps above.
pub fn read_table(file: &dyn Storage, h: &Header, file_len: u64) -> Result<(Vec<Snapshot>, u64)> {
    let cs = h.cluster_size();
    let aligned_len = align_up(file_len, cs)?;
    let inside = |p: u64, n: u64| {
        h.snapshots_offset
            .checked_add(p)
            .and_then(|a| a.checked_add(n))
            .is_some_and(|e| e <= aligned_len)
    };
    let mut out = Vec::new();
    let mut p = 0u64; // offset within the table
    for i in 0..h.nb_snapshots {
        if !inside(p, FIXED) {
            return Err(corrupt(format!("snapshot {i} lies past the end of the file")));
        }
        let mut fixed = [0u8; FIXED as usize];
        file.read_at(&mut fixed, h.snapshots_offset + p)?;
        let extra = u64::from(be32(&fixed, 36));
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(format!(
                "snapshot {i} claims {extra} bytes of extra data (at most 1024)"
            )));
        }
        let var = extra + id_len + name_len; // at most 1024 + 2 * 65535
        let next = align_up(p + FIXED + var, 8)?;
        if next > MAX_SNAPSHOT_TABLE {
            return Err(corrupt("the snapshot table is larger than 64 MiB"));
        }
        if !inside(p, next - p) {
            return Err(corrupt(format!("snapshot {i} lies past the end of the file")));
        }
        let mut rest = try_zeroed(var as usize, "snapshot entry")?;
        file.read_at(&mut rest, h.snapshots_offset + p + FIXED)?;
        let (ex, strings) = rest.split_at(extra as usize);
        let (id, name) = strings.split_at(id_len as usize);
        let field = |at: usize| (ex.len() >= at + 8).then(|| be64(ex, at));
        let s = Snapshot {
            l1_table_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id: id.to_vec(),
            name: name.to_vec(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: field(0).unwrap_or(u64::from(be32(&fixed, 32))),
            disk_size: field(8).unwrap_or(h.size),
            icount: field(16).unwrap_or(NO_ICOUNT),
            extra_rest: ex.get(EXTRA_KNOWN..).unwrap_or_default().to_vec(),
        };
        let l1_bytes = u64::from(s.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "snapshot {i} has an L1 table of {} entries",
                s.l1_size
            )));
        }
        if l1_bytes > 0
            && (!s.l1_table_offset.is_multiple_of(cs)
                || s.l1_table_offset < cs
                || s.l1_table_offset.checked_add(l1_bytes).is_none_or(|e| e > aligned_len))
        {
            return Err(corrupt(format!(
                "snapshot {i} L1 table at {:#x} is invalid",
                s.l1_table_offset
            )));
        }
        out.push(s);
        p = next;
    }
    Ok((out, p))
}

/// The table's bytes, as QEMU writes them: every entry with the extra data
/// we know (plus what we kept), 8-byte aligned.
pub fn serialize(list: &[Snapshot]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for s in list {
        let extra = EXTRA_KNOWN + s.extra_rest.len();
        let (Ok(id_len), Ok(name_len)) = (u16::try_from(s.id.len()), u16::try_from(s.name.len())) else {
            return Err(invalid("a snapshot id or name is longer than 65535 bytes"));
        };
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // A state too big for the old field reads as none to old readers,
        // rather than as a truncated one (QEMU's rule).
        out.extend_from_slice(&u32::try_from(s.vm_state_size).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(extra as u32).to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.to_be_bytes());
        out.extend_from_slice(&s.icount.to_be_bytes());
        out.extend_from_slice(&s.extra_rest);
        out.extend_from_slice(&s.id);
        out.extend_from_slice(&s.name);
        out.resize(out.len().div_ceil(8) * 8, 0);
        if out.len() as u64 > MAX_SNAPSHOT_TABLE {
            return Err(unsupported("the snapshot table would be larger than 64 MiB"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x10000,
            l1_size: 2,
            id: id.as_bytes().to_vec(),
            name: name.as_bytes().to_vec(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 5_000_000_001,
            vm_state_size: 1 << 33,
            disk_size: 1 << 30,
            icount: NO_ICOUNT,
            extra_rest: Vec::new(),
        }
    }

    fn header_for(off: u64, nb: u32) -> Header {
        Header {
            cluster_bits: 16,
            nb_snapshots: nb,
            snapshots_offset: off,
            size: 7 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn table_round_trips_with_qemus_layout() {
        let mut b = snap("1", "first");
        b.extra_rest = vec![0xee; 8]; // a future field, kept
        let list = vec![snap("12", "a name of 13 b"), b];
        let raw = serialize(&list).unwrap();
        // 40 + 24 + 2 + 14 = 80; 40 + 32 + 1 + 5 = 78 -> 80.
        assert_eq!(raw.len(), 160);
        assert_eq!(be32(&raw, 36), 24);
        assert_eq!(be32(&raw, 32), 0, "an 8 GiB state is none in the 32-bit field");
        assert_eq!(be32(&raw, 80 + 36), 32);
        let f = MemoryStorage::new(vec![0; 0x30000], false);
        f.write_at(&raw, 0x20000).unwrap();
        let (back, len) = read_table(&f, &header_for(0x20000, 2), 0x30000).unwrap();
        assert_eq!((back, len), (list, 160));
    }

    #[test]
    fn old_entries_take_the_current_size_and_no_icount() {
        let raw = serialize(&[snap("1", "x")]).unwrap();
        // Cut the extra data to 16 bytes, then to none (QEMU 1.x wrote neither).
        for extra in [16u32, 0] {
            let mut e = raw[..40].to_vec();
            e[36..40].copy_from_slice(&extra.to_be_bytes());
            e[32..36].copy_from_slice(&77u32.to_be_bytes());
            e.extend_from_slice(&raw[40..40 + extra as usize]);
            e.extend_from_slice(b"1x");
            let f = MemoryStorage::new(vec![0; 0x30000], false);
            f.write_at(&e, 0x20000).unwrap();
            let (back, _) = read_table(&f, &header_for(0x20000, 1), 0x30000).unwrap();
            assert_eq!(back[0].icount, NO_ICOUNT);
            assert_eq!(back[0].info().icount, None);
            assert_eq!(back[0].disk_size, if extra == 16 { 1 << 30 } else { 7 << 20 });
            assert_eq!(back[0].vm_state_size, if extra == 16 { 1 << 33 } else { 77 });
        }
    }

    #[test]
    fn lookups_and_ids_follow_qemu() {
        let t = Table {
            list: vec![snap("1", "2"), snap("2", "b"), snap("x9", "c"), snap(" +7z", "d")],
            ..Default::default()
        };
        assert_eq!(t.find("2"), Some(1), "an id wins over a name");
        assert_eq!(t.find("b"), Some(1));
        assert_eq!(t.find("nope"), None);
        assert_eq!(t.next_id().unwrap(), "8");
        assert_eq!(Table::default().next_id().unwrap(), "1");
        let full = Table {
            list: vec![snap("99999999999999999999999", "a")],
            ..Default::default()
        };
        assert!(full.next_id().is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("ok").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a\0b").is_err());
        assert!(check_name(&"n".repeat(256)).is_err());
        assert!(check_name(&"n".repeat(255)).is_ok());
    }

    #[test]
    fn hostile_tables_are_refused_without_big_reads() {
        let f = MemoryStorage::new(vec![0; 0x20000], false);
        // An entry whose strings run past the end of the file.
        let mut e = serialize(&[snap("1", "x")]).unwrap();
        e[12..14].copy_from_slice(&0xffffu16.to_be_bytes());
        f.write_at(&e, 0x1ff00).unwrap();
        assert!(read_table(&f, &header_for(0x1ff00, 1), 0x20000).is_err());
        // More entries than the file holds.
        assert!(read_table(&f, &header_for(0x10000, 60000), 0x20000).is_err());
    }
}
