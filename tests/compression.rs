//! Response compression: gzip and brotli decode to the original bytes; already-encoded or
//! incompressible responses pass untouched; off unless the route asks.

mod support;

use http::StatusCode;
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncReadExt;

async fn fetch(url: &str, accept: &str) -> (StatusCode, http::HeaderMap, bytes::Bytes) {
    let req = http::Request::get(url)
        .header("accept-encoding", accept)
        .body(full(""))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn compressing(b: &TestBackend) -> String {
    one_pool("round_robin", &[(b.addr, 1)], "").replace(
        "[[routes]]\npool = \"p\"",
        "[[routes]]\npool = \"p\"\ncompression = true",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_brotli_decode_to_the_original() {
    let b = backend("a").spawn().await;
    let p = proxy(&compressing(&b)).await;
    let n = 300_000;
    let original: String = "the quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(n)
        .collect();

    let (status, headers, body) = fetch(&format!("{}/text/{n}", p.url), "gzip").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-encoding"], "gzip");
    assert!(headers.get("content-length").is_none());
    assert!(body.len() < n / 10, "gzip body is {} bytes", body.len());
    let mut out = String::new();
    async_compression::tokio::bufread::GzipDecoder::new(&body[..])
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out, original);

    let (_, headers, body) = fetch(&format!("{}/text/{n}", p.url), "gzip, deflate, br").await;
    assert_eq!(headers["content-encoding"], "br");
    let mut out = String::new();
    async_compression::tokio::bufread::BrotliDecoder::new(&body[..])
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out, original);
}

#[tokio::test]
async fn encoded_incompressible_small_or_unasked_responses_pass_untouched() {
    let b = backend("a").spawn().await;
    let p = proxy(&compressing(&b)).await;
    for path in ["/already-gzip", "/image"] {
        let (_, headers, body) = fetch(&format!("{}{path}", p.url), "gzip, br").await;
        assert_eq!(body, bytes::Bytes::from(vec![0x1fu8; 4096]), "{path}");
        assert_ne!(
            headers.get("content-encoding").map(|v| v.to_str().unwrap()),
            Some("br"),
            "{path}"
        );
    }
    let (_, headers, body) = fetch(&format!("{}/text/100", p.url), "gzip").await;
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(body.len(), 100);
    let (_, headers, _) = fetch(&format!("{}/text/5000", p.url), "identity").await;
    assert!(headers.get("content-encoding").is_none());
    // A route without compression never compresses.
    let plain = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (_, headers, body) = fetch(&format!("{}/text/5000", plain.url), "gzip, br").await;
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(body.len(), 5000);
}
