//! Finding guests and where their disks lie.
//!
//! A guest is either a pair of sockets in the socket directory — `<vm>.agent.sock` (the host
//! side of its guest agent's virtio-serial channel) and `<vm>.qmp.sock` (QEMU's monitor), QMP
//! saying the VM's name, UUID and disk images — or a running libvirt domain (`virsh`). A disk is
//! *on a volume* when its image file, resolved, lies under the volume's path **and** on the same
//! file system as that path (btrfs leaves nested subvolumes and other mounts out of a snapshot;
//! they show up as another device number).

use crate::agent::{Agent, AgentLink};
use crate::config::{Settings, Volume};
use crate::qmp::{self, Qmp, QmpError};
use crate::virsh::{self, LibvirtAgent, Virsh, VirshError};
use quiesce_sdk::Error;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A guest's sockets, as found in the socket directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sockets {
    /// The file names' stem (`<stem>.agent.sock`).
    pub stem: String,
    pub agent: PathBuf,
    pub qmp: PathBuf,
}

pub const AGENT_SUFFIX: &str = ".agent.sock";
pub const QMP_SUFFIX: &str = ".qmp.sock";

/// The guests whose agent socket is in `dir`, by stem. A missing directory has none.
pub fn scan(dir: &Path) -> Result<Vec<Sockets>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::new(format!(
                "cannot read the socket directory {}: {e}; check `socket_dir`",
                dir.display()
            )))
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(AGENT_SUFFIX) else {
            continue;
        };
        if stem.is_empty() || !entry.file_type().is_ok_and(|t| t.is_socket()) {
            continue;
        }
        found.push(Sockets {
            stem: stem.to_string(),
            agent: entry.path(),
            qmp: dir.join(format!("{stem}{QMP_SUFFIX}")),
        });
    }
    found.sort();
    Ok(found)
}

/// Where a guest is found, and through what it is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Plain QEMU: its sockets in the socket directory.
    Sockets(Sockets),
    /// A libvirt domain.
    Libvirt { virsh: Virsh, domain: String },
}

/// Why a guest's name, UUID or disks could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Virsh(#[from] VirshError),
}

impl QueryError {
    /// The VM is not running.
    pub fn is_gone(&self) -> bool {
        match self {
            QueryError::Qmp(e) => e.is_gone(),
            QueryError::Virsh(e) => e.is_gone(),
        }
    }
}

impl Source {
    /// Unique among the sources of one node: `socket:<stem>`, `libvirt:<uri>:<domain>`.
    pub fn key(&self) -> String {
        match self {
            Source::Sockets(s) => format!("socket:{}", s.stem),
            Source::Libvirt { virsh, domain } => format!("libvirt:{}:{domain}", virsh.uri),
        }
    }

    /// For messages: `socket /run/quiesce-qemu/web1.agent.sock`, `libvirt qemu:///system domain web1`.
    pub fn describe(&self) -> String {
        match self {
            Source::Sockets(s) => format!("socket {}", s.agent.display()),
            Source::Libvirt { virsh, domain } => {
                format!("libvirt {} domain {domain}", virsh.uri)
            }
        }
    }

    /// The name to use when the VM has none of its own.
    pub fn fallback_name(&self) -> &str {
        match self {
            Source::Sockets(s) => &s.stem,
            Source::Libvirt { domain, .. } => domain,
        }
    }

    pub fn agent(&self) -> Box<dyn AgentLink> {
        match self {
            Source::Sockets(s) => Box::new(Agent::new(&s.agent)),
            Source::Libvirt { virsh, domain } => Box::new(LibvirtAgent {
                virsh: virsh.clone(),
                domain: domain.clone(),
            }),
        }
    }

    /// The VM's name, UUID and disks, before `deadline`.
    pub fn query(&self, volumes: &[VolumeRoot], deadline: Instant) -> Result<VmInfo, QueryError> {
        match self {
            Source::Sockets(s) => Ok(query(s, volumes, deadline)?),
            Source::Libvirt { virsh, domain } => {
                Ok(query_libvirt(virsh, domain, volumes, deadline)?)
            }
        }
    }
}

/// Every guest of the socket directory and, with `libvirt_uri`, every running libvirt domain.
pub fn discover(settings: &Settings, deadline: Instant) -> Result<Vec<Source>, Error> {
    let mut found: Vec<Source> = scan(&settings.socket_dir)?
        .into_iter()
        .map(Source::Sockets)
        .collect();
    if let Some(uri) = &settings.libvirt_uri {
        let virsh = Virsh { uri: uri.clone() };
        let domains = virsh.running(deadline).map_err(|e| {
            Error::new(format!(
                "cannot list the running libvirt domains: {e}; is libvirtd running?"
            ))
        })?;
        found.extend(domains.into_iter().map(|domain| Source::Libvirt {
            virsh: virsh.clone(),
            domain,
        }));
    }
    Ok(found)
}

