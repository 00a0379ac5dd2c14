//! One module per image format, and the registry's list of them.

pub mod known;
pub mod qcow2;
pub mod raw;

use crate::registry::FormatEntry;

/// Every format with a driver.
pub static DRIVERS: &[FormatEntry] = &[raw::ENTRY, qcow2::ENTRY];

/// Every entry the registry consults: drivers first, then formats known
/// only by their magic (opening them raises `Unsupported`). On equal probe
/// scores the earlier entry wins.
pub fn entries() -> impl Iterator<Item = &'static FormatEntry> {
    known::ENTRIES.iter().filter(|e| e.format == crate::Format::Qcow).chain(DRIVERS).chain(
        known::ENTRIES.iter().filter(|e| e.format != crate::Format::Qcow),
    )
}
