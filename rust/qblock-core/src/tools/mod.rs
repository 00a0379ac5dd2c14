//! Whole-image jobs built on [`crate::Image`]: convert, checksum, compare,
//! commit, rebase, check; and amend, which edits an image's metadata in place.
//! Each runs on the caller's thread plus a bounded set of workers, reports
//! progress through [`Progress`] and stops cleanly when it says so.

pub mod amend;
pub mod check;
pub mod checksum;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod rebase;
pub mod stream;
pub(crate) mod zeroes;

use crate::error::{Error, Result};

/// Told how far a job has come; returning `false` stops the job with
/// [`Error::Cancelled`]. Called on the thread that started the job.
pub trait Progress {
    fn report(&mut self, done: u64, total: u64) -> bool;
}

impl<F: FnMut(u64, u64) -> bool> Progress for F {
    fn report(&mut self, done: u64, total: u64) -> bool {
        self(done, total)
    }
}

fn cancelled() -> Error {
    Error::Cancelled("stopped by the progress callback".into())
}

/// Worker threads for a job: the caller's choice, else one per core.
fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        return requested.min(64);
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(64)
}

/// Run a worker's step, turning a panic (a bug) into an error so that the
/// thread waiting for its result is told instead of waiting for ever.
fn caught<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Error::Internal("a worker thread panicked (a bug in libqblock)".into())))
}
