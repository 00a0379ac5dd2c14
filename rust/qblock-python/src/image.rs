//! The `Image` class and the module functions: argument conversion, the GIL
//! released around every engine call, results turned back into Python values.

use crate::buffer::HeldBuffer;
use crate::errors::{guarded, to_pyerr};
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use qblock_core::info::InfoValue;
use qblock_core::{BlockStatus, CreateOptions, Error, Format, Image, Location, OpenOptions, OptValue, References};
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) fn location(protocol: &str, target: &str) -> Location {
    match protocol {
        "file" => Location::file(target),
        other => Location::Other {
            protocol: other.to_string(),
            target: target.to_string(),
        },
    }
}

pub(crate) fn format_arg(name: Option<&str>) -> Result<Option<Format>, Error> {
    match name {
        None => Ok(None),
        Some(n) => Format::from_name(n)
            .map(Some)
            .ok_or_else(|| Error::InvalidParam(format!("unknown format '{n}'"))),
    }
}

/// Run `f` detached from the interpreter, guarded against panics.
pub(crate) fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    let r = py.detach(|| guarded(f));
    crate::logbridge::drain(py);
    r.map_err(|e| to_pyerr(py, e))
}

#[pyclass(frozen, module = "libqblock._native", name = "Image")]
pub struct PyImage {
    inner: RwLock<Option<Arc<Image>>>,
}

impl PyImage {
    pub(crate) fn get(&self, py: Python<'_>) -> PyResult<Arc<Image>> {
        self.inner
            .read()
            .clone()
            .ok_or_else(|| to_pyerr(py, Error::InvalidParam("the image is closed".into())))
    }
}

fn status_tuple(py: Python<'_>, s: BlockStatus) -> PyResult<Bound<'_, PyAny>> {
    let (file, off) = match s.host {
        Some((f, o)) => (Some(f), Some(o)),
        None => (None, None),
    };
    Ok((
        s.offset,
        s.len,
        s.allocated,
        s.present,
        s.data,
        s.zero,
        s.compressed,
        s.depth,
        file,
        off,
    )
        .into_pyobject(py)?
        .into_any())
}

fn info_value<'py>(py: Python<'py>, v: &InfoValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        InfoValue::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        InfoValue::Int(i) => i.into_pyobject(py)?.into_any(),
        InfoValue::UInt(u) => u.into_pyobject(py)?.into_any(),
        InfoValue::Str(s) => s.into_pyobject(py)?.into_any(),
        InfoValue::List(items) => {
            let l = PyList::empty(py);
            for i in items {
                l.append(info_value(py, i)?)?;
            }
            l.into_any()
        }
        InfoValue::Map(items) => info_map(py, items)?.into_any(),
    })
}

fn info_map<'py>(py: Python<'py>, items: &[(String, InfoValue)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in items {
        d.set_item(k, info_value(py, v)?)?;
    }
    Ok(d)
}

