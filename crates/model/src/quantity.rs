//! Kubernetes resource quantities (`100`, `500m`, `512Mi`, `1Ti`): parsing, validation and comparison.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FieldError;

const SUFFIXES: &[(&str, f64)] = &[
    ("Ki", 1024.0),
    ("Mi", 1024.0 * 1024.0),
    ("Gi", 1024.0 * 1024.0 * 1024.0),
    ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("n", 1e-9),
    ("u", 1e-6),
    ("m", 1e-3),
    ("", 1.0),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

/// A resource amount in the Kubernetes quantity syntax: a non-negative decimal number and an optional suffix
/// (`m` for thousandths, `k`/`M`/`G`/`T`/`P`/`E` for powers of 1000, `Ki`/`Mi`/`Gi`/`Ti`/`Pi`/`Ei` for powers of
/// 1024). Written as a string; a bare YAML/JSON number is accepted on input and stored as its string form.
/// Holds the text as written; [`Quantity::validate`] checks it.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(transparent)]
pub struct Quantity(pub String);

impl Quantity {
    /// The amount in base units (cores, bytes), or `None` if the text is not a valid quantity.
    pub fn value(&self) -> Option<f64> {
        parse(&self.0).ok()
    }

    /// Checks the syntax; the error, at `path`, says what is wrong and shows valid examples.
    pub fn validate(&self, path: &str) -> Result<(), FieldError> {
        parse(&self.0).map(|_| ()).map_err(|why| {
            FieldError::new(
                path,
                format!(
                    "{:?} is not a valid quantity: {why} (examples: 500m, 2, 512Mi, 1Ti)",
                    self.0
                ),
            )
        })
    }
}

fn parse(s: &str) -> Result<f64, String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err("it must start with a non-negative number".into());
    }
    let n: f64 = number
        .parse()
        .map_err(|_| "it must start with a non-negative number".to_string())?;
    if let Some(&(_, factor)) = SUFFIXES.iter().find(|(sfx, _)| *sfx == suffix) {
        return Ok(n * factor);
    }
    if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        if let Ok(e) = exp.parse::<i32>() {
            if (-30..=30).contains(&e) {
                return Ok(n * 10f64.powi(e));
            }
        }
    }
    Err(format!(
        "unknown suffix {suffix:?} (use one of m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)"
    ))
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity such as \"500m\" or \"512Mi\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let v = |s: &str| Quantity(s.into()).value();
        assert_eq!(v("100"), Some(100.0));
        assert_eq!(v("500m"), Some(0.5));
        assert_eq!(v("500Gi"), Some(500.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(v("1Ti"), Some(1024f64.powi(4)));
        assert_eq!(v("1.5"), Some(1.5));
        assert_eq!(v("2k"), Some(2000.0));
        assert_eq!(v("1e3"), Some(1000.0));
        for bad in ["", "-1", "m", "1.2.3", "500GB", "1 Gi", ".", "1e99"] {
            assert_eq!(v(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages() {
        let e = Quantity("500GB".into())
            .validate("spec.resourceQuotas.memory")
            .map_err(|e| e.to_string());
        assert_eq!(
            e,
            Err("spec.resourceQuotas.memory: \"500GB\" is not a valid quantity: unknown suffix \"GB\" (use one of m, \
                 k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei) (examples: 500m, 2, 512Mi, 1Ti)"
                .into())
        );
    }

    #[test]
    fn numbers_become_strings() {
        let q: Quantity = serde_json::from_str("2")
            .map_err(|e| e.to_string())
            .expect("a number is accepted");
        assert_eq!(serde_json::to_string(&q).ok().as_deref(), Some("\"2\""));
        assert!(serde_json::from_str::<Quantity>("true").is_err());
    }
}
