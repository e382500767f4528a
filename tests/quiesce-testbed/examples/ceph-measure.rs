//! Measures the test bed's Ceph cluster: bring-up time, a namespace's ceph-fuse mount,
//! `mkdir .snap/NAME` and `rmdir` latencies, and memory, for memstore and BlueStore.
//!
//! ```sh
//! cargo run -p quiesce-testbed --example ceph-measure [ROUNDS]    # as root; default 2 rounds
//! ```

use quiesce_testbed::ceph::{CephOptions, ObjectStore};
use quiesce_testbed::{CephCluster, Netns};
use std::time::{Duration, Instant};

fn spread(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "min {:.1?} median {:.1?} max {:.1?}",
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    )
}

fn rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        / 1024
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse().expect("ROUNDS is a number"))
        .unwrap_or(2);
    for _ in 0..rounds {
        for store in [ObjectStore::Memstore, ObjectStore::Bluestore] {
            let cluster = CephCluster::start_with(CephOptions {
                store,
                ..CephOptions::default()
            });
            let node = Netns::create();
            let client = cluster.client_key("measure", "rws");
            let started = Instant::now();
            let mount = cluster.mount(Some(&node), &client, &cluster.mountpoint("measure"));
            let mount_time = started.elapsed();
            let dir = mount.mountpoint.join("measure");
            std::fs::create_dir(&dir).unwrap();
            let data = vec![7u8; 1 << 20];
            for i in 0..64 {
                std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
            }
            let (mut mkdir, mut rmdir) = (Vec::new(), Vec::new());
            for i in 0..20 {
                std::fs::write(dir.join("f0"), format!("{i}")).unwrap();
                let snapshot = dir.join(format!(".snap/s{i}"));
                let started = Instant::now();
                std::fs::create_dir(&snapshot).unwrap();
                mkdir.push(started.elapsed());
                let started = Instant::now();
                std::fs::remove_dir(&snapshot).unwrap();
                rmdir.push(started.elapsed());
            }
            let mut memory: Vec<(String, u64)> = cluster
                .daemon_pids()
                .into_iter()
                .map(|(name, pid)| (name, rss_mb(pid)))
                .collect();
            memory.push(("ceph-fuse".into(), rss_mb(mount.pid())));
            let total: u64 = memory.iter().map(|(_, mb)| mb).sum();
            println!(
                "{store:?}: bring-up {:.1?}; ceph-fuse mount from a namespace {mount_time:.1?}; \
                 mkdir .snap {}; rmdir {}; after 64 MB written: {total} MB resident ({})",
                cluster.bring_up_time(),
                spread(mkdir),
                spread(rmdir),
                memory
                    .iter()
                    .map(|(name, mb)| format!("{name} {mb} MB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}
