//! `libqblock._native`: PyO3 bindings over qblock-core. Conversion, GIL
//! release and error mapping only; no format knowledge lives here.

mod amend;
mod buffer;
mod check;
mod errors;
mod fault;
mod image;
mod logbridge;
mod snapshot;
mod tools;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logbridge::install();
    m.add_class::<image::PyImage>()?;
    m.add_function(wrap_pyfunction!(image::open, m)?)?;
    m.add_function(wrap_pyfunction!(image::create, m)?)?;
    m.add_function(wrap_pyfunction!(image::probe, m)?)?;
    m.add_function(wrap_pyfunction!(image::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(image::formats, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot::snapshot_list, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot::snapshot_create, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot::snapshot_apply, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot::snapshot_delete, m)?)?;
    m.add_function(wrap_pyfunction!(tools::convert_images, m)?)?;
    m.add_function(wrap_pyfunction!(tools::convert_stream, m)?)?;
    m.add_function(wrap_pyfunction!(tools::checksum_image, m)?)?;
    m.add_function(wrap_pyfunction!(tools::compare_images, m)?)?;
    m.add_function(wrap_pyfunction!(tools::commit_image, m)?)?;
    m.add_function(wrap_pyfunction!(tools::rebase_image, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_image, m)?)?;
    m.add_function(wrap_pyfunction!(amend::amend_image, m)?)?;
    m.add_function(wrap_pyfunction!(fault::fault_arm, m)?)?;
    m.add_function(wrap_pyfunction!(fault::fault_status, m)?)?;
    m.add_function(wrap_pyfunction!(fault::fault_disarm, m)?)?;
    Ok(())
}
