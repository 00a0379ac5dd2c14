//! `qemu-img check`: open an image the way a check opens it, check it
//! (repairing as asked), and when the repair fixed anything, check it again
//! to report what is left, as qemu-img's "Double checking the fixed image".

use crate::driver::{CheckReport, Repair};
use crate::error::Result;
use crate::format_name::Format;
use crate::image::{Image, OpenOptions};
use crate::location::Location;

/// What one `check` run found.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub format: Format,
    /// The first pass: with a repair, what it found and fixed.
    pub first: CheckReport,
    /// The second pass, after a repair that fixed something.
    pub second: Option<CheckReport>,
}

/// Check the image at `location` (its format probed when `format` is
/// None). The image is opened read-only unless a repair is asked for, and
/// without its backing chain: a check looks at this file's metadata only.
/// `force_share`: check an image another process may have open for
/// writing (`qemu-img check -U`; what is read may be changing), read-only
/// checks only.
pub fn check(location: &Location, format: Option<Format>, repair: Repair, force_share: bool) -> Result<CheckRun> {
    let opts = OpenOptions {
        read_only: repair == Repair::None,
        no_backing: true,
        check: true,
        force_share,
        ..Default::default()
    };
    let img = Image::open(location, format, &opts)?;
    let run = check_open(&img, repair);
    // A failed check still closes (flushes) what a repair may have written.
    let closed = img.close();
    let run = run?;
    closed?;
    Ok(run)
}

fn check_open(img: &Image, repair: Repair) -> Result<CheckRun> {
    let first = img.check(repair)?;
    let fixed = first.leaks_fixed > 0 || first.corruptions_fixed > 0;
    if fixed {
        crate::events::check_repaired(img.location(), first.leaks_fixed, first.corruptions_fixed);
    }
    let second = if repair != Repair::None && fixed {
        Some(img.check(Repair::None)?)
    } else {
        None
    };
    Ok(CheckRun {
        format: img.format(),
        first,
        second,
    })
}
