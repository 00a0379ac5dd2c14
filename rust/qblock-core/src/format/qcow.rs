//! qcow (QEMU copy-on-write version 1). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use super::bytes::{be32};
use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry { format: Format::Qcow, probe: Some(probe), open: None, create: None };

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    // Shares qcow2's magic; the version tells them apart.
    if h.starts_with(b"QFI\xfb") && be32(h, 4) == Some(1) {
        100
    } else {
        0
    }
}
