//! The providers on a real btrfs file system on a loop device, and on a real Ceph cluster with
//! `ceph-fuse` mounts (root needed: the tests fail loudly, saying so, when not root). One test
//! binary for the crate.

mod btrfs;
mod cephfs;
mod command;
mod fsfreeze;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes an executable shell script.
pub fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}
