//! cow (User Mode Linux copy-on-write). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use super::bytes::{be32};
use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry { format: Format::Cow, probe: Some(probe), open: None, create: None };

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    // Magic "OOOM", then version 2 (both big-endian).
    if be32(h, 0) == Some(0x4f4f_4f4d) && be32(h, 4) == Some(2) {
        100
    } else {
        0
    }
}
