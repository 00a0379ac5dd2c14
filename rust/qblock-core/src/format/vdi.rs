//! vdi (VirtualBox). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use super::bytes::{le32};
use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry { format: Format::Vdi, probe: Some(probe), open: None, create: None };

fn probe(h: &[u8], _s: &dyn Storage) -> u32 {
    if le32(h, 0x40) == Some(0xbeda_107f) {
        100
    } else {
        0
    }
}
