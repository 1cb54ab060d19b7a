//! Who is calling. The course's auth service puts a JWT (HS256, claims `{id, email}`) in a
//! cookie-session cookie: `session` (or the older `express:sess`) holding base64 of
//! `{"jwt":"..."}`. `Authorization: Bearer <jwt>` works too. Anything that does not verify
//! (another algorithm, `none`, a bad signature, an expired token, a malformed cookie) means
//! "not signed in".

use crate::ApiContext;
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, header, request::Parts};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use common::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const COOKIE_NAMES: [&str; 2] = ["session", "express:sess"];

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// The `JWT_KEY` secret, ready to verify and sign.
#[derive(Clone)]
pub struct JwtKey(Arc<Keys>);

struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl JwtKey {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // The course's tokens carry no `exp`; honour it when present.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.leeway = 0;
        Self(Arc::new(Keys {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }))
    }

    /// The user a token proves, or `None` when it does not verify.
    pub fn verify(&self, token: &str) -> Option<UserId> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.0.decoding, &self.0.validation).ok()?;
        UserId::parse(&data.claims.id)
    }

    /// Signs a token as the course's auth service does (HS256, `{id, email, iat}`).
    pub fn sign(&self, id: &str, email: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            id: id.to_owned(),
            email: Some(email.to_owned()),
            iat: Some(chrono_now()),
            exp: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.0.encoding)
    }

    /// The user the request's cookie or bearer token proves, if any.
    pub fn user_from_headers(&self, headers: &HeaderMap) -> Option<UserId> {
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer ").map(str::trim).map(str::to_owned));
        let cookies = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| COOKIE_NAMES.contains(name))
            .filter_map(|(_, value)| jwt_from_session_cookie(value));
        bearer.chain(cookies).find_map(|jwt| self.verify(&jwt))
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[derive(Serialize, Deserialize)]
struct SessionCookie {
    jwt: String,
}

/// `base64({"jwt": "..."})`, as cookie-session writes it.
pub fn session_cookie_value(jwt: &str) -> String {
    let json = serde_json::json!({ "jwt": jwt }).to_string();
    STANDARD.encode(json)
}

fn jwt_from_session_cookie(value: &str) -> Option<String> {
    let value = value.trim().trim_matches('"');
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(value).ok())?;
    serde_json::from_slice::<SessionCookie>(&bytes)
        .ok()
        .map(|s| s.jwt)
}

/// A signed-in user; rejects with 401 "Not authorized" otherwise.
pub struct AuthUser(pub UserId);

/// The signed-in user, if any; never rejects.
pub struct MaybeAuthUser(pub Option<UserId>);

impl FromRequestParts<ApiContext> for MaybeAuthUser {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &ApiContext,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(ctx.jwt.user_from_headers(&parts.headers)))
    }
}

impl FromRequestParts<ApiContext> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &ApiContext,
    ) -> Result<Self, Self::Rejection> {
        ctx.jwt
            .user_from_headers(&parts.headers)
            .map(Self)
            .ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).expect("header"));
        h
    }

    #[test]
    fn cookie_and_bearer_both_work() {
        let key = JwtKey::new("secret");
        let jwt = key.sign("user-1", "a@b.c").expect("sign");
        let cookie = format!("other=1; session={}", session_cookie_value(&jwt));
        let user = key.user_from_headers(&headers(header::COOKIE, &cookie));
        assert_eq!(user.expect("signed in").as_str(), "user-1");
        let old = format!("express:sess={}", session_cookie_value(&jwt));
        assert!(
            key.user_from_headers(&headers(header::COOKIE, &old))
                .is_some()
        );
        let bearer = format!("Bearer {jwt}");
        assert!(
            key.user_from_headers(&headers(header::AUTHORIZATION, &bearer))
                .is_some()
        );
    }

    #[test]
    fn bad_tokens_mean_not_signed_in() {
        let key = JwtKey::new("secret");
        let other = JwtKey::new("other").sign("u", "e").expect("sign");
        assert!(key.verify(&other).is_none(), "bad signature");
        // alg none
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"id":"u","email":"e"}"#)
        );
        assert!(key.verify(&none).is_none(), "alg none");
        // HS512 with the right secret is still another algorithm.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                id: "u".into(),
                email: None,
                iat: None,
                exp: None,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("sign");
        assert!(key.verify(&hs512).is_none(), "HS512");
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                id: "u".into(),
                email: None,
                iat: None,
                exp: Some(chrono_now() - 10),
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("sign");
        assert!(key.verify(&expired).is_none(), "expired");
        for cookie in ["session=%%%", "session=", "session=bm90IGpzb24=", "session"] {
            assert!(
                key.user_from_headers(&headers(header::COOKIE, cookie))
                    .is_none(),
                "{cookie}"
            );
        }
    }
}
