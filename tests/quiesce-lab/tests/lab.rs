//! The short version of the proof, run by `cargo test` (and so by `./scripts/test` and CI): the
//! whole lab, one cycle per fault — each of the eight faults injected once in the middle of a set
//! at a random phase, each followed by a restic backup through `examples/restic-backup.sh` that
//! must be app-consistent and restore with every acknowledged write — on CephFS, each node
//! writing through its own ceph-fuse mount. Needs root and the packages
//! of `scripts/setup`. The seed (nodes and phases) is printed; `QUIESCE_LAB_SEED` repeats a run.

use quiesce_lab::{soak, Fault, Settings, VolumeKind};
use std::path::PathBuf;

#[test]
fn every_fault_once_mid_set_then_a_backup_restored_with_every_acknowledged_write() {
    let seed = std::env::var("QUIESCE_LAB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| quiesce_lab::acks::unix_ns() % 1_000_000);
    let mut settings = Settings::new(PathBuf::from(env!("CARGO_BIN_EXE_quiesce-lab")));
    // On CephFS, as a real cluster's shared volume: each node its own ceph-fuse client and
    // cache, flushed by its own host. QUIESCE_LAB_VOLUME=btrfs runs it on one btrfs instead.
    settings.volume = match std::env::var("QUIESCE_LAB_VOLUME") {
        Ok(volume) if !volume.is_empty() => volume.parse().expect("QUIESCE_LAB_VOLUME"),
        _ => VolumeKind::Cephfs,
    };
    eprintln!("quiesce-lab: the volume is {}", settings.volume);
    let summary = soak(
        settings,
        Fault::ALL.len(),
        seed,
        |line| eprintln!("{line}"),
        || false,
    );
    eprintln!("{summary}");
    assert!(summary.is_clean(), "the lab found problems:\n{summary}");
    let faults = Fault::ALL.len() as u64;
    assert_eq!(summary.faults_total(), faults);
    assert_eq!(summary.faults.len(), Fault::ALL.len(), "every fault once");
    assert_eq!(summary.restores, faults);
    assert_eq!(summary.outcomes.get("app-consistent"), Some(&faults));
    let outcome = |o: &str| summary.outcomes.get(o).copied().unwrap_or(0);
    // A stall may leave a set app-consistent, and then its snapshot was verified.
    let after_stall = outcome("app-consistent (after a stall, verified)");
    assert_eq!(after_stall, summary.copies_verified);
    assert_eq!(
        outcome("failed (fault injected)") + after_stall,
        faults,
        "{summary}"
    );
    for app in [
        "postgres",
        "sqlite wal.db",
        "sqlite journal.db",
        "buffering-app",
        "app-writer",
        "mmap-app",
    ] {
        assert!(
            summary.records_verified.get(app).is_some_and(|n| *n > 0),
            "{app}: no acknowledged record verified in any restore:\n{summary}"
        );
    }
}
