//! Reading a Secret's value on the server's side (pipeline steps, webhook triggers). The API never returns
//! values (`resources::present` blanks them); this is the one place the server reads them.

use base64::Engine as _;
use model::kinds::SecretSpec;
use model::Kind;
use store::{Store, StoreError};

use crate::workspaces::org_key;

/// The value of `key` in the organization's Secret `secret`; the error names what is missing.
pub async fn value(store: &Store, org: &str, secret: &str, key: &str) -> Result<Vec<u8>, String> {
    let obj = match store.get(&org_key(Kind::Secret, org, secret)).await {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return Err(format!("Secret {secret} does not exist")),
        Err(e) => return Err(format!("Secret {secret}: {e}")),
    };
    let spec: SecretSpec = model::typed_spec(&obj).map_err(|e| format!("Secret {secret}: {e}"))?;
    match (spec.string_data.get(key), spec.data.get(key)) {
        (Some(v), _) => Ok(v.clone().into_bytes()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("Secret {secret} key {key}: {e}")),
        (None, None) => Err(format!("Secret {secret} has no key {key:?}")),
    }
}
