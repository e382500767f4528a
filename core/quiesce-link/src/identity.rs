//! Who a peer is, from its certificate.
//!
//! Every certificate of a cluster is signed by the cluster CA (`quiesce-broker certs` makes
//! them). Its subject says who holds it:
//!
//! | field | value |
//! |---|---|
//! | `CN` | the peer's name: the node name for a host, the user's name for a client, the broker's name |
//! | `O`  | `quiesce` |
//! | `OU` | the role: `node` (a host), `client` (a requester: the `quiesce` CLI, backup software) or `broker` |
//!
//! Node and broker certificates also carry their name (and the broker its addresses) as subject
//! alternative names, so that ordinary TLS name checks work. The broker lets only `node`
//! certificates attach as hosts, and takes the node name from the `CN`: a registration that
//! claims another name is refused.

use std::fmt;

/// The subject's organisation in every quiesce certificate.
pub const ORGANIZATION: &str = "quiesce";

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A host (`quiesce-host`): may attach to the broker as the node named in its certificate,
    /// and ask the catalog.
    Node,
    /// A requester (`quiesce`, backup software): may ask the catalog.
    Client,
    /// The broker itself.
    Broker,
}

impl Role {
    /// The `OU` of certificates of this role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Client => "client",
            Role::Broker => "broker",
        }
    }

    pub fn parse(ou: &str) -> Option<Role> {
        [Role::Node, Role::Client, Role::Broker]
            .into_iter()
            .find(|r| r.as_str() == ou)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified peer: its name and role, read from a certificate the TLS layer has already
/// checked against the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no client certificate; connect with --ca, --cert and --key (a certificate from `quiesce-broker certs`)")]
    NoCertificate,
    #[error("the peer's certificate cannot be read: {0}")]
    Unreadable(String),
    #[error("the peer's certificate has no subject common name (CN); make its certificates with `quiesce-broker certs`")]
    NoName,
    #[error("the certificate of {name:?} has no quiesce role (its subject OU is {ou:?}, expected node, client or broker); make its certificates with `quiesce-broker certs`")]
    NoRole { name: String, ou: Option<String> },
}

/// Reads the name and role from a DER certificate.
pub fn identify(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    let subject = cert.subject();
    let text = |attr: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        attr.as_str()
            .map(str::to_string)
            .map_err(|e| IdentityError::Unreadable(format!("a subject field is not text: {e}")))
    };
    let name = match subject.iter_common_name().next() {
        Some(cn) => text(cn)?,
        None => return Err(IdentityError::NoName),
    };
    if name.is_empty() {
        return Err(IdentityError::NoName);
    }
    let ou = match subject.iter_organizational_unit().next() {
        Some(ou) => Some(text(ou)?),
        None => None,
    };
    match ou.as_deref().and_then(Role::parse) {
        Some(role) => Ok(PeerIdentity { name, role }),
        None => Err(IdentityError::NoRole { name, ou }),
    }
}

/// The verified identity of the peer of a gRPC call over mutual TLS (its first certificate).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<PeerIdentity, IdentityError> {
    let certs = request.peer_certs().ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    identify(leaf.as_ref())
}
