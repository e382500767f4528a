//! The cluster's TLS files and connecting to the broker.

use crate::identity::{self, IdentityError, PeerIdentity};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// The three files every peer of a cluster needs: the cluster CA and its own certificate and key
/// (as written by `quiesce-broker certs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate (`ca.pem`): peers are trusted when it signed theirs.
    pub ca: PathBuf,
    /// This peer's certificate (`node1.pem`, `broker.pem`, `admin.pem`).
    pub cert: PathBuf,
    /// This peer's private key (`node1.key`, ...).
    pub key: PathBuf,
}

/// How a peer talks to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS with the cluster's certificates: the only mode for real clusters.
    Tls(TlsFiles),
    /// Plaintext, no authentication: local demos only (`--insecure`).
    Insecure,
}

/// Why the TLS flags of a command (`--ca`, `--cert`, `--key`, `--insecure`) do not make a
/// [`Security`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityFlagsError {
    #[error("the broker is reached over mutual TLS: pass --ca, --cert and --key (the cluster CA, and this peer's certificate and key from `quiesce-broker certs`), or --insecure for a local demo only; missing: {missing}")]
    MissingTls { missing: String },
    #[error("--insecure cannot be combined with --ca, --cert or --key: either mutual TLS or, for a local demo, plaintext")]
    InsecureWithTls,
}

impl Security {
    /// The security the TLS flags of any quiesce command ask for: all three files, or
    /// `--insecure` alone. One rule for the host, the broker and the CLI.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        insecure: bool,
    ) -> Result<Security, SecurityFlagsError> {
        if insecure {
            if ca.is_some() || cert.is_some() || key.is_some() {
                return Err(SecurityFlagsError::InsecureWithTls);
            }
            return Ok(Security::Insecure);
        }
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Security::Tls(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing = [
                    ("--ca", ca.is_none()),
                    ("--cert", cert.is_none()),
                    ("--key", key.is_none()),
                ]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| f)
                .collect::<Vec<_>>()
                .join(", ");
                Err(SecurityFlagsError::MissingTls { missing })
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read the {what} {path}: {cause}; pass the file written by `quiesce-broker certs`"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the {what} {path} holds no PEM certificate ({reason}); pass the .pem file written by `quiesce-broker certs`")]
    NotACertificate {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the private key {path} holds no PEM private key; pass the .key file written by `quiesce-broker certs` beside the certificate")]
    NotAKey { path: PathBuf },
    #[error("the certificate {path}: {cause}")]
    Identity { path: PathBuf, cause: IdentityError },
}

struct Pems {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        what,
        path: path.into(),
        cause,
    })
}

/// The identity in the first certificate of a PEM file.
fn pem_identity(what: &'static str, path: &Path, pem: &[u8]) -> Result<PeerIdentity, TlsError> {
    let not_cert = |reason: String| TlsError::NotACertificate {
        what,
        path: path.into(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| not_cert(e.to_string()))?;
    if pem.label != "CERTIFICATE" {
        return Err(not_cert(format!("its first block is a {}", pem.label)));
    }
    identity::identify(&pem.contents).map_err(|cause| TlsError::Identity {
        path: path.into(),
        cause,
    })
}

impl TlsFiles {
    fn load(&self) -> Result<Pems, TlsError> {
        let ca = read("cluster CA certificate", &self.ca)?;
        let cert = read("certificate", &self.cert)?;
        let key = read("private key", &self.key)?;
        let not_cert = |what, path: &Path| TlsError::NotACertificate {
            what,
            path: path.into(),
            reason: "no BEGIN CERTIFICATE line".into(),
        };
        if !contains(&ca, b"-----BEGIN CERTIFICATE-----") {
            return Err(not_cert("cluster CA certificate", &self.ca));
        }
        if !contains(&cert, b"-----BEGIN CERTIFICATE-----") {
            return Err(not_cert("certificate", &self.cert));
        }
        if !contains(&key, b"PRIVATE KEY-----") {
            return Err(TlsError::NotAKey {
                path: self.key.clone(),
            });
        }
        Ok(Pems { ca, cert, key })
    }

    /// Who this peer is, by its own certificate.
    pub fn identity(&self) -> Result<PeerIdentity, TlsError> {
        let cert = read("certificate", &self.cert)?;
        pem_identity("certificate", &self.cert, &cert)
    }

    /// The broker's side: present our certificate, require a client certificate signed by the
    /// cluster CA from every peer.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let pems = self.load()?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(pems.cert, pems.key))
            .client_ca_root(Certificate::from_pem(pems.ca))
            .client_auth_optional(false))
    }

    /// A host's or client's side: trust only the cluster CA, present our certificate.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let pems = self.load()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pems.ca))
            .identity(Identity::from_pem(pems.cert, pems.key)))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the broker address {url:?} is not a URL ({reason}); write it like https://broker.example:{port}", port = crate::DEFAULT_PORT)]
    InvalidUrl { url: String, reason: String },
    #[error("the broker address {url:?} must start with {expected}: {why}")]
    Scheme {
        url: String,
        expected: &'static str,
        why: &'static str,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to the broker at {url}: {cause}; {hint}")]
    Connect {
        url: String,
        cause: String,
        hint: &'static str,
    },
}

