//! Unit tests of the driver on in-memory images.
