//! TLS with rustls (ring), both ways.
//!
//! Edge: a listener's certificates come from PEM files (chains; PKCS#8, RSA or EC keys) and
//! are chosen by SNI: the first certificate valid for the name (exact or wildcard, as the
//! certificate itself says), else the first one as the default. TLS 1.2 and 1.3 only,
//! rustls' cipher suites, ALPN `h2` then `http/1.1`, session tickets and a session cache,
//! optional client certificates (`client_ca`). The whole server config sits behind an
//! `ArcSwap`, so a reload swaps certificates for new handshakes while open connections
//! keep theirs.
//!
//! Upstream: `https://` backends are reached with the system's web PKI roots plus the pool's
//! `ca`, the backend's host name as SNI, and an optional client certificate.

use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use fulcrum_config::{CertificateConfig, TlsConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One certificate chain with its key.
struct Entry {
    key: Arc<CertifiedKey>,
    leaf: CertificateDer<'static>,
}

/// A listener's certificates, and which one each SNI name got (cached; bounded).
pub struct CertStore {
    entries: Vec<Entry>,
    chosen: DashMap<String, usize>,
}

const SNI_CACHE_MAX: usize = 4096;

impl CertStore {
    fn find(&self, name: &str) -> Arc<CertifiedKey> {
        let name = name.to_ascii_lowercase();
        if let Some(i) = self.chosen.get(&name) {
            return self.entries[*i].key.clone();
        }
        let i = ServerName::try_from(name.as_str())
            .ok()
            .and_then(|sn| {
                self.entries.iter().position(|e| {
                    webpki::EndEntityCert::try_from(&e.leaf)
                        .map(|c| c.verify_is_valid_for_subject_name(&sn).is_ok())
                        .unwrap_or(false)
                })
            })
            .unwrap_or(0);
        if self.chosen.len() < SNI_CACHE_MAX {
            self.chosen.insert(name, i);
        }
        self.entries[i].key.clone()
    }
}

#[derive(Debug)]
struct SniResolver(CertStore);

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertStore({} certificates)", self.entries.len())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => Some(self.0.find(name)),
            None => self.0.entries.first().map(|e| e.key.clone()),
        }
    }
}

/// Reads a PEM certificate chain.
pub fn load_chain(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{path}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{path}: no certificate found"));
    }
    Ok(chain)
}

/// Reads a certificate chain and its key, and checks that they belong together.
pub fn load_certified_key(
    c: &CertificateConfig,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = load_chain(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| format!("{}: no usable private key: {e}", c.key))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", c.key))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{} and {}: the key does not match the certificate ({e})",
            c.cert, c.key
        )
    })?;
    Ok(ck)
}

fn roots(paths: &[&str]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for p in paths {
        for cert in load_chain(p)? {
            roots.add(cert).map_err(|e| format!("{p}: {e}"))?;
        }
    }
    Ok(roots)
}

/// Builds a listener's server config from its `tls` table (reading every file).
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let mut entries = Vec::new();
    for c in &tls.certificates {
        let key = load_certified_key(c, &provider)?;
        let leaf = key.cert[0].clone();
        entries.push(Entry {
            key: Arc::new(key),
            leaf,
        });
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(&[ca])?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("client_ca {ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver(CertStore {
        entries,
        chosen: DashMap::new(),
    })));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    Ok(Arc::new(config))
}

/// A TLS listener's live config: swapped by reloads, read once per handshake.
pub struct TlsState {
    pub config: ArcSwap<ServerConfig>,
    /// `Strict-Transport-Security` to add to responses, when configured.
    pub hsts: Option<http::HeaderValue>,
}

impl TlsState {
    pub fn new(tls: &TlsConfig) -> Result<Arc<TlsState>, String> {
        Ok(Arc::new(TlsState {
            config: ArcSwap::new(server_config(tls)?),
            hsts: hsts(tls),
        }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }
}

pub fn hsts(tls: &TlsConfig) -> Option<http::HeaderValue> {
    tls.hsts.and_then(|d| {
        http::HeaderValue::from_str(&format!("max-age={}; includeSubDomains", d.as_secs())).ok()
    })
}

/// The client config for a pool's `https://` backends.
pub fn upstream_client_config(
    ca: Option<&str>,
    client_cert: Option<&CertificateConfig>,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        for cert in load_chain(ca)? {
            roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(c) => {
            let chain = load_chain(&c.cert)?;
            let key =
                PrivateKeyDer::from_pem_file(&c.key).map_err(|e| format!("{}: {e}", c.key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    // hyper-rustls sets ALPN itself (http/1.1: fulcrum speaks HTTP/1.1 to backends).
    config.alpn_protocols.clear();
    Ok(config)
}