/// How long connecting to the broker may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to the broker at `url` (`https://HOST:PORT`, or `http://` with
/// [`Security::Insecure`]). Connects eagerly so that an unreachable broker or a refused
/// certificate shows here. The whole connection — TCP, TLS handshake, HTTP/2 — is bounded by
/// [`CONNECT_TIMEOUT`]: a peer that accepts and then never answers is unreachable too.
pub async fn connect(url: &str, security: &Security) -> Result<Channel, ConnectError> {
    let endpoint = endpoint(url, security)?;
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| ConnectError::Connect {
            url: url.to_string(),
            cause: format!(
                "no TLS or HTTP/2 answer within {} ms",
                CONNECT_TIMEOUT.as_millis()
            ),
            hint: "something accepts connections there but does not answer as a quiesce broker would: is it the broker's address and port?",
        })?;
    connected.map_err(|e| {
        let cause = crate::error_chain(&e);
        let clock = ["Expired", "expired", "NotValidYet", "not valid yet"];
        let hint = if clock.iter().any(|c| cause.contains(c)) {
            "the TLS handshake failed on a certificate's dates: check that the clocks of this machine and the broker's are right (`date`; run NTP) and the certificates' validity (`openssl x509 -noout -dates -in FILE`); make new certificates with `quiesce-broker certs` if they expired"
        } else if cause.contains("certificate") || cause.contains("alert") {
            "the TLS handshake failed: the broker's certificate and this one must both come from the cluster's CA (`quiesce-broker certs`, same ca.key), and --ca must be that CA's ca.pem"
        } else {
            "is quiesce-broker running and listening there?"
        };
        ConnectError::Connect {
            url: url.to_string(),
            cause,
            hint,
        }
    })
}

/// The endpoint for `url`, checked and configured but not connected.
pub fn endpoint(url: &str, security: &Security) -> Result<Endpoint, ConnectError> {
    let (expected, why) = match security {
        Security::Tls(_) => (
            "https://",
            "the broker is reached over mutual TLS (use --insecure with http:// only for a local demo)",
        ),
        Security::Insecure => (
            "http://",
            "--insecure talks plaintext; drop --insecure and pass --ca, --cert and --key to use https://",
        ),
    };
    if !url.starts_with(expected) {
        return Err(ConnectError::Scheme {
            url: url.to_string(),
            expected,
            why,
        });
    }
    let endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|e| ConnectError::InvalidUrl {
            url: url.to_string(),
            reason: crate::error_chain(&e),
        })?;
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    match security {
        Security::Tls(files) => {
            endpoint
                .tls_config(files.client_config()?)
                .map_err(|e| ConnectError::InvalidUrl {
                    url: url.to_string(),
                    reason: crate::error_chain(&e),
                })
        }
        Security::Insecure => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_need_all_three_files_or_insecure_alone() {
        let p = |s: &str| Some(PathBuf::from(s));
        let e = Security::from_flags(p("ca.pem"), None, p("k"), false).unwrap_err();
        assert_eq!(
            e,
            SecurityFlagsError::MissingTls {
                missing: "--cert".into()
            }
        );
        let e = Security::from_flags(None, None, None, false).unwrap_err();
        assert!(
            e.to_string().contains("missing: --ca, --cert, --key"),
            "{e}"
        );
        let e = Security::from_flags(p("ca.pem"), None, None, true).unwrap_err();
        assert_eq!(e, SecurityFlagsError::InsecureWithTls);
        assert_eq!(
            Security::from_flags(None, None, None, true).unwrap(),
            Security::Insecure
        );
        assert_eq!(
            Security::from_flags(p("a"), p("b"), p("c"), false).unwrap(),
            Security::Tls(TlsFiles {
                ca: "a".into(),
                cert: "b".into(),
                key: "c".into()
            })
        );
    }
}
