//! `quiesce-broker certs`: the cluster CA and the certificates of the broker, the nodes and the
//! clients, following the naming convention of [`quiesce_link::identity`].
//!
//! Files written into the output directory (keys `0600`, certificates `0644`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the cluster CA; keep `ca.key` off the nodes (it is only needed to add certificates) |
//! | `broker.pem`, `broker.key` | the broker's certificate: `CN` = the broker's name, `OU=broker`, its names and addresses as SANs |
//! | `NODE.pem`, `NODE.key` | one per node: `CN` = the node name, `OU=node` |
//! | `CLIENT.pem`, `CLIENT.key` | one per client (requester): `CN` = its name, `OU=client` |
//!
//! When the directory already holds `ca.pem` and `ca.key`, that CA is reused: run the command
//! again with new `--nodes` to add nodes to a cluster.

use quiesce_link::identity::{Role, ORGANIZATION};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What to make.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub out: PathBuf,
    /// The broker's name (its certificate's CN and a DNS SAN).
    pub broker_name: String,
    /// Host names or IP addresses the hosts reach the broker at (SANs of its certificate).
    pub broker_hosts: Vec<String>,
    pub nodes: Vec<String>,
    pub clients: Vec<String>,
    /// How long the broker, node and client certificates are valid, in days.
    pub days: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what} {name:?} is not a valid name: {rule} (a node name as in the host configuration)", rule = quiesce_proto::NODE_NAME_RULE)]
    InvalidName { what: &'static str, name: String },
    #[error("the name {name:?} is given twice (as {first} and as {second}); every node, client and the broker need distinct names: their files are NAME.pem and NAME.key")]
    Duplicate {
        name: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("the name {name:?} is reserved for the files of the CA or the broker (ca.pem, broker.pem); name the {what} otherwise")]
    Reserved { what: &'static str, name: String },
    #[error("nothing to make: give --nodes (and --clients) or a new directory with --out")]
    Nothing,
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the existing CA in {dir} cannot be used ({cause}); move ca.pem and ca.key away to make a new CA (every certificate must then be made again)")]
    ExistingCa { dir: PathBuf, cause: String },
    #[error("making the certificate of {what} {name:?} failed: {cause}")]
    Generate {
        what: &'static str,
        name: String,
        cause: rcgen::Error,
    },
}

/// Makes (or reuses) the CA and makes every requested certificate. Returns the files written,
/// in order.
pub fn make(request: &CertRequest) -> Result<Vec<PathBuf>, CertError> {
    check_names(request)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| CertError::Io { path, cause }
    };
    std::fs::create_dir_all(&request.out).map_err(io(&request.out))?;
    let mut written = Vec::new();

    let ca_pem = request.out.join("ca.pem");
    let ca_key = request.out.join("ca.key");
    let issuer = if ca_pem.exists() && ca_key.exists() {
        let existing = |cause: String| CertError::ExistingCa {
            dir: request.out.clone(),
            cause,
        };
        let pem = std::fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
        let key = std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
        let key = KeyPair::from_pem(&key).map_err(|e| existing(format!("ca.key: {e}")))?;
        Issuer::from_ca_cert_pem(&pem, key).map_err(|e| existing(format!("ca.pem: {e}")))?
    } else {
        let generate = |cause| CertError::Generate {
            what: "the cluster CA",
            name: "ca".into(),
            cause,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // A name of its own, so that a certificate of another cluster is an "unknown issuer".
        let tag: String = key.public_key_raw()[1..7]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("quiesce cluster CA {tag}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, 3650);
        let cert = params.self_signed(&key).map_err(generate)?;
        write_file(&ca_pem, cert.pem().as_bytes(), 0o644)?;
        write_file(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        written.extend([ca_pem, ca_key]);
        Issuer::new(params, key)
    };

    let mut broker_sans = vec![request.broker_name.clone()];
    broker_sans.extend(request.broker_hosts.iter().cloned());
    broker_sans.dedup();
    let mut leaves = vec![("broker", &request.broker_name, Role::Broker, broker_sans)];
    for node in &request.nodes {
        leaves.push((node.as_str(), node, Role::Node, vec![node.clone()]));
    }
    for client in &request.clients {
        leaves.push((client.as_str(), client, Role::Client, vec![]));
    }
    for (file, name, role, sans) in leaves {
        let generate = |cause| CertError::Generate {
            what: role.as_str(),
            name: name.clone(),
            cause,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(sans).map_err(generate)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Broker => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Node | Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, request.days);
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        let pem = request.out.join(format!("{file}.pem"));
        let key_file = request.out.join(format!("{file}.key"));
        write_file(&pem, cert.pem().as_bytes(), 0o644)?;
        write_file(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
        written.extend([pem, key_file]);
    }
    Ok(written)
}

fn check_names(request: &CertRequest) -> Result<(), CertError> {
    let mut seen: Vec<(&str, &'static str)> = vec![];
    let named = std::iter::once(("broker name", &request.broker_name))
        .chain(request.nodes.iter().map(|n| ("node", n)))
        .chain(request.clients.iter().map(|c| ("client", c)));
    for (what, name) in named {
        if !quiesce_proto::is_valid_node_name(name) {
            return Err(CertError::InvalidName {
                what,
                name: name.clone(),
            });
        }
        if what != "broker name" && (name == "ca" || name == "broker") {
            return Err(CertError::Reserved {
                what,
                name: name.clone(),
            });
        }
        if let Some((_, first)) = seen.iter().find(|(n, _)| n == name) {
            return Err(CertError::Duplicate {
                name: name.clone(),
                first,
                second: what,
            });
        }
        seen.push((name, what));
    }
    Ok(())
}

/// From a day ago (clocks of a cluster differ a little) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let day = Duration::from_secs(86_400);
    params.not_before = epoch + now.saturating_sub(day);
    params.not_after = epoch + now + day * days.max(1);
}

/// Writes a file with `mode` from its creation on (a key is never readable by others, not even
/// for a moment); an existing file is replaced.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |cause| CertError::Io {
        path: path.into(),
        cause,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(dir: &Path, name: &str) -> quiesce_link::PeerIdentity {
        let files = quiesce_link::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        files.identity().unwrap()
    }

    fn request(out: &Path, nodes: &[&str]) -> CertRequest {
        CertRequest {
            out: out.into(),
            broker_name: "broker1".into(),
            broker_hosts: vec!["127.0.0.1".into()],
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            clients: vec!["admin".into()],
            days: 30,
        }
    }

    #[test]
    fn names_and_roles_follow_the_convention_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        make(&request(dir.path(), &["node1", "node2"])).unwrap();
        let node1 = who(dir.path(), "node1");
        assert_eq!((node1.name.as_str(), node1.role), ("node1", Role::Node));
        assert_eq!(who(dir.path(), "admin").role, Role::Client);
        let broker = who(dir.path(), "broker");
        assert_eq!(
            (broker.name.as_str(), broker.role),
            ("broker1", Role::Broker)
        );
        for key in [
            "ca.key",
            "broker.key",
            "node1.key",
            "node2.key",
            "admin.key",
        ] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn an_existing_ca_is_reused_to_add_nodes() {
        let dir = tempfile::tempdir().unwrap();
        make(&request(dir.path(), &["node1"])).unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let written = make(&request(dir.path(), &["node4"])).unwrap();
        assert!(!written.contains(&dir.path().join("ca.pem")));
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        assert_eq!(who(dir.path(), "node4").name, "node4");
    }

    #[test]
    fn bad_and_clashing_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = make(&request(dir.path(), &["node 1"])).unwrap_err();
        assert!(e.to_string().contains("not a valid name"), "{e}");
        let e = make(&request(dir.path(), &["node1", "node1"])).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        let e = make(&request(dir.path(), &["ca"])).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
    }
}
