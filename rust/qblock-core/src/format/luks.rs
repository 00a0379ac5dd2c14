//! luks (LUKS encrypted volumes). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry {
    format: Format::Luks,
    probe: Some(probe),
    open: None,
    create: None,
};

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if h.starts_with(b"LUKS\xba\xbe") {
        100
    } else {
        0
    }
}
