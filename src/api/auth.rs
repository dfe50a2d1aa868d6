//! Who is asking: the key a request presents (`Authorization: Bearer` or `x-api-key`), or
//! the batch worker on a batch owner's behalf; and, while no key is required, that the asker
//! is not a web page.
//!
//! A server on the loopback interface without keys is open to every program on the machine,
//! as intended, but also to every web page its user opens: a page's cross-site POST with no
//! content type needs no preflight (the model runs), and a page whose name is re-pointed at
//! 127.0.0.1 (DNS rebinding) reads the answers, files and usage. So while no key is required
//! a loopback server refuses a request naming another `Host` or sent from another `Origin`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::gateway::{AuthError, Principal};

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        });
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    })
}

/// Marks a request the batch worker makes on behalf of a batch's owner.
#[derive(Debug, Clone)]
pub struct BatchCall {
    pub owner_kind: String,
    pub owner: String,
    /// The line this runs (`batch_id/line`), the same for every attempt at it.
    pub attempt: String,
}

/// Middleware on every route but the probes, `/metrics` and the console's static assets: puts the request's [`Principal`]
/// in its extensions, or answers 401 in OpenAI's shape.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    // A batch's request, made inside this process (no client can set an extension): it runs
    // as whoever made the batch, while that key is still live.
    let who = match req.extensions().get::<BatchCall>() {
        Some(call) => state.gateway.principal_of(&call.owner_kind, &call.owner),
        None => state
            .gateway
            .authenticate(presented_key(req.headers()).as_deref()),
    };
    match who {
        Ok(Principal::Anonymous) if state.loopback => {
            match foreign_page(req.headers(), &state.cors_origins) {
                Some(why) => ApiError::forbidden(
                    "cross_site_request",
                    format!("Refused: {why}. Without API keys this server answers only programs on this machine; create a key (`edgeinfer keys generate` or --master-key) to serve others."),
                )
                .into_response(),
                None => {
                    req.extensions_mut().insert(Principal::Anonymous);
                    next.run(req).await
                }
            }
        }
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            let msg = match e {
                AuthError::Unavailable => {
                    return ApiError::unavailable(
                        "The key store cannot be read right now; retry shortly",
                    )
                    .into_response()
                }
                AuthError::Missing => "You didn't provide an API key. Pass it as `Authorization: Bearer KEY` (or `x-api-key: KEY`).",
                AuthError::Invalid => "Incorrect API key provided (unknown or revoked).",
                AuthError::Expired => "The API key provided has expired.",
            };
            ApiError::unauthorized(msg).into_response()
        }
    }
}

/// Why a request to a key-less loopback server looks like a web page's, if it does: a `Host`
/// that is not a loopback name, or an `Origin` that is neither a loopback page nor one
/// `--cors-allow-origin` lets in.
pub fn foreign_page(headers: &HeaderMap, allowed: &[String]) -> Option<&'static str> {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    if header("host").is_some_and(|h| !loopback_authority(h)) {
        return Some("the request names a host other than this machine's loopback address");
    }
    let origin = header("origin")?;
    // A page the operator names (`--cors-allow-origin`; not `*`, which would let every
    // site drive a server that has no keys).
    if allowed.iter().any(|o| o == origin) {
        return None;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .filter(|a| !a.contains('/'));
    match authority.is_some_and(loopback_authority) {
        true => None,
        false => Some("the request comes from a web page on another site"),
    }
}

/// `localhost`, a name under it, `127.x.x.x` or `[::1]`, with or without a port.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, rest)) if rest.is_empty() || rest.starts_with(':') => ip,
            _ => return false,
        },
        None => authority.split(':').next().unwrap_or(""),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_and_pages_pass() {
        let check = |host: Option<&str>, origin: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = host {
                h.insert("host", v.parse().unwrap());
            }
            if let Some(v) = origin {
                h.insert("origin", v.parse().unwrap());
            }
            foreign_page(&h, &[]).is_none()
        };
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "127.1.2.3",
        ] {
            assert!(check(Some(host), None), "{host}");
        }
        assert!(check(None, None));
        for host in [
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "[::2]:80",
            "[::1]x",
            "",
        ] {
            assert!(!check(Some(host), None), "{host}");
        }
        assert!(check(Some("localhost:8080"), Some("http://localhost:3000")));
        assert!(check(Some("127.0.0.1:8080"), Some("https://app.localhost")));
        for origin in [
            "https://evil.example",
            "null",
            "http://127.0.0.1.evil.example",
            "file://",
        ] {
            assert!(!check(Some("127.0.0.1:8080"), Some(origin)), "{origin}");
        }
    }
}
