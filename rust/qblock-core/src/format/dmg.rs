//! dmg (Apple UDIF). No driver yet: recognised by its magic so that opening
//! raises `Unsupported` instead of serving the container bytes as a raw disk.

use super::bytes::{tail512};
use crate::backend::Storage;
use crate::format_name::Format;
use crate::registry::FormatEntry;

pub const ENTRY: FormatEntry = FormatEntry { format: Format::Dmg, probe: Some(probe), open: None, create: None };

fn probe(_h: &[u8], s: &dyn Storage) -> u32 {
    // The "koly" trailer in the last 512 bytes.
    if tail512(s).is_some_and(|t| t.starts_with(b"koly")) {
        100
    } else {
        0
    }
}
