//! Bindings of the whole-image jobs (`qblock_core::tools`): the job runs
//! detached from the interpreter; the progress callback is called attached,
//! at most every 100 ms, and an exception it raises stops the job and is
//! re-raised as it was.

use crate::errors::to_pyerr;
use crate::image::{create_options, format_arg, location, run, PyImage};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qblock_core::driver::BackingRef;
use qblock_core::tools::{checksum, commit, compare, convert, rebase, stream, Progress};
use qblock_core::{Error, Image, OpenOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_millis(100);

/// Calls a Python callable with `(done, total)`; remembers what it raised.
pub(crate) struct PyProgress {
    callback: Option<Py<PyAny>>,
    last: Option<Instant>,
    raised: Option<PyErr>,
}

impl PyProgress {
    pub(crate) fn new(callback: Option<Py<PyAny>>) -> Self {
        PyProgress {
            callback,
            last: None,
            raised: None,
        }
    }

    /// The job's result as Python sees it: the callback's own exception
    /// when it stopped the job.
    pub(crate) fn finish<T>(self, r: PyResult<T>) -> PyResult<T> {
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

/// The convert pieces of (image, start, length) triples.
fn pieces_of(imgs: &[(Arc<Image>, u64, u64)]) -> Vec<convert::Piece<'_>> {
    imgs.iter()
        .map(|(i, s, l)| convert::Piece {
            image: i,
            start: *s,
            len: *l,
        })
        .collect()
}

/// `sources`: (image, start, length) pieces copied one after another.
#[pyfunction]
#[pyo3(signature = (sources, target, sparse_min, threads, progress=None, compress=false))]
pub fn convert_images(
    py: Python<'_>,
    sources: Vec<(PyRef<'_, PyImage>, u64, u64)>,
    target: PyRef<'_, PyImage>,
    sparse_min: u64,
    threads: usize,
    progress: Option<Py<PyAny>>,
    compress: bool,
) -> PyResult<()> {
    let imgs = sources
        .iter()
        .map(|(i, s, l)| Ok((i.get(py)?, *s, *l)))
        .collect::<PyResult<Vec<_>>>()?;
    let target = target.get(py)?;
    let opts = convert::ConvertOptions {
        sparse_min,
        threads,
        compress,
    };
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let pieces = pieces_of(&imgs);
        convert::convert(&pieces, target.as_ref(), &opts, &mut p)
    });
    p.finish(r)
}

/// Writes to a Python binary file object; remembers what its `write` raised.
struct PySink {
    out: Py<PyAny>,
    raised: Arc<Mutex<Option<PyErr>>>,
}

impl std::io::Write for PySink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Python::attach(|py| {
            let b = pyo3::types::PyBytes::new(py, buf);
            match self.out.call_method1(py, "write", (b,)) {
                // A raw file may take part of it (and say so); None: all.
                Ok(r) => Ok(r
                    .extract::<Option<usize>>(py)
                    .ok()
                    .flatten()
                    .unwrap_or(buf.len())
                    .min(buf.len())),
                Err(e) => {
                    *self.raised.lock() = Some(e);
                    Err(std::io::Error::other("the output's write() raised"))
                }
            }
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Python::attach(|py| match self.out.call_method0(py, "flush") {
            Ok(_) => Ok(()),
            Err(e) => {
                *self.raised.lock() = Some(e);
                Err(std::io::Error::other("the output's flush() raised"))
            }
        })
    }
}

/// Convert `sources` into a new `format` image written front to back to
/// the binary file object `out`; returns the bytes written.
#[pyfunction]
#[pyo3(signature = (sources, format, options, out, sparse_min, threads, progress=None, compress=false))]
#[allow(clippy::too_many_arguments)]
pub fn convert_stream(
    py: Python<'_>,
    sources: Vec<(PyRef<'_, PyImage>, u64, u64)>,
    format: &str,
    options: &Bound<'_, PyDict>,
    out: Py<PyAny>,
    sparse_min: u64,
    threads: usize,
    progress: Option<Py<PyAny>>,
    compress: bool,
) -> PyResult<u64> {
    let imgs = sources
        .iter()
        .map(|(i, s, l)| Ok((i.get(py)?, *s, *l)))
        .collect::<PyResult<Vec<_>>>()?;
    let fmt = format_arg(Some(format)).map_err(|e| to_pyerr(py, e))?.expect("some");
    let mut create = create_options(py, options)?;
    let opts = convert::ConvertOptions {
        sparse_min,
        threads,
        compress,
    };
    let raised = Arc::new(Mutex::new(None));
    let sink = std::io::BufWriter::with_capacity(
        4 << 20,
        PySink {
            out,
            raised: raised.clone(),
        },
    );
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let pieces = pieces_of(&imgs);
        stream::convert_to_stream(&pieces, fmt, &mut create, Box::new(sink), &opts, &mut p)
    });
    // The output's own exception (a closed pipe) is the one to see.
    let r = match (r, raised.lock().take()) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => r,
    };
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

