//! The fault-injecting backend's controls (`libqblock.faults`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use qblock_core::backend::fault::{self, FaultKind, FaultPlan, FaultStatus, Unflushed};
use std::path::PathBuf;

fn status_tuple(s: FaultStatus) -> (u64, bool) {
    (s.ops, s.fired)
}

/// Arm a plan on a folder: `kind` is count, fail, drop or cut; `at` the
/// index of the mutating operation it strikes; `unflushed` (keep, lose,
/// random) what a cut does with writes not yet flushed.
#[pyfunction]
pub fn fault_arm(dir: PathBuf, kind: &str, at: u64, unflushed: &str, seed: u64) -> PyResult<()> {
    let kind = match kind {
        "count" => FaultKind::Count,
        "fail" => FaultKind::Fail,
        "drop" => FaultKind::Drop,
        "cut" => FaultKind::Cut,
        _ => return Err(PyValueError::new_err(format!("unknown fault kind {kind:?}"))),
    };
    let unflushed = match unflushed {
        "keep" => Unflushed::Keep,
        "lose" => Unflushed::Lose,
        "random" => Unflushed::Random,
        _ => return Err(PyValueError::new_err(format!("unknown unflushed policy {unflushed:?}"))),
    };
    fault::arm(&dir, FaultPlan::new(kind, at, unflushed, seed));
    Ok(())
}

/// (operations counted, whether the fault fired) of the folder's plan.
#[pyfunction]
pub fn fault_status(dir: PathBuf) -> Option<(u64, bool)> {
    fault::status(&dir).map(status_tuple)
}

/// Disarm the folder; its plan's last status.
#[pyfunction]
pub fn fault_disarm(dir: PathBuf) -> Option<(u64, bool)> {
    fault::disarm(&dir).map(status_tuple)
}
