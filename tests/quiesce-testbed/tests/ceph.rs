//! The test bed's Ceph cluster: mounts from network namespaces, snapshots and the capability
//! they need, two clusters at once, and a teardown that leaves nothing behind. Root and the
//! Ceph packages needed (`scripts/setup` installs them).

use quiesce_testbed::{CephCluster, Netns};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn two_clusters_run_at_once_and_leave_nothing_behind() {
    // Started concurrently, as by two test binaries (or two tests of one).
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(CephCluster::start);
        let two = s.spawn(CephCluster::start);
        (one.join().unwrap(), two.join().unwrap())
    });
    for cluster in [&one, &two] {
        eprintln!(
            "cluster {} ({:?}) up in {:?}; memory (KiB): {:?}",
            cluster.addr(),
            cluster.store(),
            cluster.bring_up_time(),
            cluster.memory_kib()
        );
        assert_eq!(cluster.ceph(&["health"]).trim(), "HEALTH_OK");
    }
    assert_ne!(one.addr(), two.addr());
    assert_ne!(one.fsid(), two.fsid());

    let client_one = one.client_key("teardown", "rws");
    let client_two = two.client_key("teardown", "rws");
    let mount_one = one.mount(None, &client_one, &one.mountpoint("one"));
    let mount_two = two.mount(None, &client_two, &two.mountpoint("two"));
    std::fs::write(mount_one.mountpoint.join("only-in-one"), "1").unwrap();
    assert!(mount_one.mountpoint.join("only-in-one").exists());
    assert!(
        !mount_two.mountpoint.join("only-in-one").exists(),
        "each cluster has its own file system"
    );

    let mut pids: Vec<u32> = one
        .daemon_pids()
        .into_iter()
        .chain(two.daemon_pids())
        .map(|(_, pid)| pid)
        .collect();
    pids.extend([mount_one.pid(), mount_two.pid()]);
    assert_eq!(pids.len(), 10, "4 daemons per cluster and 2 ceph-fuse");
    let mountpoints = [mount_one.mountpoint.clone(), mount_two.mountpoint.clone()];
    let interfaces = [one.interface().to_string(), two.interface().to_string()];
    let dirs = [one.dir().to_path_buf(), two.dir().to_path_buf()];

    // A mount holds its cluster: dropping the cluster first stops nothing yet.
    drop(one);
    assert!(mount_one.mountpoint.join("only-in-one").exists());
    let started = Instant::now();
    drop((mount_one, mount_two, two));
    eprintln!(
        "teardown of two mounts and two clusters: {:?}",
        started.elapsed()
    );

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for mountpoint in &mountpoints {
        assert!(
            !mountinfo.contains(&format!(" {} ", mountpoint.display())),
            "{} is still mounted:\n{mountinfo}",
            mountpoint.display()
        );
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
    for interface in &interfaces {
        let status = Command::new("ip")
            .args(["link", "show", interface])
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "interface {interface} is still there");
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} is still there", dir.display());
    }
}

#[test]
fn mounts_from_two_namespaces_are_two_clients_of_one_file_system() {
    let cluster = CephCluster::shared();
    let (node_a, node_b) = (Netns::create(), Netns::create());
    let (client_a, client_b) = (
        cluster.client_key("ns-a", "rws"),
        cluster.client_key("ns-b", "rws"),
    );
    let started = Instant::now();
    let mount_a = cluster.mount(Some(&node_a), &client_a, &cluster.mountpoint("ns-a"));
    eprintln!("ceph-fuse mount from a namespace: {:?}", started.elapsed());
    let mount_b = cluster.mount(Some(&node_b), &client_b, &cluster.mountpoint("ns-b"));

    // Each client's traffic comes from its node's address; the mount is visible here.
    let sessions = cluster.mds_sessions();
    for (client, node) in [(&client_a, &node_a), (&client_b, &node_b)] {
        let session = sessions
            .iter()
            .find(|s| s["client_metadata"]["entity_id"] == client.name.as_str())
            .unwrap_or_else(|| panic!("no MDS session of client.{}: {sessions:?}", client.name));
        let inst = session["inst"].as_str().unwrap();
        assert!(
            inst.contains(&format!("{}:0/", node.inside_ip)),
            "client.{} should come from {} ({}): {inst}",
            client.name,
            node.inside_ip,
            node.name
        );
    }
    let dir = mount_a.mountpoint.join("two-namespaces");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("from-a"), "written on node a").unwrap();
    assert_eq!(
        std::fs::read_to_string(mount_b.mountpoint.join("two-namespaces/from-a")).unwrap(),
        "written on node a"
    );
}

#[test]
fn snapshots_are_read_only_and_need_the_s_capability() {
    let cluster = CephCluster::shared();
    let with_s = cluster.client_key("snap-rws", "rws");
    let without_s = cluster.client_key("snap-rw", "rw");
    let mount = cluster.mount(None, &with_s, &cluster.mountpoint("snap-rws"));
    let plain = cluster.mount(None, &without_s, &cluster.mountpoint("snap-rw"));

    let dir = mount.mountpoint.join("snapshots-test");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("table"), "before").unwrap();
    let started = Instant::now();
    std::fs::create_dir(dir.join(".snap/s1")).unwrap();
    eprintln!("mkdir .snap/s1: {:?}", started.elapsed());
    std::fs::write(dir.join("table"), "after").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join(".snap/s1/table")).unwrap(),
        "before"
    );
    let err = std::fs::write(dir.join(".snap/s1/label"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::libc::EROFS),
        "a CephFS snapshot is read-only from the start: {err}"
    );

    // Without `s`, the client may write but not snapshot.
    let plain_dir = plain.mountpoint.join("snapshots-test");
    std::fs::write(plain_dir.join("by-rw"), "x").unwrap();
    let err = std::fs::create_dir(plain_dir.join(".snap/s2")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(!dir.join(".snap/s2").exists());

    std::fs::remove_dir(dir.join(".snap/s1")).unwrap();
    assert!(!dir.join(".snap/s1").exists());
}
