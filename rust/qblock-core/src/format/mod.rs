//! One module per image format, and the registry's list of them. Adding a
//! format touches its own module and, if it is new, one line here.

pub mod bochs;
pub mod bytes;
pub mod cloop;
pub mod cow;
pub mod deflate;
pub mod dmg;
pub mod inflate;
pub mod luks;
pub mod paged;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use crate::registry::FormatEntry;

/// Every format the registry knows. An entry whose `open`/`create` is None
/// raises `Unsupported` (the format is recognised, not yet served). On equal
/// probe scores the earlier entry wins: qcow (version 1) is listed before
/// qcow2, whose probe matches the shared magic.
pub static ENTRIES: &[FormatEntry] = &[
    qcow::ENTRY,
    qcow2::ENTRY,
    raw::ENTRY,
    qed::ENTRY,
    cow::ENTRY,
    vdi::ENTRY,
    vmdk::ENTRY,
    vpc::ENTRY,
    vhdx::ENTRY,
    luks::ENTRY,
    parallels::ENTRY,
    dmg::ENTRY,
    bochs::ENTRY,
    cloop::ENTRY,
];

pub fn entries() -> impl Iterator<Item = &'static FormatEntry> {
    ENTRIES.iter()
}

#[cfg(test)]
mod tests {
    use crate::backend::memory::MemoryStorage;
    use crate::format_name::Format;
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