/// Commit `top` into its backing file, or into the layer of its chain at
/// `base` (protocol, target). Returns whether the top image was emptied.
#[pyfunction]
#[pyo3(signature = (top, base=None, empty=true, progress=None))]
pub fn commit_image(
    py: Python<'_>,
    top: PyRef<'_, PyImage>,
    base: Option<(String, String)>,
    empty: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<bool> {
    let top = top.get(py)?;
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let want = base.as_ref().map(|(proto, target)| location(proto, target).identity());
        let mut depth = 0u32;
        let mut layer = top.backing_image();
        let found = loop {
            let Some(l) = layer else { break None };
            depth += 1;
            if want.as_ref().is_none_or(|w| *w == l.location().identity()) {
                break Some(l);
            }
            layer = l.backing_image();
        };
        let Some(base_layer) = found else {
            return Err(match &base {
                None => Error::InvalidParam(format!(
                    "'{}' has no backing file to commit into",
                    top.location().describe()
                )),
                Some((_, t)) => Error::InvalidParam(format!(
                    "'{t}' is not in the backing chain of '{}'",
                    top.location().describe()
                )),
            });
        };
        let rw = OpenOptions::default();
        // The chain holds the base read-only, which keeps writers out, us too.
        base_layer.release_locks();
        let base_img = Image::open(base_layer.location(), Some(base_layer.format()), &rw)
            .map_err(|e| e.context("cannot open the base image for writing"))?;
        let r = commit::commit(&top, depth, &base_img, empty, &mut p);
        let closed = base_img.close();
        let emptied = r?;
        closed.map(|_| emptied)
    });
    p.finish(r)
}

/// Put `image` on the backing file `name` (relative to the image, as it
/// will be recorded; None: no backing file). Safe unless `unsafe_`: the
/// content is kept by copying what differs into the image first.
#[pyfunction]
#[pyo3(signature = (image, name, backing_format=None, unsafe_=false, progress=None))]
pub fn rebase_image(
    py: Python<'_>,
    image: PyRef<'_, PyImage>,
    name: Option<String>,
    backing_format: Option<String>,
    unsafe_: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let img = image.get(py)?;
    let mut p = PyProgress::new(progress);
    let r = run(py, || {
        let fmt = format_arg(backing_format.as_deref())?;
        let new_ref = name.as_ref().map(|n| BackingRef {
            filename: n.clone(),
            format: fmt.map(|f| f.name().to_string()),
        });
        if unsafe_ {
            img.set_backing(new_ref.as_ref())?;
            return img.flush();
        }
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let base = match &name {
            Some(n) => Some(
                Image::open(&img.location().relative(n), fmt, &ro)
                    .map_err(|e| e.context(format!("cannot open the new backing file '{n}'")))?,
            ),
            None => None,
        };
        // Record the format found when none was given, as qemu-img does.
        let new_ref = new_ref.map(|mut r| {
            if r.format.is_none() {
                r.format = base.as_ref().map(|b| b.format().name().to_string());
            }
            r
        });
        rebase::rebase(&img, base.as_ref(), new_ref.as_ref(), &mut p)
    });
    p.finish(r)
}
