//! The one error type of the engine.
//!
//! Each variant matches one Python exception class of `libqblock.errors`
//! (the bindings convert in exactly one place). An OS failure keeps its errno
//! so Python can expose it as `.errno`; it surfaces as `InternalError` unless
//! the failure has a more precise meaning (a held lock is `ImageLocked`).

use std::io;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The seven classes of failure the public API distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidParam,
    Internal,
    NoMemory,
    OutOfRange,
    Unsupported,
    CorruptImage,
    ImageLocked,
    /// A long job (convert, checksum, ...) stopped because its caller's
    /// progress callback asked it to; the bindings re-raise the caller's own
    /// exception instead of mapping this kind to a class.
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    NoMemory(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    CorruptImage(String),
    #[error("{0}")]
    ImageLocked(String),
    #[error("{0}")]
    Cancelled(String),
    /// An OS call failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidParam(_) => ErrorKind::InvalidParam,
            Error::Internal(_) | Error::Os { .. } => ErrorKind::Internal,
            Error::NoMemory(_) => ErrorKind::NoMemory,
            Error::OutOfRange(_) => ErrorKind::OutOfRange,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::CorruptImage(_) => ErrorKind::CorruptImage,
            Error::ImageLocked(_) => ErrorKind::ImageLocked,
            Error::Cancelled(_) => ErrorKind::Cancelled,
        }
    }

    /// The errno of a failed OS call, 0 otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(0),
            _ => 0,
        }
    }

    pub fn os(context: impl Into<String>, source: io::Error) -> Error {
        Error::Os {
            context: context.into(),
            source,
        }
    }

    /// Prefix the message with where it happened, keeping kind and errno.
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::InvalidParam(m) => Error::InvalidParam(format!("{what}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{what}: {m}")),
            Error::NoMemory(m) => Error::NoMemory(format!("{what}: {m}")),
            Error::OutOfRange(m) => Error::OutOfRange(format!("{what}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{what}: {m}")),
            Error::CorruptImage(m) => Error::CorruptImage(format!("{what}: {m}")),
            Error::ImageLocked(m) => Error::ImageLocked(format!("{what}: {m}")),
            Error::Cancelled(m) => Error::Cancelled(format!("{what}: {m}")),
            Error::Os { context, source } => Error::Os {
                context: format!("{what}: {context}"),
                source,
            },
        }
    }
}

/// Shorthand constructors used by the format parsers.
pub fn corrupt(msg: impl Into<String>) -> Error {
    Error::CorruptImage(msg.into())
}
pub fn unsupported(msg: impl Into<String>) -> Error {
    Error::Unsupported(msg.into())
}
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidParam(msg.into())
}

/// Allocate a zeroed buffer whose size comes from an image, failing cleanly
/// instead of aborting when the allocator refuses.
pub fn try_zeroed(len: usize, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::NoMemory(format!("cannot allocate {len} bytes for {what}")))?;
    v.resize(len, 0);
    Ok(v)
}
