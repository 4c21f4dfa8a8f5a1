//! Secret: named values given to pipeline steps and webhooks. The server seals every value (`sealed`) before it
//! is stored, so the store and its event log hold only ciphertext.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_not_blank, KindSpec};
use crate::names::key;
use crate::{FieldError, Kind, ObjectMeta};

fn default_type() -> String {
    "Opaque".into()
}

/// The spec of a Secret. Keys appear in either `data` (base64 values) or `stringData` (plain values), not both;
/// the server moves each into `sealed`, encrypted, before storing it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    /// What the values are for, e.g. `kubernetes.io/tls`. Default `Opaque`.
    #[serde(rename = "type", default = "default_type")]
    pub type_: String,
    /// Values in standard base64 (with padding).
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Values as plain text.
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
    /// Values as the server stored them, encrypted with its key (never shown: reads give each key with an
    /// empty value). On a write, an empty value keeps the key's stored value, so what `get` shows can be
    /// applied back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sealed: BTreeMap<String, String>,
}

impl SecretSpec {
    /// Every key, from `data`, `stringData` and `sealed`.
    pub fn keys(&self) -> std::collections::BTreeSet<&str> {
        self.data
            .keys()
            .chain(self.string_data.keys())
            .chain(self.sealed.keys())
            .map(String::as_str)
            .collect()
    }
}

impl KindSpec for SecretSpec {
    const KIND: Kind = Kind::Secret;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_not_blank(errors, "spec.type", &self.type_);
        for (k, v) in &self.data {
            let p = key("spec.data", k);
            check_key(errors, &p, k);
            if let Err(why) = check_base64(v) {
                errors.push(FieldError::new(
                    p,
                    format!("value is not valid base64: {why}"),
                ));
            }
        }
        for k in self.string_data.keys() {
            let p = key("spec.stringData", k);
            check_key(errors, &p, k);
            if self.data.contains_key(k) {
                errors.push(FieldError::new(
                    p,
                    "also set in spec.data; set each key once",
                ));
            }
        }
        for k in self.sealed.keys() {
            let p = key("spec.sealed", k);
            check_key(errors, &p, k);
            if self.data.contains_key(k) || self.string_data.contains_key(k) {
                errors.push(FieldError::new(
                    p,
                    "also set in spec.data or spec.stringData; set each key once",
                ));
            }
        }
    }
}

fn check_key(errors: &mut Vec<FieldError>, path: &str, k: &str) {
    let msg = if k.is_empty() {
        "key must not be empty".to_string()
    } else if k.len() > 253 {
        format!("key must be at most 253 characters, got {}", k.len())
    } else if k == "." || k == ".." {
        format!("key {k:?} is not allowed")
    } else if let Some(c) = k
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        format!("key {k:?} has {c:?}; use letters, digits, '-', '.' and '_'")
    } else {
        return;
    };
    errors.push(FieldError::new(path, msg));
}

/// Checks canonical standard base64 with `=` padding, saying what is wrong.
fn check_base64(s: &str) -> Result<(), String> {
    let bytes = s.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(format!("length {} is not a multiple of 4", bytes.len()));
    }
    let sextet = |b: u8| match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let padding = bytes.iter().rev().take_while(|b| **b == b'=').count();
    if padding > 2 {
        return Err("too much '=' padding".into());
    }
    let body = &bytes[..bytes.len() - padding];
    if let Some(pos) = body.iter().position(|b| sextet(*b).is_none()) {
        let c = s[pos..].chars().next().unwrap_or('?');
        return Err(format!(
            "{c:?} at position {} is not a base64 character",
            pos + 1
        ));
    }
    // The unused low bits of the last character before padding must be zero.
    let last = body.last().and_then(|b| sextet(*b)).unwrap_or(0);
    let unused_mask = match padding {
        1 => 0b11,
        2 => 0b1111,
        _ => 0,
    };
    if last & unused_mask != 0 {
        return Err("the last character before the padding is not canonical".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_base64;

    #[test]
    fn base64() {
        for ok in ["", "YQ==", "YWI=", "YWJj", "aGVsbG8gd29ybGQ=", "+/+/"] {
            assert_eq!(check_base64(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("YQ", "length 2 is not a multiple of 4"),
            ("Y===", "too much '=' padding"),
            ("YW*j", "'*' at position 3 is not a base64 character"),
            ("Y=Q=", "'=' at position 2 is not a base64 character"),
            (
                "YR==",
                "the last character before the padding is not canonical",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(check_base64(s).err().as_deref(), Some(want), "{s}");
        }
    }
}
