//! Bindings of internal snapshots (`Image::snapshots`, `snapshot_create`,
//! `snapshot_apply`, `snapshot_delete`): module functions taking the native
//! image, each run detached from the interpreter.

use crate::image::{run, PyImage};
use pyo3::prelude::*;
use qblock_core::driver::SnapshotInfo;

/// (id, name, vm_state_size, date_sec, date_nsec, vm_clock_nsec, icount)
type SnapshotTuple = (String, String, u64, u64, u32, u64, Option<u64>);

fn tuple(s: SnapshotInfo) -> SnapshotTuple {
    (
        s.id,
        s.name,
        s.vm_state_size,
        s.date_sec,
        s.date_nsec,
        s.vm_clock_nsec,
        s.icount,
    )
}

/// The image's internal snapshots, oldest first.
#[pyfunction]
pub fn snapshot_list(py: Python<'_>, image: PyRef<'_, PyImage>) -> PyResult<Vec<SnapshotTuple>> {
    let img = image.get(py)?;
    let list = run(py, || img.snapshots())?;
    Ok(list.into_iter().map(tuple).collect())
}

/// Record the current state as a new snapshot; returns it.
#[pyfunction]
pub fn snapshot_create(py: Python<'_>, image: PyRef<'_, PyImage>, name: String) -> PyResult<SnapshotTuple> {
    let img = image.get(py)?;
    run(py, || img.snapshot_create(&name)).map(tuple)
}

/// Make the snapshot with this id or name the current state.
#[pyfunction]
pub fn snapshot_apply(py: Python<'_>, image: PyRef<'_, PyImage>, id_or_name: String) -> PyResult<()> {
    let img = image.get(py)?;
    run(py, || img.snapshot_apply(&id_or_name))
}

/// Delete the snapshot with this id or name.
#[pyfunction]
pub fn snapshot_delete(py: Python<'_>, image: PyRef<'_, PyImage>, id_or_name: String) -> PyResult<()> {
    let img = image.get(py)?;
    run(py, || img.snapshot_delete(&id_or_name))
}
