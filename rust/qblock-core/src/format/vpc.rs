//! vpc (Virtual PC / VHD). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use super::bytes::{tail512};
use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry { format: Format::Vpc, probe: Some(probe), open: None, create: None };

fn probe(h: &[u8], s: &dyn Storage) -> u32 {
    // Fixed VHDs carry their footer only at the end.
    if h.starts_with(b"conectix") || tail512(s).is_some_and(|t| t.starts_with(b"conectix")) {
        100
    } else {
        0
    }
}
