//! What the engine reports besides its results: repairs it makes (on a
//! writable open, or asked by `check -r`), dirty images served as they are,
//! and slow paths it falls back to. Through the `log` facade, so the engine
//! stays free of any logging backend; targets are `libqblock.<area>`, which
//! the Python binding forwards to the `logging` logger of that very name.
//!
//! Only rare events go here (once per open, per check, per file): nothing
//! is logged per request.

use crate::location::Location;
use crate::Format;

/// The logger a format's events go to: `libqblock.qcow2`, `libqblock.vmdk`...
fn format_target(format: Format) -> String {
    format!("libqblock.{}", format.name())
}

/// A writable open changed the image to make it consistent again.
pub fn repaired_on_open(format: Format, location: &Location, what: &str) {
    log::warn!(target: &format_target(format), "'{}' repaired on open: {what}", location.describe());
}

/// An image that was not closed cleanly, opened without repairing it.
pub fn dirty_served_as_is(format: Format, location: &Location, what: &str) {
    log::info!(target: &format_target(format), "'{}' is dirty: {what}", location.describe());
}

/// A dirty image opened: `repaired` tells which of the two happened.
pub fn dirty_on_open(format: Format, location: &Location, repaired: bool, as_is: &str, repair: &str) {
    if repaired {
        repaired_on_open(format, location, repair)
    } else {
        dirty_served_as_is(format, location, as_is)
    }
}

/// Something a format does that the user may not expect, at info level.
pub fn format_note(format: Format, location: &Location, what: &str) {
    log::info!(target: &format_target(format), "'{}': {what}", location.describe());
}

/// A repair made by `check` with a repair mode.
pub fn check_repaired(location: &Location, leaks: u64, corruptions: u64) {
    log::warn!(
        target: "libqblock.check",
        "'{}': check repaired {leaks} leaked cluster(s) and {corruptions} corruption(s)",
        location.describe()
    );
}

/// The format of an image was probed and came out raw: a warning when it
/// is opened for writing (where the risk is), debug otherwise.
pub fn probed_raw(location: &Location, read_only: bool) {
    let level = if read_only { log::Level::Debug } else { log::Level::Warn };
    log::log!(
        target: "libqblock.probe",
        level,
        "no format was given for '{}' and probing found raw: a guest that writes an image header \
         into its first sector would make a later probe read it as that format; pass fmt= to be safe",
        location.describe()
    );
}

/// A slow path of the storage layer, once per opened file.
pub fn slow_path(what: &str, path: &std::path::Path) {
    log::debug!(target: "libqblock.storage", "'{}': {what}", path.display());
}

/// Image locks are not available on this file system.
pub fn unlocked(path_or_name: &str, errno: i32) {
    log::warn!(
        target: "libqblock.lock",
        "the file system cannot lock '{path_or_name}' ({}): opened without image locks, as QEMU's \
         locking=auto does",
        std::io::Error::from_raw_os_error(errno)
    );
}

/// A logger for the engine's own tests: keeps every record, so a test can
/// look for the ones naming its (unique, temporary) file.
#[cfg(test)]
pub mod capture {
    use parking_lot::Mutex;

    static RECORDS: Mutex<Vec<(log::Level, String, String)>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            RECORDS
                .lock()
                .push((r.level(), r.target().to_string(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture;

    /// The (level, target, message) records whose message contains `needle`.
    pub fn records_naming(needle: &str) -> Vec<(log::Level, String, String)> {
        if log::set_logger(&CAPTURE).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
        RECORDS
            .lock()
            .iter()
            .filter(|r| r.2.contains(needle))
            .cloned()
            .collect()
    }

    /// Install the capture before the code under test runs.
    pub fn install() {
        let _ = records_naming("");
    }
}
