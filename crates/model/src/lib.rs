//! Kiln's resource model: the kinds as Rust types, their defaults, and validation that names field paths.
//!
//! Architecture invariant: this crate does no I/O and depends on no async runtime. Everything here is a pure
//! function of its input, which is what lets the server, the CLI and the fuzz targets share it.

mod error;
mod meta;

pub use error::{FieldError, Invalid};
pub use meta::{Condition, ConditionStatus, Kind, ObjectMeta, Resource, Scope, API_VERSION};
