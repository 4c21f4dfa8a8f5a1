//! Authentication: API tokens (bearer), console sessions (cookie), passwords (argon2id).
//!
//! Secrets handed to clients are 32 random bytes, URL-safe base64; only their SHA-256 is stored, so a leaked
//! database does not leak usable credentials.

use std::sync::{Arc, Mutex};

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use store::User;

use crate::error::ApiError;
use crate::AppState;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "kiln_session";
/// Prefix of API tokens, so that they are recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "kiln_";

/// A new random secret (32 bytes, URL-safe base64 without padding).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a secret, hex: what the store keeps of tokens and sessions.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(ApiError::internal)
}

/// Checks a password against a stored PHC string. Runs in constant time with respect to the password.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// How the caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Token { id: String },
    Session,
}

/// An authenticated caller. Taking it as a handler argument makes the route require authentication.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: User,
    pub credential: Credential,
}

/// Filled in by [`Principal`] extraction and read by the audit layer after the response.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(pub Arc<Mutex<AuditFacts>>);

#[derive(Debug, Clone, Default)]
pub struct AuditFacts {
    pub user: Option<String>,
    pub kind: Option<String>,
    pub organization: Option<String>,
    pub project: Option<String>,
    pub name: Option<String>,
}

impl AuditSlot {
    pub fn set_user(&self, name: &str) {
        if let Ok(mut f) = self.0.lock() {
            f.user = Some(name.to_string());
        }
    }
    pub fn set_target(
        &self,
        kind: &str,
        org: Option<&str>,
        project: Option<&str>,
        name: Option<&str>,
    ) {
        if let Ok(mut f) = self.0.lock() {
            f.kind = Some(kind.to_string());
            f.organization = org.map(str::to_string);
            f.project = project.map(str::to_string);
            f.name = name.map(str::to_string);
        }
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_token(&parts.headers)
}

/// The secret of an `Authorization: Bearer` header, if any.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The value of one cookie from the `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Resolves the caller from a bearer token or a session cookie; `None` when neither is valid.
pub async fn authenticate(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    parts_bearer: Option<&str>,
) -> Result<Option<Principal>, ApiError> {
    let now = jiff::Timestamp::now();
    if let Some(secret) = parts_bearer {
        let Some(token) = state.store.token_by_hash(&hash_secret(secret)).await? else {
            return Ok(None);
        };
        if token.revoked_at.is_some() || token.expires_at.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        let Some(user) = state.store.user_by_id(&token.user_id).await? else {
            return Ok(None);
        };
        state.touch_token(&token.id);
        return Ok(Some(Principal {
            user,
            credential: Credential::Token { id: token.id },
        }));
    }
    if let Some(cookie) = cookie(headers, SESSION_COOKIE) {
        let Some(session) = state.store.session_by_hash(&hash_secret(cookie)).await? else {
            return Ok(None);
        };
        if session.expires_at <= now {
            return Ok(None);
        }
        let Some(user) = state.store.user_by_id(&session.user_id).await? else {
            return Ok(None);
        };
        return Ok(Some(Principal {
            user,
            credential: Credential::Session,
        }));
    }
    Ok(None)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = authenticate(state, &parts.headers, bearer(parts)).await?.ok_or_else(|| {
            ApiError::unauthorized("missing, invalid, expired or revoked credentials: send `Authorization: Bearer <token>` (see `kiln login`)")
        })?;
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            slot.set_user(&principal.user.name);
        }
        Ok(principal)
    }
}

/// Extracts the caller if authenticated, without rejecting anonymous requests (console pages redirect instead).
pub struct MaybePrincipal(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybePrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(MaybePrincipal(
            authenticate(state, &parts.headers, bearer(parts)).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn secrets_are_random_and_hash_is_stable() {
        let a = new_secret();
        assert_ne!(a, new_secret());
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_eq!(hash_secret(&a).len(), 64);
    }

    #[test]
    fn cookie_parsing() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(COOKIE, "a=1; kiln_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
