//! Syntax rules for names, label keys and values, and the field paths that errors carry.

use crate::FieldError;

/// The longest object name: the DNS-1123 label limit, so a name can appear in a host name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `name` is a DNS-1123 label: 1 to 63 characters, lower-case letters, digits and `-`, starting and
/// ending with a letter or digit. The error, at `path`, says which rule was broken and where.
pub fn validate_name(path: &str, name: &str) -> Result<(), FieldError> {
    let fail = |why: String| {
        Err(FieldError::new(
            path,
            format!("{name:?} is not a valid name: {why}"),
        ))
    };
    if name.is_empty() {
        return Err(FieldError::new(path, "must not be empty"));
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return fail(format!(
            "must be at most {MAX_NAME_LEN} characters, got {len}"
        ));
    }
    for (i, c) in name.chars().enumerate() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            let what = if c.is_ascii_uppercase() {
                "upper-case letter"
            } else {
                "character"
            };
            return fail(format!(
                "{what} {c:?} at position {} is not allowed (use lower-case letters, digits and '-')",
                i + 1
            ));
        }
    }
    if name.starts_with('-') {
        return fail("must start with a lower-case letter or digit, not '-'".into());
    }
    if name.ends_with('-') {
        return fail("must end with a lower-case letter or digit, not '-'".into());
    }
    Ok(())
}

/// Checks a label or annotation key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters made of letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
pub fn validate_label_key(path: &str, key: &str) -> Result<(), FieldError> {
    let fail = |why: String| Err(FieldError::new(path, format!("invalid key {key:?}: {why}")));
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return fail("the prefix before '/' must be 1-253 characters".into());
        }
        for part in prefix.split('.') {
            if validate_name("", part).is_err() {
                return fail(format!(
                    "the prefix {prefix:?} must be a DNS subdomain (dot-separated lower-case labels)"
                ));
            }
        }
    }
    if name.is_empty() {
        return fail("the name part must not be empty".into());
    }
    if let Err(why) = check_label_chars(name) {
        return fail(format!("the name part {why}"));
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 characters of letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
pub fn validate_label_value(path: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Ok(());
    }
    check_label_chars(value)
        .map_err(|why| FieldError::new(path, format!("invalid value {value:?}: {why}")))
}

fn check_label_chars(s: &str) -> Result<(), String> {
    let len = s.chars().count();
    if len > MAX_NAME_LEN {
        return Err(format!(
            "must be at most {MAX_NAME_LEN} characters, got {len}"
        ));
    }
    if let Some((i, c)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "has {c:?} at position {}; use letters, digits, '-', '_' and '.'",
            i + 1
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// `base.name`, or `name` when `base` is empty.
pub(crate) fn field(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}.{name}")
    }
}

/// `base[i]`.
pub(crate) fn index(base: &str, i: usize) -> String {
    format!("{base}[{i}]")
}

/// `base.key` when the key is a plain identifier, otherwise `base["key"]`, so that keys containing dots or
/// slashes (`app.kubernetes.io/name`, `tls.crt`) stay unambiguous.
pub(crate) fn key(base: &str, key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        field(base, key)
    } else {
        format!("{base}[{key:?}]")
    }
}

/// Renders a serde path (as tracked by `serde_path_to_error`) under `root`, in the same notation as [`field`],
/// [`index`] and [`key`]: `spec.endpoints[0].port`.
pub(crate) fn render_path(root: &str, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = root.to_string();
    for segment in path.iter() {
        out = match segment {
            Segment::Seq { index: i } => index(&out, *i),
            Segment::Map { key: k } => key(&out, k),
            Segment::Enum { variant } => field(&out, variant),
            Segment::Unknown => out,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let err = |n: &str| {
            validate_name("metadata.name", n)
                .map_err(|e| e.to_string())
                .err()
        };
        for ok in ["a", "user-service", "0abc", "a-b-c", &"a".repeat(63)] {
            assert_eq!(err(ok), None, "{ok}");
        }
        let cases = [
            ("", "metadata.name: must not be empty"),
            ("User", "metadata.name: \"User\" is not a valid name: upper-case letter 'U' at position 1 is not allowed (use lower-case letters, digits and '-')"),
            ("a_b", "metadata.name: \"a_b\" is not a valid name: character '_' at position 2 is not allowed (use lower-case letters, digits and '-')"),
            ("-a", "metadata.name: \"-a\" is not a valid name: must start with a lower-case letter or digit, not '-'"),
            ("a-", "metadata.name: \"a-\" is not a valid name: must end with a lower-case letter or digit, not '-'"),
        ];
        for (name, want) in cases {
            assert_eq!(err(name).as_deref(), Some(want));
        }
        let long = "a".repeat(64);
        assert!(err(&long).is_some_and(|e| e.ends_with("must be at most 63 characters, got 64")));
    }

    #[test]
    fn labels() {
        for ok in ["app", "app.kubernetes.io/name", "a_b.c-d", "kiln.dev/x"] {
            assert!(validate_label_key("k", ok).is_ok(), "{ok}");
        }
        for bad in ["", "/x", "Bad_Prefix/x", "x/", "-x", "a b", "a/b/c"] {
            assert!(validate_label_key("k", bad).is_err(), "{bad}");
        }
        assert!(validate_label_value("v", "").is_ok());
        assert!(validate_label_value("v", "v1.2_3").is_ok());
        assert_eq!(
            validate_label_value("metadata.labels.tier", "a b").map_err(|e| e.to_string()),
            Err("metadata.labels.tier: invalid value \"a b\": has ' ' at position 2; use letters, digits, '-', '_' and '.'".into())
        );
    }

    #[test]
    fn paths() {
        assert_eq!(field("", "spec"), "spec");
        assert_eq!(index(&field("spec", "endpoints"), 0), "spec.endpoints[0]");
        assert_eq!(key("metadata.labels", "tier"), "metadata.labels.tier");
        assert_eq!(key("spec.data", "tls.crt"), "spec.data[\"tls.crt\"]");
    }
}
