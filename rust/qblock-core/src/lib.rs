//! qblock-core: the libqblock engine. Pure Rust, no Python: image formats
//! (`format`), storage backends (`backend`), backing chains and the shared
//! I/O loops (`image`). See DESIGN.md for the layers.

pub mod backend;
pub mod driver;
pub mod error;
pub mod events;
pub mod format;
pub mod format_name;
pub mod image;
pub mod info;
pub mod location;
pub mod options;
pub mod reference;
pub mod registry;
pub mod tools;

pub use error::{Error, ErrorKind, Result};
pub use format_name::Format;
pub use image::{BlockStatus, Image, ImageInfo, OpenOptions};
pub use location::Location;
pub use options::{CreateOptions, OptValue};
pub use reference::{RefKind, Reference, References};
