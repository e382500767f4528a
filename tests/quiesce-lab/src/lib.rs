//! The proof of quiesce: a three-node cluster on one machine, under load, every snapshot
//! restored and verified, faults injected in the middle of sets.
//!
//! - [`lab`]: the cluster — three network namespaces on a bridge, a host with its own
//!   dbus-daemon on each, the broker in node1's namespace, one shared volume (a CephFS
//!   directory each node mounts with its own `ceph-fuse`, or one btrfs on a loop device);
//!   PostgreSQL on node1, SQLite applications and an mmap application on node2, the buffering
//!   app and an app writer on node3, all writing continuously and logging every acknowledged
//!   write with its time;
//! - [`net`]: the bridge and the namespaces, links that can be cut;
//! - [`load`]: the lab's own PostgreSQL and SQLite applications;
//! - [`acks`]: the applications' ack logs, which measure freezes and losses;
//! - [`verify`]: restores from restic, PostgreSQL started on the copy and `pg_amcheck`, SQLite
//!   `integrity_check`, the record files (appended, or mapped);
//! - [`soak`]: the cycles (a fault set, then a verified backup through `examples/restic-backup.sh`)
//!   and the summary.
//!
//! `quiesce-lab soak [--cycles N] [--seed S]` runs it (README: "The lab"); the integration test
//! runs every fault once. Everything needs root, btrfs, network namespaces, PostgreSQL, restic,
//! jq and dbus-daemon, and fails loudly, naming the package, when one is missing.

pub mod acks;
pub mod lab;
pub mod load;
pub mod net;
pub mod soak;
pub mod verify;

pub use lab::{Lab, Settings, VolumeKind};
pub use soak::{soak, Fault, Summary};