/// A configured volume, resolved on this node.
#[derive(Debug, Clone)]
pub struct VolumeRoot {
    pub name: String,
    pub configured: PathBuf,
    pub real: PathBuf,
    pub device: u64,
}

impl VolumeRoot {
    pub fn resolve(volume: &Volume) -> Result<VolumeRoot, Error> {
        let real = volume.path.canonicalize().map_err(|e| {
            Error::new(format!(
                "volume {}: cannot resolve its path {}: {e}; mount the volume before starting \
                 quiesce-host, or fix `path` in [[plugins.qemu.volumes]]",
                volume.name,
                volume.path.display()
            ))
        })?;
        let device = std::fs::metadata(&real)
            .map_err(|e| Error::new(format!("cannot stat {}: {e}", real.display())))?
            .dev();
        Ok(VolumeRoot {
            name: volume.name.clone(),
            configured: volume.path.clone(),
            real,
            device,
        })
    }
}

/// Where a disk image lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In the snapshot of this volume.
    Volume(String),
    /// Under the volume's path, but on another file system or a nested subvolume: a snapshot of
    /// the volume does not hold it.
    Nested { volume: String },
    /// A local file off every configured volume.
    Elsewhere,
    /// Not a local file (`rbd:`, `nbd:`, `json:{...}`, ...), or one that cannot be resolved.
    NotLocal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub device: String,
    /// As QEMU names it.
    pub file: String,
    /// Resolved, for a local file.
    pub real: Option<PathBuf>,
    /// 0: the image the guest writes; 1, 2, ...: its backing chain.
    pub depth: usize,
    pub read_only: bool,
    pub place: Place,
}

impl Disk {
    /// The component name: `disk:<device>`, `disk:<device>:backing<depth>`.
    pub fn component(&self) -> String {
        let device = self
            .device
            .trim_end_matches("/virtio-backend")
            .rsplit('/')
            .next()
            .unwrap_or(&self.device);
        match self.depth {
            0 => format!("disk:{device}"),
            d => format!("disk:{device}:backing{d}"),
        }
    }

    /// `disk0 /srv/vms/web1.img (volume shared)`, for reports.
    pub fn describe(&self) -> String {
        let path = self
            .real
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| self.file.clone());
        let place = match &self.place {
            Place::Volume(v) => format!("volume {v}"),
            Place::Nested { volume } => format!(
                "under volume {volume}'s path but on another file system or nested subvolume, \
                 so not in its snapshots"
            ),
            Place::Elsewhere => "on no configured volume".into(),
            Place::NotLocal(why) => why.clone(),
        };
        format!("{} {path} ({place})", self.component())
    }
}

/// What QMP says about a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// `-name guest=...`, or the socket stem when QEMU has none.
    pub name: String,
    /// `-uuid`, empty when QEMU has none (all zeros).
    pub uuid: String,
    pub qemu_version: String,
    pub disks: Vec<Disk>,
}

impl VmInfo {
    pub fn on_volumes(&self) -> impl Iterator<Item = (&Disk, &str)> {
        self.disks.iter().filter_map(|d| match &d.place {
            Place::Volume(v) => Some((d, v.as_str())),
            _ => None,
        })
    }

    pub fn on_volume(&self, volume: &str) -> bool {
        self.on_volumes().any(|(_, v)| v == volume)
    }
}

/// Asks QEMU, through the guest's QMP socket, for its name, UUID and disks, before `deadline`.
pub fn query(
    sockets: &Sockets,
    volumes: &[VolumeRoot],
    deadline: Instant,
) -> Result<VmInfo, QmpError> {
    let mut qmp = Qmp::connect(&sockets.qmp, deadline)?;
    let name = qmp.execute("query-name", deadline)?["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or(&sockets.stem)
        .to_string();
    let uuid = qmp.execute("query-uuid", deadline)?["UUID"]
        .as_str()
        .filter(|u| u.chars().any(|c| c != '0' && c != '-'))
        .unwrap_or("")
        .to_string();
    let blocks = qmp.execute("query-block", deadline)?;
    let cwd = qmp
        .pid
        .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).ok());
    let disks = qmp::block_files(&blocks)
        .into_iter()
        .map(|f| {
            let (real, place) = place(&f.file, cwd.as_deref(), volumes);
            Disk {
                device: f.device,
                file: f.file,
                real,
                depth: f.depth,
                read_only: f.read_only,
                place,
            }
        })
        .collect();
    Ok(VmInfo {
        name,
        uuid,
        qemu_version: qmp.version.clone(),
        disks,
    })
}

