//! Borrowing Python buffers for zero-copy I/O.
//!
//! We ask for a C-contiguous view without a format, so any buffer exporter
//! works as bytes: bytearray, memoryview, mmap, array.array, numpy arrays of
//! any dtype.

use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use std::mem::MaybeUninit;

/// The buffer protocol, declared here because the wheel is built for the
/// stable ABI from CPython 3.9 (abi3-py39) and pyo3-ffi only exposes it from
/// 3.11, the release that entered these two functions and `Py_buffer` into
/// the limited API unchanged (bpo-45459). They have kept this exact layout
/// and these symbols since CPython 3.3, and 3.9 and 3.10 are end-of-life, so
/// nothing can change under the older interpreters: the wheel test runs the
/// zero-copy paths on every CPython this machine has.
#[allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
mod ffi {
    use pyo3::ffi::{PyObject, Py_ssize_t};
    use std::os::raw::{c_char, c_int, c_void};

    #[repr(C)]
    pub struct Py_buffer {
        pub buf: *mut c_void,
        pub obj: *mut PyObject,
        pub len: Py_ssize_t,
        pub itemsize: Py_ssize_t,
        pub readonly: c_int,
        pub ndim: c_int,
        pub format: *mut c_char,
        pub shape: *mut Py_ssize_t,
        pub strides: *mut Py_ssize_t,
        pub suboffsets: *mut Py_ssize_t,
        pub internal: *mut c_void,
    }

    pub const PyBUF_WRITABLE: c_int = 0x0001;
    /// PyBUF_STRIDES | 0x0020, as in CPython's object.h.
    pub const PyBUF_C_CONTIGUOUS: c_int = 0x0038;

    extern "C" {
        pub fn PyObject_GetBuffer(obj: *mut PyObject, view: *mut Py_buffer, flags: c_int) -> c_int;
        pub fn PyBuffer_Release(view: *mut Py_buffer);
    }
}

/// A held `Py_buffer`; released on drop (which must happen with the GIL held,
/// so it is dropped in the attached part of the caller).
pub struct HeldBuffer {
    view: Box<ffi::Py_buffer>,
}

/// Pointer and length of a held buffer, to carry into a detached section.
#[derive(Clone, Copy)]
pub struct RawBytes {
    pub ptr: *mut u8,
    pub len: usize,
}
// SAFETY: the pointer stays valid while the HeldBuffer that produced it is
// alive (the exporter cannot resize or free an exported buffer). Other Python
// threads may still write into the same memory concurrently; as with any
// C extension doing I/O into a shared buffer, the bytes are then unspecified,
// but memory safety holds because we only read/write within [ptr, ptr+len).
unsafe impl Send for RawBytes {}

impl HeldBuffer {
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<HeldBuffer> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::uninit());
        let flags = ffi::PyBUF_C_CONTIGUOUS | if writable { ffi::PyBUF_WRITABLE } else { 0 };
        // SAFETY: obj is a live object; view points to writable memory for
        // one Py_buffer. On success the view is initialised and must be
        // released with PyBuffer_Release, which Drop does.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) };
        if rc != 0 {
            let err = PyErr::take(obj.py()).unwrap_or_else(|| PyBufferError::new_err("cannot get buffer"));
            return Err(err);
        }
        // SAFETY: initialised by the successful PyObject_GetBuffer above.
        let view = unsafe { Box::from_raw(Box::into_raw(view) as *mut ffi::Py_buffer) };
        Ok(HeldBuffer { view })
    }

    pub fn raw(&self) -> RawBytes {
        RawBytes {
            ptr: self.view.buf as *mut u8,
            len: self.view.len as usize,
        }
    }
}

impl Drop for HeldBuffer {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer and is released
        // once. Callers drop HeldBuffer while attached to the interpreter.
        unsafe { ffi::PyBuffer_Release(self.view.as_mut()) }
    }
}

impl RawBytes {
    /// SAFETY: call only while the HeldBuffer is alive, see above.
    pub unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
    /// SAFETY: call only while the HeldBuffer is alive, see above.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}
