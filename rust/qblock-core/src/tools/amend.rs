//! `qemu-img amend`: change the creation options of an existing image in
//! place. Only qcow2 has amendable options (as in QEMU, whose other
//! drivers with an amend hook, luks included, change only encryption
//! keys, which we do not offer yet); every other format is refused with
//! QEMU's message.

use super::Progress;
use crate::error::{unsupported, Result};
use crate::format::qcow2::amend::{self as qcow2_amend, AmendOptions};
use crate::format_name::Format;
use crate::location::Location;
use crate::registry;

/// Amend the image at `location`; `format` None probes it.
pub fn amend(
    location: &Location,
    format: Option<Format>,
    opts: &AmendOptions,
    progress: &mut dyn Progress,
) -> Result<()> {
    let format = match format {
        Some(f) => f,
        None => registry::probe(location.open_storage(true)?.as_ref())?,
    };
    match format {
        Format::Qcow2 => qcow2_amend::amend(location, opts, progress),
        other => Err(unsupported(format!(
            "Format driver '{other}' does not support option amendment"
        ))),
    }
}