/// A libvirt domain's UUID and disks (`domuuid`, `domblklist --details`), before `deadline`.
/// libvirt gives the active image of each disk, not its backing chain.
fn query_libvirt(
    virsh: &Virsh,
    domain: &str,
    volumes: &[VolumeRoot],
    deadline: Instant,
) -> Result<VmInfo, VirshError> {
    let uuid = virsh
        .run(domain, &["domuuid", domain], deadline)?
        .trim()
        .to_string();
    let list = virsh.run(domain, &["domblklist", domain, "--details"], deadline)?;
    let qemu_version = virsh.hypervisor(deadline).unwrap_or_default();
    let disks = virsh::block_devices(&list)
        .into_iter()
        .filter(|b| b.source != "-" && !b.source.is_empty())
        .map(|b| {
            let (real, place) = if matches!(b.kind.as_str(), "file" | "block") {
                place(&b.source, None, volumes)
            } else {
                (
                    None,
                    Place::NotLocal(format!(
                        "a {} disk: its storage is not a volume of this node",
                        b.kind
                    )),
                )
            };
            Disk {
                device: b.target,
                file: b.source,
                real,
                depth: 0,
                read_only: b.device == "cdrom",
                place,
            }
        })
        .collect();
    Ok(VmInfo {
        name: domain.to_string(),
        uuid,
        qemu_version,
        disks,
    })
}

/// Resolves an image file name as QEMU gives it and places it against the volumes.
fn place(file: &str, cwd: Option<&Path>, volumes: &[VolumeRoot]) -> (Option<PathBuf>, Place) {
    let path = if file.starts_with('/') {
        PathBuf::from(file)
    } else if file.starts_with("json:") || file.split('/').next().is_some_and(|p| p.contains(':')) {
        return (
            None,
            Place::NotLocal("not a local file: its storage is not a volume of this node".into()),
        );
    } else {
        match cwd {
            Some(cwd) => cwd.join(file),
            None => {
                return (
                    None,
                    Place::NotLocal(
                        "a relative path, and QEMU's working directory is unknown".into(),
                    ),
                )
            }
        }
    };
    let real = match path.canonicalize() {
        Ok(real) => real,
        Err(e) => return (None, Place::NotLocal(format!("cannot resolve it: {e}"))),
    };
    let device = std::fs::metadata(&real).map(|m| m.dev()).ok();
    for v in volumes {
        if real.starts_with(&v.real) {
            let place = if device == Some(v.device) {
                Place::Volume(v.name.clone())
            } else {
                Place::Nested {
                    volume: v.name.clone(),
                }
            };
            return (Some(real), place);
        }
    }
    (Some(real), Place::Elsewhere)
}

/// A writer id from a VM name: `<prefix><name>`, characters outside `[A-Za-z0-9._-]` as `_`.
pub fn writer_id(prefix: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut id = format!("{prefix}{clean}");
    id.truncate(64);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn scan_finds_agent_sockets_and_pairs_them_with_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let _a = UnixListener::bind(dir.path().join("web1.agent.sock")).unwrap();
        std::fs::write(dir.path().join("fake.agent.sock"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        let found = scan(dir.path()).unwrap();
        assert_eq!(
            found,
            vec![Sockets {
                stem: "web1".into(),
                agent: dir.path().join("web1.agent.sock"),
                qmp: dir.path().join("web1.qmp.sock"),
            }]
        );
        assert!(scan(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn disks_are_placed_by_path_and_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("vms")).unwrap();
        std::fs::write(vol.join("vms/a.img"), "").unwrap();
        std::fs::write(dir.path().join("b.img"), "").unwrap();
        let root = VolumeRoot::resolve(&Volume {
            name: "shared".into(),
            path: vol.clone(),
        })
        .unwrap();
        let roots = [root];
        let (real, p) = place(&vol.join("vms/a.img").display().to_string(), None, &roots);
        assert_eq!(p, Place::Volume("shared".into()));
        assert_eq!(real.unwrap(), vol.join("vms/a.img").canonicalize().unwrap());
        let (_, p) = place("vms/a.img", Some(&vol), &roots);
        assert_eq!(p, Place::Volume("shared".into()));
        let (_, p) = place(
            &dir.path().join("b.img").display().to_string(),
            None,
            &roots,
        );
        assert_eq!(p, Place::Elsewhere);
        assert!(matches!(
            place("rbd:pool/img", None, &roots).1,
            Place::NotLocal(_)
        ));
        assert!(matches!(
            place("json:{\"x\":1}", None, &roots).1,
            Place::NotLocal(_)
        ));
        assert!(matches!(place("a.img", None, &roots).1, Place::NotLocal(_)));
        // /proc is another file system: under a "volume" at / it is not in its snapshot.
        let slash = [VolumeRoot::resolve(&Volume {
            name: "root".into(),
            path: "/".into(),
        })
        .unwrap()];
        assert_eq!(
            place("/proc/self/status", None, &slash).1,
            Place::Nested {
                volume: "root".into()
            }
        );
    }

    #[test]
    fn ids_and_component_names() {
        assert_eq!(writer_id("qemu-", "web 1/ä"), "qemu-web_1__");
        assert_eq!(writer_id("qemu-", &"x".repeat(80)).len(), 64);
        let disk = Disk {
            device: "/machine/peripheral/vd1/virtio-backend".into(),
            file: "/a".into(),
            real: None,
            depth: 2,
            read_only: true,
            place: Place::Elsewhere,
        };
        assert_eq!(disk.component(), "disk:vd1:backing2");
    }
}
