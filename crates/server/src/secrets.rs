//! Secret values on the server's side. Every value of a Secret is sealed (AES-256-GCM, a random nonce per value,
//! the organization, Secret and key bound in as associated data) before the object reaches the store, so the
//! database and its event log hold only ciphertext. The key lives outside the database: `KILN_SECRET_KEY`
//! (base64 of 32 bytes), or `<data dir>/secret.key`, made on first start (mode 0600). Servers sharing one
//! PostgreSQL database must share the key.
//!
//! The API never returns values (`resources::present` blanks them); [`value`] is where the server reads one
//! (pipeline steps, webhook triggers).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use model::kinds::SecretSpec;
use model::{Kind, Resource};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use store::{ListQuery, Store, StoreError};

use crate::error::{ApiError, ApiResult};
use crate::workspaces::org_key;

/// The environment variable that holds the sealing key.
pub const KEY_ENV: &str = "KILN_SECRET_KEY";
/// The key file's name in the data directory.
pub const KEY_FILE: &str = "secret.key";
/// The prefix of a sealed value (the format's version).
const PREFIX: &str = "v1:";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Seals and opens Secret values with the server's key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    fn from_bytes(bytes: &[u8]) -> anyhow::Result<Sealer> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| anyhow::anyhow!("the key must be 32 bytes, got {}", bytes.len()))?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// A key of this process only: what an [`crate::AppState`] starts with until the configured one is set.
    pub fn ephemeral() -> Sealer {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random number generator");
        Sealer::from_bytes(&bytes).expect("32 bytes")
    }

    /// The configured key: `KILN_SECRET_KEY` if set, else `<data_dir>/secret.key`, which is made (mode 0600)
    /// when missing.
    pub fn load(data_dir: &Path) -> anyhow::Result<Sealer> {
        if let Ok(v) = std::env::var(KEY_ENV) {
            let bytes = B64
                .decode(v.trim())
                .with_context(|| format!("{KEY_ENV} is not base64"))?;
            return Sealer::from_bytes(&bytes).context(KEY_ENV);
        }
        let path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = B64
                    .decode(text.trim())
                    .with_context(|| format!("{} is not base64", path.display()))?;
                Sealer::from_bytes(&bytes).with_context(|| path.display().to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                write_private(&path, B64.encode(bytes).as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
                tracing::info!(path = %path.display(), "made the key that seals Secret values; keep it with backups of the database, apart from them");
                Sealer::from_bytes(&bytes)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Seals `plain`, bound to `aad` (which must be given again to open it).
    pub fn seal(&self, aad: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system's random number generator");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .expect("sealing does not fail for in-memory sizes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{PREFIX}{}", B64.encode(out))
    }

    /// Opens a value [`Sealer::seal`] made with the same key and `aad`.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, String> {
        let bad =
            || "not a value this server sealed (another key, or another Secret's)".to_string();
        let body = sealed.strip_prefix(PREFIX).ok_or_else(bad)?;
        let bytes = B64.decode(body).map_err(|_| bad())?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| bad())?;
        Ok(plain.to_vec())
    }
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

/// What a sealed value is bound to.
fn aad(org: &str, secret: &str, key: &str) -> String {
    format!("kiln/secret/{org}/{secret}/{key}")
}

/// Moves a Secret's `data` and `stringData` into `sealed`, sealed. A value equal to the stored one keeps its
/// ciphertext (so applying the same manifest twice changes nothing); an empty `sealed` value keeps the stored
/// one; any other `sealed` value must be one this server sealed for the same key. Other kinds pass unchanged.
pub fn seal_object(
    sealer: &Sealer,
    existing: Option<&Resource>,
    mut obj: Resource,
) -> ApiResult<Resource> {
    if obj.kind != Kind::Secret.as_str() {
        return Ok(obj);
    }
    let invalid = |path: String, msg: String| ApiError::invalid("", model::Invalid::one(path, msg));
    let mut spec: SecretSpec = model::typed_spec(&obj)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    let org = obj.metadata.organization.clone().unwrap_or_default();
    let name = obj.metadata.name.clone();
    let stored: BTreeMap<String, String> = existing
        .and_then(|e| model::typed_spec::<SecretSpec>(e).ok())
        .map(|s| s.sealed)
        .unwrap_or_default();
    let mut sealed = BTreeMap::new();
    for (k, v) in std::mem::take(&mut spec.sealed) {
        let path = format!("spec.sealed.{k}");
        let v = if v.is_empty() {
            stored.get(&k).cloned().ok_or_else(|| {
                invalid(path.clone(), "empty, and the Secret has no stored value for this key; set it in stringData or data".into())
            })?
        } else {
            v
        };
        sealer
            .open(&aad(&org, &name, &k), &v)
            .map_err(|e| invalid(path, e))?;
        sealed.insert(k, v);
    }
    let mut plain: Vec<(String, Vec<u8>)> = std::mem::take(&mut spec.string_data)
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in std::mem::take(&mut spec.data) {
        let bytes = B64
            .decode(&v)
            .map_err(|e| invalid(format!("spec.data.{k}"), format!("not base64: {e}")))?;
        plain.push((k, bytes));
    }
    for (k, bytes) in plain {
        let a = aad(&org, &name, &k);
        let same = stored
            .get(&k)
            .filter(|old| sealer.open(&a, old).is_ok_and(|p| p == bytes));
        let v = match same {
            Some(old) => old.clone(),
            None => sealer.seal(&a, &bytes),
        };
        sealed.insert(k, v);
    }
    spec.sealed = sealed;
    obj.spec = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    Ok(obj)
}

/// Seals the values of Secrets stored before values were sealed. Run at start; each is rewritten only if it
/// has plain values.
pub async fn seal_stored(store: &Store, sealer: &Sealer) -> anyhow::Result<usize> {
    let query = ListQuery {
        kind: Some(Kind::Secret),
        ..ListQuery::default()
    };
    let mut n = 0;
    for obj in store.list(&query).await?.items {
        let plain = ["data", "stringData"].iter().any(|f| {
            obj.spec
                .get(*f)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
        });
        if !plain {
            continue;
        }
        let name = obj.metadata.name.clone();
        let sealed = seal_object(sealer, Some(&obj), obj.clone())
            .map_err(|e| anyhow::anyhow!("sealing Secret {name}: {e}"))?;
        match store.update(sealed).await {
            Ok(_) => n += 1,
            // Changed meanwhile, through the API, which sealed it.
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// The value of `key` in the organization's Secret `secret`; the error names what is missing.
pub async fn value(
    store: &Store,
    sealer: &Sealer,
    org: &str,
    secret: &str,
    key: &str,
) -> Result<Vec<u8>, String> {
    let obj = match store.get(&org_key(Kind::Secret, org, secret)).await {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return Err(format!("Secret {secret} does not exist")),
        Err(e) => return Err(format!("Secret {secret}: {e}")),
    };
    let spec: SecretSpec = model::typed_spec(&obj).map_err(|e| format!("Secret {secret}: {e}"))?;
    if let Some(v) = spec.sealed.get(key) {
        return sealer
            .open(&aad(org, secret, key), v)
            .map_err(|e| format!("Secret {secret} key {key}: {e}"));
    }
    match (spec.string_data.get(key), spec.data.get(key)) {
        (Some(v), _) => Ok(v.clone().into_bytes()),
        (None, Some(b)) => B64
            .decode(b)
            .map_err(|e| format!("Secret {secret} key {key}: {e}")),
        (None, None) => Err(format!("Secret {secret} has no key {key:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_binding() {
        let s = Sealer::ephemeral();
        let v = s.seal("kiln/secret/o/s/k", b"hunter2");
        assert!(v.starts_with("v1:") && !v.contains("hunter2"));
        assert_eq!(s.open("kiln/secret/o/s/k", &v).unwrap(), b"hunter2");
        assert_ne!(v, s.seal("kiln/secret/o/s/k", b"hunter2"), "nonces repeat");
        assert!(
            s.open("kiln/secret/o/other/k", &v).is_err(),
            "moved to another Secret"
        );
        assert!(Sealer::ephemeral().open("kiln/secret/o/s/k", &v).is_err());
        for bad in ["", "v1:", "v1:AAAA", "v2:xyz", "hunter2"] {
            assert!(s.open("kiln/secret/o/s/k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_file_is_made_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Sealer::load(tmp.path()).unwrap();
        let sealed = a.seal("x", b"v");
        let b = Sealer::load(tmp.path()).unwrap();
        assert_eq!(b.open("x", &sealed).unwrap(), b"v");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tmp.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
