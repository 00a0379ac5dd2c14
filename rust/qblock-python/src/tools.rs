//! Bindings of the whole-image jobs (`qblock_core::tools`): the job runs
//! detached from the interpreter; the progress callback is called attached,
//! at most every 100 ms, and an exception it raises stops the job and is
//! re-raised as it was.

use crate::image::{run, PyImage};
use pyo3::prelude::*;
use qblock_core::tools::{checksum, compare, convert, Progress};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_millis(100);

/// Calls a Python callable with `(done, total)`; remembers what it raised.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    last: Option<Instant>,
    raised: Option<PyErr>,
}

impl PyProgress {
    fn new(callback: Option<Py<PyAny>>) -> Self {
        PyProgress {
            callback,
            last: None,
            raised: None,
        }
    }

    /// The job's result as Python sees it: the callback's own exception
    /// when it stopped the job.
    fn finish<T>(self, r: PyResult<T>) -> PyResult<T> {
        match (r, self.raised) {
            (Err(_), Some(e)) => Err(e),
            (r, _) => r,
        }
    }
}

impl Progress for PyProgress {
    fn report(&mut self, done: u64, total: u64) -> bool {
        let Some(cb) = &self.callback else { return true };
        let now = Instant::now();
        if done < total && self.last.is_some_and(|t| now - t < EVERY) {
            return true;
        }
        self.last = Some(now);
        Python::attach(|py| match cb.call1(py, (done, total)) {
            Ok(_) => true,
            Err(e) => {
                self.raised = Some(e);
                false
            }
        })
    }
}

/// `sources`: (image, start, length) pieces copied one after another.
#[pyfunction]
#[pyo3(signature = (sources, target, sparse_min, threads, progress=None))]
pub fn convert_images(
    py: Python<'_>,
    sources: Vec<(PyRef<'_, PyImage>, u64, u64)>,
    target: PyRef<'_, PyImage>,
    sparse_min: u64,
    threads: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let imgs = sources
        .iter()
        .map(|(i, s, l)| Ok((i.get(py)?, *s, *l)))
        .collect::<PyResult<Vec<_>>>()?;
    let target = target.get(py)?;
    let opts = convert::ConvertOptions { sparse_min, threads };
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let pieces: Vec<convert::Piece<'_>> = imgs
            .iter()
            .map(|(i, s, l)| convert::Piece {
                image: i,
                start: *s,
                len: *l,
            })
            .collect();
        convert::convert(&pieces, &target, &opts, &mut p)
    });
    p.finish(r)
}

#[pyfunction]
#[pyo3(signature = (image, threads, progress=None))]
pub fn checksum_image(
    py: Python<'_>,
    image: PyRef<'_, PyImage>,
    threads: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let img = image.get(py)?;
    let mut p = PyProgress::new(progress);
    let r = run(py, || checksum::checksum(&img, threads, &mut p));
    p.finish(r)
}

/// `(kind, offset)`: ("identical", None), ("content", off), ("size", None)
/// or ("allocation", off).
#[pyfunction]
#[pyo3(signature = (a, b, strict, progress=None))]
pub fn compare_images(
    py: Python<'_>,
    a: PyRef<'_, PyImage>,
    b: PyRef<'_, PyImage>,
    strict: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<(&'static str, Option<u64>)> {
    let (a, b) = (a.get(py)?, b.get(py)?);
    let mut p = PyProgress::new(progress);
    let r = run(py, || compare::compare(&a, &b, strict, &mut p));
    let v = p.finish(r)?;
    Ok(match v {
        compare::Verdict::Identical => ("identical", None),
        compare::Verdict::ContentMismatch(o) => ("content", Some(o)),
        compare::Verdict::SizeMismatch => ("size", None),
        compare::Verdict::AllocationMismatch(o) => ("allocation", Some(o)),
    })
}
