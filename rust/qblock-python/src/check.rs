//! Binding of the consistency check (`qblock_core::tools::check`): the
//! whole run (open, check, repair, check again) happens detached from the
//! interpreter; the reports come back as dicts named as `CheckReport`.

use crate::errors::to_pyerr;
use crate::image::{format_arg, location, run};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qblock_core::driver::{CheckReport, Repair};
use qblock_core::tools::check;
use qblock_core::Error;

fn report<'py>(py: Python<'py>, r: &CheckReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("corruptions", r.corruptions)?;
    d.set_item("leaks", r.leaks)?;
    d.set_item("check_errors", r.check_errors)?;
    d.set_item("corruptions_fixed", r.corruptions_fixed)?;
    d.set_item("leaks_fixed", r.leaks_fixed)?;
    d.set_item("image_end_offset", r.image_end_offset)?;
    d.set_item("total_clusters", r.total_clusters)?;
    d.set_item("allocated_clusters", r.allocated_clusters)?;
    d.set_item("fragmented_clusters", r.fragmented_clusters)?;
    d.set_item("compressed_clusters", r.compressed_clusters)?;
    d.set_item("messages", r.messages.clone())?;
    Ok(d)
}

/// `(format, first report, second report or None)`; `repair` is "none",
/// "leaks" or "all".
#[pyfunction]
#[pyo3(signature = (protocol, target, fmt, repair, force_share = false))]
#[allow(clippy::type_complexity)]
pub fn check_image<'py>(
    py: Python<'py>,
    protocol: &str,
    target: &str,
    fmt: Option<&str>,
    repair: &str,
    force_share: bool,
) -> PyResult<(&'static str, Bound<'py, PyDict>, Option<Bound<'py, PyDict>>)> {
    let loc = location(protocol, target);
    let fmt = format_arg(fmt).map_err(|e| to_pyerr(py, e))?;
    let mode = match repair {
        "none" => Repair::None,
        "leaks" => Repair::Leaks,
        "all" => Repair::All,
        other => {
            return Err(to_pyerr(
                py,
                Error::InvalidParam(format!("repair must be 'none', 'leaks' or 'all', not '{other}'")),
            ))
        }
    };
    let r = run(py, || check::check(&loc, fmt, mode, force_share))?;
    let second = r.second.as_ref().map(|s| report(py, s)).transpose()?;
    Ok((r.format.name(), report(py, &r.first)?, second))
}
