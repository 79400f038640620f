//! Session affinity: a cookie naming the backend by its opaque, stable id (never its
//! address), or a consistent hash of a request header. The id is the same across reloads
//! and across fulcrum instances with the same config, so a fleet honours each other's
//! cookies. A cookie that does not parse or names no current backend is simply ignored.

use http::header::{self, HeaderMap, HeaderValue};

use crate::pool::BackendId;
use fulcrum_config::StickyConfig;

/// The backend id a request's cookie `name` names, if it is well formed.
pub fn cookie_backend(headers: &HeaderMap, name: &str) -> Option<BackendId> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k == name {
                let v = v.trim_matches('"');
                if v.len() == 16 {
                    if let Ok(id) = u64::from_str_radix(v, 16) {
                        return Some(BackendId(id));
                    }
                }
                return None;
            }
        }
    }
    None
}

/// The `Set-Cookie` value that pins a client to `id`.
pub fn set_cookie(name: &str, id: BackendId, cfg: &StickyConfig) -> Option<HeaderValue> {
    let mut v = format!("{name}={id}; Path=/; SameSite=Lax");
    if let Some(ttl) = cfg.ttl {
        v.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if cfg.http_only {
        v.push_str("; HttpOnly");
    }
    if cfg.secure {
        v.push_str("; Secure");
    }
    HeaderValue::from_str(&v).ok()
}

/// A fixed hash of a header value (FNV-1a then a mix): the same on every instance.
pub fn hash_value(v: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in v {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    crate::balance::random::mix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_cookie_among_others_and_ignores_garbage() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; fulcrum_sticky=00000000000000ff; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_backend(&h, "fulcrum_sticky"), Some(BackendId(255)));
        for bad in [
            "fulcrum_sticky=zz",
            "fulcrum_sticky=",
            "fulcrum_sticky=123",
            "other=00000000000000ff",
        ] {
            let mut h = HeaderMap::new();
            h.append(header::COOKIE, bad.parse().unwrap());
            assert_eq!(cookie_backend(&h, "fulcrum_sticky"), None, "{bad}");
        }
    }

    #[test]
    fn cookie_attributes() {
        let cfg = StickyConfig {
            by: fulcrum_config::StickyBy::Cookie("s".into()),
            ttl: Some(std::time::Duration::from_secs(3600)),
            secure: true,
            http_only: true,
        };
        let v = set_cookie("s", BackendId(1), &cfg).unwrap();
        assert_eq!(
            v,
            "s=0000000000000001; Path=/; SameSite=Lax; Max-Age=3600; HttpOnly; Secure"
        );
    }
}