#[pymethods]
impl PyImage {
    /// Read `length` bytes at `offset` into a new bytes object.
    fn read<'py>(&self, py: Python<'py>, length: u64, offset: u64) -> PyResult<Bound<'py, PyBytes>> {
        let img = self.get(py)?;
        let len = usize::try_from(length).map_err(|_| to_pyerr(py, Error::OutOfRange("length too large".into())))?;
        // A bytes object left uninitialised (PyBytes::new_with would zero it
        // first: ~5% of a cached 4 KiB read) and filled detached. Nothing
        // else can see it before we return it; on error it is dropped unread.
        // SAFETY: a NULL source asks CPython for an uninitialised object of
        // `len` bytes; a NULL result means it raised (MemoryError).
        let ptr = unsafe { pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t) };
        // SAFETY: ptr is a new reference or NULL with an exception set.
        let bytes = unsafe { Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>() };
        let raw = crate::buffer::RawBytes {
            // SAFETY: ptr is a live bytes object of exactly `len` bytes.
            ptr: unsafe { pyo3::ffi::PyBytes_AsString(bytes.as_ptr()) } as *mut u8,
            len,
        };
        // SAFETY: `bytes` is alive (owned here) across the detached call.
        run(py, move || img.read_at(unsafe { raw.as_mut_slice() }, offset))?;
        Ok(bytes)
    }

    /// Fill a writable buffer with the bytes at `offset`; returns its length.
    fn readinto(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        let img = self.get(py)?;
        let held = HeldBuffer::get(buffer, true)?;
        let raw = held.raw();
        // SAFETY: `held` outlives the detached call (dropped below, attached).
        run(py, move || img.read_at(unsafe { raw.as_mut_slice() }, offset))?;
        drop(held);
        Ok(raw.len)
    }

    /// Write any bytes-like object at `offset`; returns its length.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        let img = self.get(py)?;
        let held = HeldBuffer::get(data, false)?;
        let raw = held.raw();
        // SAFETY: `held` outlives the detached call (dropped below, attached).
        run(py, move || img.write_at(unsafe { raw.as_slice() }, offset))?;
        drop(held);
        Ok(raw.len)
    }

    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        let img = self.get(py)?;
        run(py, || img.write_zeroes(offset, length))
    }

    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        let img = self.get(py)?;
        run(py, || img.discard(offset, length))
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let img = self.get(py)?;
        run(py, || img.flush())
    }

    fn truncate(&self, py: Python<'_>, size: u64) -> PyResult<()> {
        let img = self.get(py)?;
        run(py, || img.truncate(size))
    }

    /// Flush and release the image; a second close does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        // A second close does nothing, as for Python's files.
        let img = self.inner.write().take();
        match img {
            None => Ok(()),
            Some(img) => run(py, || img.close()),
        }
    }

    fn __repr__(&self) -> String {
        match self.inner.read().as_ref() {
            None => "<libqblock._native.Image closed>".into(),
            Some(img) => format!(
                "<libqblock._native.Image {} {} {} bytes {}>",
                img.format().name(),
                img.location().describe(),
                img.virtual_size(),
                if img.read_only() { "read-only" } else { "read-write" }
            ),
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().is_none()
    }

    #[getter]
    fn virtual_size(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.get(py)?.virtual_size())
    }

    #[getter]
    fn format(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(self.get(py)?.format().name())
    }

    /// (offset, length, allocated, present, data, zero, compressed, depth, file, file_offset)
    fn block_status<'py>(&self, py: Python<'py>, offset: u64, length: u64) -> PyResult<Bound<'py, PyAny>> {
        let img = self.get(py)?;
        let s = run(py, || img.block_status(offset, length))?;
        status_tuple(py, s)
    }

    fn check_allocation(&self, py: Python<'_>, start: u64, length: u64) -> PyResult<(bool, u64)> {
        let img = self.get(py)?;
        run(py, || img.check_allocation(start, length))
    }

    /// Merged extents of a range (the whole disk by default), as tuples.
    #[pyo3(signature = (start=0, length=None))]
    fn map<'py>(&self, py: Python<'py>, start: u64, length: Option<u64>) -> PyResult<Bound<'py, PyList>> {
        let img = self.get(py)?;
        let len = length.unwrap_or_else(|| img.virtual_size().saturating_sub(start));
        let extents = run(py, || img.map_range(start, len))?;
        let l = PyList::empty(py);
        for s in extents {
            l.append(status_tuple(py, s)?)?;
        }
        Ok(l)
    }

    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let img = self.get(py)?;
        let i = run(py, || img.info())?;
        let d = PyDict::new(py);
        d.set_item("filename", i.filename)?;
        d.set_item("format", i.format.name())?;
        d.set_item("virtual_size", i.virtual_size)?;
        d.set_item("actual_size", i.actual_size)?;
        d.set_item("backing_filename", i.backing_filename)?;
        d.set_item("full_backing_filename", i.full_backing_filename)?;
        d.set_item("backing_format", i.backing_format)?;
        d.set_item("encrypted", i.encrypted)?;
        d.set_item("cluster_size", i.cluster_size)?;
        d.set_item("dirty", i.dirty)?;
        d.set_item("format_specific", info_map(py, &i.format_specific)?)?;
        Ok(d)
    }
}

/// Open an image; `fmt` None probes. `references` is the policy for the
/// files the chain names: "any", "confined" (to the image's folder and
/// `allowed_dirs`) or "none".
#[pyfunction]
#[pyo3(signature = (protocol, target, fmt=None, read_only=false, no_backing=false, write_through=false, no_flush=false, snapshot=false, direct=false, force_share=false, references="any", allowed_dirs=Vec::new(), allow_protocols=false))]
#[allow(clippy::too_many_arguments)]
pub fn open(
    py: Python<'_>,
    protocol: &str,
    target: &str,
    fmt: Option<&str>,
    read_only: bool,
    no_backing: bool,
    write_through: bool,
    no_flush: bool,
    snapshot: bool,
    direct: bool,
    force_share: bool,
    references: &str,
    allowed_dirs: Vec<PathBuf>,
    allow_protocols: bool,
) -> PyResult<PyImage> {
    let loc = location(protocol, target);
    let fmt = format_arg(fmt).map_err(|e| to_pyerr(py, e))?;
    let references = match references {
        "any" => References::Any,
        "confined" => References::Confined(allowed_dirs),
        "none" => References::None,
        other => {
            return Err(to_pyerr(
                py,
                Error::InvalidParam(format!("references must be 'any', 'confined' or 'none', not '{other}'")),
            ))
        }
    };
    let opts = OpenOptions {
        read_only,
        no_backing,
        write_through,
        no_flush,
        snapshot,
        direct,
        force_share,
        references,
        allow_protocols,
        ..Default::default()
    };
    let img = run(py, || Image::open(&loc, fmt, &opts))?;
    Ok(PyImage {
        inner: RwLock::new(Some(Arc::new(img))),
    })
}

