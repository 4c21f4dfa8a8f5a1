//! Continue tokens for paged lists: an opaque encoding of the last key a page returned. The next page starts
//! strictly after it in key order (organization, project, name, kind), so objects that exist throughout a paged
//! read are returned exactly once, whatever is written in between.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use model::Resource;

use crate::StoreError;

/// A position in the list order. Absent organization/project are the empty string, which sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cursor {
    pub organization: String,
    pub project: String,
    pub name: String,
    pub kind: String,
}

impl Cursor {
    /// The position of an object.
    pub fn of(r: &Resource) -> Cursor {
        Cursor {
            organization: r.metadata.organization.clone().unwrap_or_default(),
            project: r.metadata.project.clone().unwrap_or_default(),
            name: r.metadata.name.clone(),
            kind: r.kind.clone(),
        }
    }

    /// The opaque token handed to clients.
    pub fn encode(&self) -> String {
        let json = serde_json::json!([1, self.organization, self.project, self.name, self.kind]);
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    /// Decodes a token produced by [`Cursor::encode`]; anything else is `Invalid` naming `continue`.
    pub fn decode(token: &str) -> Result<Cursor, StoreError> {
        let bad = || {
            StoreError::Invalid(model::Invalid::one(
                "continue",
                "malformed continue token; restart the list without it",
            ))
        };
        let bytes = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| bad())?;
        let (version, organization, project, name, kind): (u32, String, String, String, String) =
            serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if version != 1 || name.is_empty() {
            return Err(bad());
        }
        Ok(Cursor {
            organization,
            project,
            name,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Cursor;
    use crate::StoreError;

    #[test]
    fn round_trip() {
        let c = Cursor {
            organization: "acme".into(),
            project: "".into(),
            name: "web/ü".into(),
            kind: "Component".into(),
        };
        let t = c.encode();
        assert!(
            t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'),
            "{t}"
        );
        assert_eq!(Cursor::decode(&t).ok(), Some(c));
    }

    #[test]
    fn garbage_is_invalid() {
        for t in ["", "!!!", "bm90IGpzb24", "WzIsIiIsIiIsIngiLCJLIl0"] {
            match Cursor::decode(t) {
                Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "continue"),
                other => panic!("{t:?}: {other:?}"),
            }
        }
    }
}
