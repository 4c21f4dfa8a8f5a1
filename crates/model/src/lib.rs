#![warn(missing_docs)]
//! Kiln's resource model: the kinds as Rust types, their defaults, and validation that names field paths.
//!
//! Architecture invariant: this crate does no I/O and depends on no async runtime. Everything here is a pure
//! function of its input, which is what lets the server, the CLI and the fuzz targets share it.
//!
//! The path of a manifest through this crate: [`decode_manifests`] turns text (YAML or JSON) into raw
//! [`Resource`]s, [`normalize`] checks one and fills in its defaults, [`references`] lists what it refers to.

pub mod cron;
pub mod decode;
mod error;
pub mod kinds;
mod meta;
mod names;
mod normalize;
mod quantity;
mod references;

pub use decode::{decode_manifests, DecodeError};
pub use error::{FieldError, Invalid};
pub use kinds::{builtin_roles, spec_schema, KindSpec};
pub use meta::{Condition, ConditionStatus, Kind, ObjectMeta, Resource, Scope, API_VERSION};
pub use names::{validate_label_key, validate_label_value, validate_name, MAX_NAME_LEN};
pub use normalize::{decode_spec, normalize, typed_spec, MAX_ANNOTATIONS_BYTES};
pub use quantity::Quantity;
pub use references::{references, Reference};
