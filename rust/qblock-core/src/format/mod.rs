//! One module per image format, and the registry's list of them.

pub mod qcow2;
pub mod raw;

use crate::registry::FormatEntry;

/// Every format with a driver. Formats absent here are known by name only
/// and raise `Unsupported` when opened or created.
pub static ENTRIES: &[FormatEntry] = &[raw::ENTRY, qcow2::ENTRY];
