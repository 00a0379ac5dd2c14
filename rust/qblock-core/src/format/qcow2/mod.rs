//! qcow2 (QEMU copy-on-write v2/v3), per docs/interop/qcow2.txt.

use crate::registry::FormatEntry;
use crate::format_name::Format;

/// Placeholder until the driver lands: known by name, probed by magic.
pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Qcow2,
    probe: Some(|head, _| if head.starts_with(b"QFI\xfb") { 100 } else { 0 }),
    open: None,
    create: None,
};
