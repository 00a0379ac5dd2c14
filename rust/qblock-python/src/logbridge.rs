//! The engine's `log` records, delivered to Python's `logging`.
//!
//! Records are queued, not logged where they happen: the engine runs
//! detached from the interpreter, often on worker threads, and taking the
//! GIL there could deadlock against a thread that holds it while waiting
//! for an engine lock (closing an image from a finalizer, say). The queue is
//! drained by every binding call once it is attached again (`image::run`),
//! into `logging.getLogger(record.target)`: the targets are
//! `libqblock.<area>` (see qblock_core::events). A bounded queue: past
//! `CAPACITY` waiting records new ones are counted, not kept, and the count
//! is logged when the queue drains.

use parking_lot::Mutex;
use pyo3::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const CAPACITY: usize = 1024;

struct Queued {
    level: u8,
    target: String,
    message: String,
}

static QUEUE: Mutex<VecDeque<Queued>> = Mutex::new(VecDeque::new());
/// Set when the queue may hold something: the hot paths test only this.
static PENDING: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Bridge;

/// Python's level numbers (logging.DEBUG ... logging.ERROR).
fn python_level(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug | log::Level::Trace => 10,
    }
}

impl log::Log for Bridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let target = record.target();
        let target = if target.starts_with("libqblock") {
            target.to_string()
        } else {
            // A dependency's record: under ours, its module path dotted.
            format!("libqblock.{}", target.replace("::", "."))
        };
        let mut q = QUEUE.lock();
        if q.len() >= CAPACITY {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back(Queued {
                level: python_level(record.level()),
                target,
                message: record.args().to_string(),
            });
        }
        PENDING.store(true, Ordering::Release);
    }

    fn flush(&self) {}
}

static BRIDGE: Bridge = Bridge;

/// Route the engine's records here (once, at module import).
pub fn install() {
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

/// Hand what is queued to `logging`. Errors raised by handlers are
/// `logging`'s to report (it prints them and goes on), so none escapes here.
pub fn drain(py: Python<'_>) {
    if !PENDING.load(Ordering::Acquire) {
        return;
    }
    let records: Vec<Queued> = {
        let mut q = QUEUE.lock();
        PENDING.store(false, Ordering::Release);
        q.drain(..).collect()
    };
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    let Ok(logging) = py.import("logging") else { return };
    for r in &records {
        if let Ok(logger) = logging.call_method1("getLogger", (r.target.as_str(),)) {
            let _ = logger.call_method1("log", (r.level, r.message.as_str()));
        }
    }
    if dropped > 0 {
        if let Ok(logger) = logging.call_method1("getLogger", ("libqblock",)) {
            let _ = logger.call_method1(
                "log",
                (
                    30u8,
                    format!("{dropped} log records were dropped (more than {CAPACITY} waiting)"),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_counts_records_instead_of_growing() {
        let record = |i: usize| {
            log::Log::log(
                &BRIDGE,
                &log::Record::builder()
                    .target("qblock_core::format::qcow2")
                    .level(log::Level::Info)
                    .args(format_args!("record {i}"))
                    .build(),
            )
        };
        for i in 0..CAPACITY + 10 {
            record(i);
        }
        let q = QUEUE.lock();
        assert_eq!(q.len(), CAPACITY);
        assert_eq!(DROPPED.load(Ordering::Relaxed), 10);
        assert!(PENDING.load(Ordering::Acquire));
        // A record with a module path for target goes under the libqblock logger.
        assert_eq!(q[0].target, "libqblock.qblock_core.format.qcow2");
        assert_eq!((q[0].level, q[0].message.as_str()), (20, "record 0"));
        assert_eq!(q[CAPACITY - 1].message, format!("record {}", CAPACITY - 1));
    }
}
