//! The one place that turns engine errors into Python exceptions. The
//! classes themselves are written in Python (`libqblock.errors`).

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use qblock_core::{Error, ErrorKind};

fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidParam => "InvalidParamError",
        ErrorKind::Internal => "InternalError",
        ErrorKind::NoMemory => "NoMemoryError",
        ErrorKind::OutOfRange => "OutOfRangeError",
        ErrorKind::Unsupported => "UnsupportedError",
        ErrorKind::CorruptImage => "CorruptImageError",
        ErrorKind::ImageLocked => "ImageLockedError",
        // Only reaches here if a job was cancelled without a Python
        // exception to re-raise (the tools' bindings re-raise it first).
        ErrorKind::Cancelled => "InternalError",
    }
}

/// Build the Python exception for an engine error: `cls(message, errno)`.
pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("libqblock.errors")?;
        let cls = module.getattr(class_name(e.kind()))?;
        let args = PyTuple::new(
            py,
            [
                e.to_string().into_pyobject(py)?.into_any(),
                e.errno().into_pyobject(py)?.into_any(),
            ],
        )?;
        let exc = cls.call1(args)?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|err| err)
}

/// Run engine code, turning a Rust panic into an `InternalError` instead of
/// letting PyO3's `PanicException` (a BaseException) escape `except Exception`.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Internal(format!(
                "internal error (a bug in libqblock, please report): {what}"
            )))
        }
    }
}