/// Read an image alone and report the files it names, opening none of
/// them: a dict of format, size, features and `references` (dicts).
#[pyfunction]
#[pyo3(signature = (protocol, target, fmt=None, allowed=Vec::new()))]
pub fn inspect<'py>(
    py: Python<'py>,
    protocol: &str,
    target: &str,
    fmt: Option<&str>,
    allowed: Vec<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let loc = location(protocol, target);
    let fmt = format_arg(fmt).map_err(|e| to_pyerr(py, e))?;
    let r = run(py, || qblock_core::reference::inspect(&loc, fmt, &allowed))?;
    let d = PyDict::new(py);
    d.set_item("format", r.format.to_string())?;
    d.set_item("virtual_size", r.virtual_size)?;
    d.set_item("cluster_size", r.info.cluster_size)?;
    d.set_item("encrypted", r.info.encrypted)?;
    d.set_item("dirty", r.info.dirty)?;
    d.set_item("format_specific", info_map(py, &r.info.format_specific)?)?;
    let refs = PyList::empty(py);
    for x in &r.references {
        let e = PyDict::new(py);
        e.set_item("kind", x.kind.name())?;
        e.set_item("name", &x.name)?;
        e.set_item("format", &x.format)?;
        e.set_item("location", x.location.describe())?;
        e.set_item(
            "path",
            match &x.location {
                Location::File(p) => Some(p.clone()),
                Location::Other { .. } => None,
            },
        )?;
        e.set_item("protocol", &x.protocol)?;
        e.set_item("absolute", x.absolute)?;
        e.set_item("real_path", &x.real_path)?;
        e.set_item("inside", x.inside)?;
        e.set_item("exists", x.exists)?;
        refs.append(e)?;
    }
    d.set_item("references", refs)?;
    Ok(d)
}

/// Create an image from QEMU-named options (`size`, `backing_file`, ...).
#[pyfunction]
pub fn create(py: Python<'_>, protocol: &str, target: &str, fmt: &str, options: &Bound<'_, PyDict>) -> PyResult<()> {
    let loc = location(protocol, target);
    let fmt = format_arg(Some(fmt)).map_err(|e| to_pyerr(py, e))?.expect("some");
    let opts = create_options(py, options)?;
    run(py, || Image::create(&loc, fmt, opts))
}

/// QEMU-named creation options from a dict of ints, bools and strings.
pub(crate) fn create_options(py: Python<'_>, options: &Bound<'_, PyDict>) -> PyResult<CreateOptions> {
    let mut opts = CreateOptions::new();
    for (k, v) in options.iter() {
        let key: String = k.extract()?;
        let val = if let Ok(b) = v.cast::<pyo3::types::PyBool>() {
            OptValue::Bool(b.is_true())
        } else if let Ok(i) = v.extract::<u64>() {
            OptValue::Int(i)
        } else if let Ok(s) = v.extract::<String>() {
            OptValue::Str(s)
        } else {
            return Err(to_pyerr(
                py,
                Error::InvalidParam(format!("option '{key}' has an unusable value")),
            ));
        };
        opts.set(&key, val);
    }
    Ok(opts)
}

/// The format a probe finds for an image.
#[pyfunction]
pub fn probe(py: Python<'_>, protocol: &str, target: &str) -> PyResult<&'static str> {
    let loc = location(protocol, target);
    run(py, || {
        let s = loc.open_storage(true)?;
        qblock_core::registry::probe(s.as_ref()).map(|f| f.name())
    })
}

/// Every format the engine knows: (name, can open, can create).
#[pyfunction]
pub fn formats() -> Vec<(&'static str, bool, bool)> {
    qblock_core::format::entries()
        .map(|e| (e.format.name(), e.open.is_some(), e.create.is_some()))
        .collect()
}
