//! TLS termination and upstream TLS, with certificates made at test time by rcgen.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a certificate for `names`; writes `stem.pem` and `stem.key` in `dir`.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.pem())
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn client_config(
    ca: &Ca,
    alpn: &[&[u8]],
    client_cert: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// One HTTPS connection: (the certificate the server presented, the ALPN protocol, a sender).
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(
    addr: SocketAddr,
    name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<(Vec<u8>, Option<Vec<u8>>, Sender)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let cert = session.peer_certificates().unwrap()[0].to_vec();
    let alpn = session.alpn_protocol().map(|a| a.to_vec());
    let sender = if alpn.as_deref() == Some(b"h2") {
        let (s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    Ok((cert, alpn, sender))
}

async fn send(
    sender: &mut Sender,
    host: &str,
) -> Result<(StatusCode, http::Version, String), hyper::Error> {
    let req = |v| {
        Request::get(format!("https://{host}/"))
            .version(v)
            .header("host", host)
            .body(Empty::new())
            .unwrap()
    };
    let resp = match sender {
        Sender::H1(s) => s.send_request(req(http::Version::HTTP_11)).await?,
        Sender::H2(s) => s.send_request(req(http::Version::HTTP_2)).await?,
    };
    let (status, version) = (resp.status(), resp.version());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ca: Ca,
    certs: Vec<String>,
    config: PathBuf,
    _backend: TestBackend,
}

/// A TLS listener with three certificates: the default (also valid for 127.0.0.1), a.test,
/// and *.c.test.
fn setup(backend: TestBackend, listener_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let ca = Ca::new("fulcrum test CA");
    let (c0, k0, p0) = ca.issue(&d, "default", &["default.test", "127.0.0.1"]);
    let (c1, k1, p1) = ca.issue(&d, "a", &["a.test"]);
    let (c2, k2, p2) = ca.issue(&d, "wild", &["*.c.test"]);
    let config = d.join("f.toml");
    std::fs::write(
        &config,
        format!(
            r#"[admin]
listen = "127.0.0.1:0"
[[listeners]]
name = "https"
listen = "127.0.0.1:0"
tls = {{ certificates = [ {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }} ]{listener_extra} }}
[[routes]]
pool = "p"
[pools.p]
backends = [{{ address = "{}" }}]
"#,
            c0.display(), k0.display(), c1.display(), k1.display(), c2.display(), k2.display(), backend.addr
        ),
    )
    .unwrap();
    Setup {
        dir: d,
        _dir: dir,
        ca,
        certs: vec![p0, p1, p2],
        config,
        _backend: backend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_http1_and_h2_by_alpn_and_sni_picks_the_certificate() {
    let s = setup(backend("app").spawn().await, ", hsts = \"365d\"");
    let p = proxy_from_file(&s.config).await;
    let addr = p.running.addr("https");
    for (name, want) in [
        ("a.test", 1),
        ("x.c.test", 2),
        ("default.test", 0),
        ("other.test", 0),
    ] {
        let cfg = client_config(&s.ca, &[b"h2", b"http/1.1"], None);
        // other.test: no certificate fits, the default is served (and fails verification).
        let result = connect(addr, name, cfg).await;
        if name == "other.test" {
            assert!(result.is_err(), "a certificate for other.test?");
            continue;
        }
        let (cert, alpn, mut sender) = result.unwrap();
        assert_eq!(
            cert,
            der(&s.certs[want]),
            "{name} got the wrong certificate"
        );
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        let (status, version, body) = send(&mut sender, name).await.unwrap();
        assert_eq!(
            (status, version, body.as_str()),
            (StatusCode::OK, http::Version::HTTP_2, "app")
        );
    }
    // HTTP/1.1 when that is all the client offers; HSTS on the answer; the backend learns https.
    let (_, alpn, mut sender) = connect(addr, "a.test", client_config(&s.ca, &[b"http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (status, version, _) = send(&mut sender, "a.test").await.unwrap();
    assert_eq!((status, version), (StatusCode::OK, http::Version::HTTP_11));
    assert_eq!(s._backend.last_headers()["x-forwarded-proto"], "https");
    // No SNI (an IP address): the default certificate.
    let (cert, _, _) = connect(
        addr,
        "127.0.0.1",
        client_config(&s.ca, &[b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(cert, der(&s.certs[0]));
    // HSTS header.
    let (_, _, sender) = connect(addr, "a.test", client_config(&s.ca, &[b"http/1.1"], None))
        .await
        .unwrap();
    if let Sender::H1(mut s1) = sender {
        let r = s1
            .send_request(
                Request::get("/")
                    .header("host", "a.test")
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            r.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_reload_and_a_broken_one_is_refused() {
    let s = setup(backend("app").spawn().await, "");
    let p = proxy_from_file(&s.config).await;
    let addr = p.running.addr("https");
    let cfg = || client_config(&s.ca, &[b"http/1.1"], None);
    let (old_cert, _, mut open_conn) = connect(addr, "a.test", cfg()).await.unwrap();
    assert_eq!(old_cert, der(&s.certs[1]));
    // Renew a.test on disk (new key too) and reload.
    let (_, _, renewed) = s.ca.issue(&s.dir, "a", &["a.test"]);
    let (status, body) = call("POST", &p.admin("/reload"), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (new_cert, _, _) = connect(addr, "a.test", cfg()).await.unwrap();
    assert_eq!(new_cert, der(&renewed));
    assert_ne!(new_cert, old_cert);
    // The connection opened before the reload still works.
    assert_eq!(
        send(&mut open_conn, "a.test").await.unwrap().0,
        StatusCode::OK
    );

    // A corrupt key: the reload is refused with a clear error, and the last good one stays.
    std::fs::write(
        s.dir.join("a.key"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let (status, body) = call("POST", &p.admin("/reload"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("a.key"), "{body}");
    let (still, _, mut conn) = connect(addr, "a.test", cfg()).await.unwrap();
    assert_eq!(still, der(&renewed));
    assert_eq!(send(&mut conn, "a.test").await.unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_listener_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Ca::new("clients CA");
    let ca_path = clients.write(dir.path());
    let s = setup(
        backend("app").spawn().await,
        &format!(", client_ca = \"{}\"", ca_path.display()),
    );
    let p = proxy_from_file(&s.config).await;
    let addr = p.running.addr("https");
    // Without a certificate: the handshake (or the first request) fails.
    let without = match connect(addr, "a.test", client_config(&s.ca, &[b"http/1.1"], None)).await {
        Err(_) => true,
        Ok((_, _, mut sender)) => send(&mut sender, "a.test").await.is_err(),
    };
    assert!(without, "served without a client certificate");
    let (c, k, _) = clients.issue(dir.path(), "client", &["client.test"]);
    let (_, _, mut sender) = connect(
        addr,
        "a.test",
        client_config(&s.ca, &[b"http/1.1"], Some((&c, &k))),
    )
    .await
    .unwrap();
    assert_eq!(send(&mut sender, "a.test").await.unwrap().0, StatusCode::OK);
}

/// An HTTPS backend presenting `cert`, answering "secure".
async fn tls_backend(cert: &Path, key: &Path) -> SocketAddr {
    let tls = fulcrum::config::TlsConfig {
        certificates: vec![fulcrum::config::CertificateConfig {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }],
        client_ca: None,
        hsts: None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(fulcrum::tls::server_config(&tls).unwrap());
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = socket.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(full("secure")))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_verified_against_the_pools_ca() {
    let dir = tempfile::tempdir().unwrap();
    let private = Ca::new("private CA");
    let ca_path = private.write(dir.path());
    let (c, k, _) = private.issue(dir.path(), "backend", &["127.0.0.1"]);
    let trusted = tls_backend(&c, &k).await;
    let rogue_ca = Ca::new("rogue CA");
    let (rc, rk, _) = rogue_ca.issue(dir.path(), "rogue", &["127.0.0.1"]);
    let untrusted = tls_backend(&rc, &rk).await;

    let text = |addr: SocketAddr| {
        one_pool(
            "round_robin",
            &[],
            &format!("ca = \"{}\"\nretry = {{ attempts = 0 }}", ca_path.display()),
        )
        .replace(
            "backends = []",
            &format!("backends = [{{ address = \"https://{addr}\" }}]"),
        )
    };
    let p = proxy(&text(trusted)).await;
    let (status, _, body) = get(&p.url, &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "secure"));

    let p = proxy(&text(untrusted)).await;
    let (status, _, body) = get(&p.url, &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(!body.contains("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_and_http1_to_the_tls_listener() {
    let s = setup(backend("app").spawn().await, "");
    let p = proxy_from_file(&s.config).await;
    let port = p.running.addr("https").port();
    let ca = s.ca.write(&s.dir);
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = tokio::process::Command::new("curl")
            .args(["-s", flag, "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("a.test:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .arg(format!("https://a.test:{port}/"))
            .output()
            .await
            .expect("curl missing");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            text,
            format!("app\n{want} 200"),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn redirect_https_answers_308() {
    let b = backend("app").spawn().await;
    let text = on_listener(
        &one_pool("round_robin", &[(b.addr, 1)], ""),
        "redirect_https = true",
    );
    let p = proxy(&text).await;
    let (status, headers, _) = get(
        &format!("{}/path?q=1", p.url),
        &[("host", "shop.example.com:8080")],
    )
    .await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers["location"], "https://shop.example.com/path?q=1");
    assert_eq!(b.hits(), 0);
}
