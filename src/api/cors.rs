//! Cross-origin access for web apps that call the node from a browser page
//! (`--cors-allow-origin`): preflights answered before any key is asked for, and every
//! answer, errors included, readable by the pages of the origins listed. None by default:
//! a page on another site then cannot read what the node answers.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, AllowPrivateNetwork, CorsLayer};

/// The headers a page may read besides the simple ones: ids, rate limits, cache status.
const EXPOSED: [&str; 14] = [
    "x-request-id",
    "x-edgeinfer-node",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "cf-aig-cache-status",
    "age",
    "idempotent-replayed",
];

/// The layer for `origins` (`*`: any page), or `None` when none is listed.
///
/// The pages of named origins may also call a node on a more private network than theirs
/// (a public app calling a node on the LAN or loopback: Private Network Access preflights
/// are answered `Access-Control-Allow-Private-Network: true`); `*` does not let every public
/// page reach into a private network (the named ones still may beside it).
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let named: Vec<HeaderValue> = origins
        .iter()
        .filter(|o| *o != "*")
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(named.clone())
    };
    let private = AllowPrivateNetwork::predicate(move |origin, _| named.contains(origin));
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_private_network(private)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            // Keys travel in headers (`Authorization`, `x-api-key`), never in cookies.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(EXPOSED.map(HeaderName::from_static))
            .max_age(Duration::from_secs(3600)),
    )
}

/// Checks an origin as `--cors-allow-origin` takes it: `*`, or `http(s)://host[:port]`
/// exactly as a browser sends it (lowercase, no path, no default port, no user), since the
/// page's `Origin` is compared with it as text.
pub fn check_origin(origin: &str) -> Result<(), String> {
    let parts = origin
        .strip_prefix("https://")
        .map(|a| (a, ":443"))
        .or_else(|| origin.strip_prefix("http://").map(|a| (a, ":80")));
    let sent_as_is = |(a, default_port): (&str, &str)| {
        !a.is_empty()
            && a.bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
            && !a.contains(['/', '?', '#', '@', ','])
            && !a.ends_with(default_port)
            && !a.ends_with('.')
            && !a.ends_with(':')
    };
    if origin == "*" || parts.is_some_and(sent_as_is) {
        return Ok(());
    }
    Err(format!(
        "--cors-allow-origin '{origin}' must be * or an origin as browsers send it, such as https://app.example.com or http://localhost:3000 (lowercase, no path, no default port)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        for ok in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.b/path",
            "ftp://x",
            "https://",
            "",
            "https://App.example.com",
            "https://a.example:443",
            "http://a.example:80",
            "https://user@a.example",
            "https://a.example.",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
