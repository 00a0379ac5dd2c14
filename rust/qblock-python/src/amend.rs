//! Binding of `qblock_core::tools::amend`: options arrive already named
//! and typed by `libqblock.amend`; the job runs detached, the progress
//! callback attached (see `tools.rs`).

use crate::image::{format_arg, location, run};
use crate::tools::PyProgress;
use pyo3::prelude::*;
use qblock_core::format::qcow2::amend::{AmendOptions, Compat};
use qblock_core::tools::amend;

/// Amend the image at (protocol, target) in place.
#[pyfunction]
#[pyo3(signature = (protocol, target, format=None, compat=None, lazy_refcounts=None, refcount_bits=None,
                    size=None, backing_file=None, backing_fmt=None, data_file=None, data_file_raw=None,
                    progress=None))]
#[allow(clippy::too_many_arguments)] // one keyword per qemu-img option
pub fn amend_image(
    py: Python<'_>,
    protocol: String,
    target: String,
    format: Option<String>,
    compat: Option<String>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u64>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let fmt = format_arg(format.as_deref())?;
        let opts = AmendOptions {
            compat: compat.as_deref().map(Compat::parse).transpose()?,
            lazy_refcounts,
            refcount_bits,
            size,
            backing_file,
            backing_fmt,
            data_file,
            data_file_raw,
        };
        amend::amend(&location(&protocol, &target), fmt, &opts, &mut p)
    });
    p.finish(r)
}
