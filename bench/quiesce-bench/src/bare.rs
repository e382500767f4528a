//! Item 1, the physical limit: a bare `btrfs subvolume snapshot` of the volume, nothing frozen.

use crate::stats::Sample;
use quiesce_provider::{Btrfs, Provider};
use quiesce_testbed::{run, BtrfsVolume};
use std::process::Command;
use std::time::{Duration, Instant};

/// Fills the data subvolume with `files` small files, as a volume in use would hold.
pub fn populate(volume: &BtrfsVolume, files: usize) {
    let dir = volume.data.join("filler");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..files {
        std::fs::write(dir.join(format!("f{i}")), vec![b'x'; 4096]).unwrap();
    }
    run(&mut Command::new("sync"));
}

/// Times `runs` snapshots of the idle data subvolume.
pub fn snapshots(volume: &BtrfsVolume, runs: usize) -> Sample {
    let times: Vec<Duration> = (0..runs)
        .map(|i| one_command(volume, &format!("idle-{i}")))
        .collect();
    Sample::of(&times)
}

/// One `btrfs subvolume snapshot` of the data subvolume, timed; deleted after, untimed.
pub fn one_command(volume: &BtrfsVolume, name: &str) -> Duration {
    let target = volume.snapshots.join(name);
    let started = Instant::now();
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot"])
        .arg(&volume.data)
        .arg(&target));
    let took = started.elapsed();
    run(Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(&target));
    took
}

/// One snapshot the way the btrfs provider takes it (the ioctl), timed; deleted after, untimed.
pub fn one_ioctl(provider: &Btrfs, name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let snapshot = provider.take(name)?;
    let took = started.elapsed();
    provider.delete(&snapshot)?;
    Ok(took)
}
