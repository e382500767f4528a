//! The quiesce writer plugin for QEMU virtual machines (plugin name `qemu`). Configuration,
//! what it needs from QEMU and how to check it: `README.md`.
//!
//! One writer per running guest whose disk images lie on a configured volume, found in a
//! directory of sockets (`<vm>.agent.sock`, the host side of the guest agent's virtio-serial
//! channel, and `<vm>.qmp.sock`, QEMU's monitor) and, with `libvirt_uri`, among libvirt's
//! running domains (through `virsh`: libvirtd holds their agent channel and monitor itself):
//!
//! - **prepare** thaws what an earlier set left frozen (if anything), asks QMP for the VM's
//!   disks (a VM that stopped fails here, named), and checks that the guest agent answers and
//!   that the guest is not frozen already — nothing freezes yet;
//! - **freeze** sends `guest-fsfreeze-freeze`: the guest's kernel freezes every file system the
//!   agent can freeze (`FIFREEZE`: dirty data and the journal written out, writes held); the
//!   number frozen is reported (`filesystems_frozen`);
//! - **thaw** and **abort** send `guest-fsfreeze-thaw` and confirm `guest-fsfreeze-status` =
//!   `thawed`; both are idempotent and do nothing when this writer froze nothing. A thaw that
//!   does not reach the guest (the agent died or hangs) fails the call, naming the VM, and the
//!   writer keeps thawing in the background until the agent confirms — a dead agent leaves the
//!   guest frozen, and nothing else would thaw it.
//!
//! Every exchange with an agent's socket starts with `0xFF` and `guest-sync-delimited` (libvirt
//! does the same on its own connection), so a thaw after a call that timed out (the host's
//! watchdog at the hold limit, an abort) is not confused by the stale answer of that call.
//! Every wait is bounded by the call's deadline.
//!
//! The host takes a plugin's writers once, when it loads the plugin: a guest that starts later
//! gets no writer until the host restarts. So that such a guest is not silently left
//! crash-consistent, one more writer per volume (`<prefix>new-guests.<volume>`) fails the
//! volume's sets while a guest with disks on it runs without a writer (`new_guests = "fail"`,
//! the default).
//!
//! The level is `system` by default: a guest freeze holds every writer of the whole machine,
//! so it comes last and is thawed first, keeping the guest frozen for the shortest time.

mod agent;
mod config;
mod guest;
mod qmp;
mod socket;
mod virsh;
mod writer;

pub use agent::{Agent, AgentError};
pub use config::{NewGuests, Settings, Volume};
pub use writer::{GuestWriter, NewGuestsWriter};

use guest::VolumeRoot;
use quiesce_sdk::{log, Config, Error, Writer};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// Makes a writer for each running guest with disks on a configured volume, and one
/// new-guests writer per volume.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    let settings = Arc::new(config::parse(config)?);
    let volumes = Arc::new(
        settings
            .volumes
            .iter()
            .map(VolumeRoot::resolve)
            .collect::<Result<Vec<_>, _>>()?,
    );
    let mut writers: Vec<Box<dyn Writer>> = Vec::new();
    let mut ids = BTreeSet::new();
    let mut covered = BTreeSet::new();
    let sources = match guest::discover(&settings, Instant::now() + settings.query_timeout()) {
        Ok(sources) => sources,
        // libvirtd down at the host's start: its guests get no writer, and the new-guests
        // writers fail every set until the host restarts with libvirtd up.
        Err(e) => {
            log::error!("{}", e.message());
            guest::scan(&settings.socket_dir)?
                .into_iter()
                .map(guest::Source::Sockets)
                .collect()
        }
    };
    for source in sources {
        let deadline = Instant::now() + settings.query_timeout();
        let info = match source.query(&volumes, deadline) {
            Ok(info) => info,
            Err(e) if e.is_gone() => {
                log::info!("{}: not running ({e}); skipped", source.describe());
                continue;
            }
            Err(e) => {
                log::error!(
                    "VM of {}: cannot read its disks ({e}); it gets no writer, and sets of every \
                     volume fail while it runs",
                    source.describe()
                );
                continue;
            }
        };
        if info.on_volumes().next().is_none() {
            log::info!(
                "VM {}: no disk on a configured volume ({}); no writer",
                info.name,
                info.disks
                    .iter()
                    .map(|d| d.describe())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            continue;
        }
        let writer = GuestWriter::new(source, info, volumes.clone(), settings.clone());
        if !ids.insert(writer.id().to_string()) {
            log::error!(
                "VM of {}: writer id {} is taken by another VM of the same name; give each VM a \
                 name of its own (it gets no writer until then)",
                writer.source().describe(),
                writer.id()
            );
            continue;
        }
        log::info!(
            "{}: writer made ({})",
            writer.id(),
            writer.source().describe()
        );
        covered.insert(writer.source().key());
        writers.push(Box::new(writer));
    }
    if settings.new_guests == NewGuests::Fail {
        for volume in volumes.iter() {
            writers.push(Box::new(NewGuestsWriter::new(
                volume.clone(),
                volumes.clone(),
                settings.clone(),
                covered.clone(),
            )));
        }
    }
    Ok(writers)
}

quiesce_sdk::export_plugin!(name: "qemu", init: init);
