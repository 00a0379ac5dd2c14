//! Formats recognised by their magic but without a driver yet. Probing them
//! matters even before they can be read: an image in one of these formats
//! must raise `Unsupported` on open, never be served as a raw disk of its
//! container bytes. Each moves to its own module when its driver lands.

use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

const fn probe_only(format: Format, probe: crate::registry::ProbeFn) -> FormatEntry {
    FormatEntry { format, probe: Some(probe), open: None, create: None }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The last 512 bytes of the storage, where VHD (fixed) and DMG keep their
/// footers.
fn tail(storage: &dyn Storage) -> Option<[u8; 512]> {
    let len = storage.len().ok()?;
    if len < 512 {
        return None;
    }
    let mut buf = [0u8; 512];
    storage.read_at(&mut buf, len - 512).ok()?;
    Some(buf)
}

pub static ENTRIES: &[FormatEntry] = &[
    // qcow version 1 shares qcow2's magic; the version tells them apart.
    probe_only(Format::Qcow, |h, _| if h.starts_with(b"QFI\xfb") && be32(h, 4) == Some(1) { 100 } else { 0 }),
    probe_only(Format::Qed, |h, _| if h.starts_with(b"QED\0") { 100 } else { 0 }),
    // UML cow: magic "OOOM" then version 2 (both big-endian).
    probe_only(Format::Cow, |h, _| if be32(h, 0) == Some(0x4f4f_4f4d) && be32(h, 4) == Some(2) { 100 } else { 0 }),
    probe_only(Format::Vdi, |h, _| if le32(h, 0x40) == Some(0xbeda_107f) { 100 } else { 0 }),
    probe_only(Format::Vmdk, |h, _| {
        if h.starts_with(b"KDMV") || h.starts_with(b"COWD") {
            100
        } else if h.starts_with(b"# Disk DescriptorFile") {
            100
        } else {
            0
        }
    }),
    probe_only(Format::Vpc, |h, s| {
        if h.starts_with(b"conectix") {
            100
        } else if tail(s).is_some_and(|t| t.starts_with(b"conectix")) {
            // Fixed VHDs carry their footer only at the end.
            100
        } else {
            0
        }
    }),
    probe_only(Format::Vhdx, |h, _| if h.starts_with(b"vhdxfile") { 100 } else { 0 }),
    probe_only(Format::Luks, |h, _| if h.starts_with(b"LUKS\xba\xbe") { 100 } else { 0 }),
    probe_only(Format::Parallels, |h, _| {
        if h.starts_with(b"WithoutFreeSpace") || h.starts_with(b"WithouFreSpacExt") {
            100
        } else {
            0
        }
    }),
    probe_only(Format::Bochs, |h, _| if h.starts_with(b"Bochs Virtual HD Image\0") { 100 } else { 0 }),
    probe_only(Format::Cloop, |h, _| {
        if h.starts_with(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n") {
            100
        } else {
            0
        }
    }),
    // DMG (UDIF): the "koly" trailer in the last 512 bytes.
    probe_only(Format::Dmg, |_, s| if tail(s).is_some_and(|t| t.starts_with(b"koly")) { 100 } else { 0 }),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;
    use crate::registry::probe;

    fn probed(data: Vec<u8>) -> Format {
        probe(&MemoryStorage::new(data, true)).unwrap()
    }

    #[test]
    fn magics_are_recognised() {
        let mut qcow1 = b"QFI\xfb\0\0\0\x01".to_vec();
        qcow1.resize(512, 0);
        assert_eq!(probed(qcow1), Format::Qcow);
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(512, 0);
        assert_eq!(probed(qcow2), Format::Qcow2);
        let mut vhd_fixed = vec![0u8; 4096];
        vhd_fixed[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(probed(vhd_fixed), Format::Vpc);
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probed(vdi), Format::Vdi);
        assert_eq!(probed(b"vhdxfile".to_vec()), Format::Vhdx);
        assert_eq!(probed(vec![0u8; 100]), Format::Raw);
        assert_eq!(probed(Vec::new()), Format::Raw);
    }
}
