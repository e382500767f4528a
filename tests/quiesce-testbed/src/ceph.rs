//! A real Ceph cluster on this machine, started by hand without systemd: one mon, one mgr, one
//! OSD, one MDS and a CephFS (`cephfs`) with snapshots allowed; client keys; `ceph-fuse` mounts,
//! from the test's own network namespace or from a node's.
//!
//! # Network
//!
//! Each cluster gets an address of its own, `10.251.X.Y/32`, on an interface of its own (a
//! bridge without ports: this kernel has no `dummy` module; a port-less bridge's address is
//! local all the same). Every daemon binds to that address only (`public_network` is the /32),
//! so clusters of concurrent test processes never share a port, and the host reaches them
//! directly. A network namespace reaches the cluster through a host route to that address via
//! its gateway on the host: [`CephCluster::mount`] adds it for a [`Netns`] (via its
//! `outside_ip`), and [`CephCluster::route_from`] for any other namespace — for the lab's nodes
//! on a bridge, `route_from(&node.netns, &network.lab_ip)`. Cutting a namespace's link cuts its
//! client off the cluster, as for any other traffic of that node.
//!
//! # Lifetime
//!
//! A [`CephCluster`] is a handle: clones and every [`CephMount`] share the daemons, which stop
//! (SIGKILL, then reaped) when the last handle goes, after which the interface and the cluster's
//! directory are removed. A mount unmounts when dropped, before the cluster can stop. Daemons and
//! `ceph-fuse` processes also die with the test process (`PR_SET_PDEATHSIG`), so a test binary
//! that is killed (SIGKILL) leaves no process running; it does leave its interface (`qzcPIDxN`),
//! its directory (`/tmp/quiesce-ceph-*`) and dead FUSE mounts in it (`umount -l`) behind.
//! [`CephCluster::shared`] gives the tests of one process one cluster while any of them holds
//! it: a bring-up costs 11–15 s alone (about 20 s with three at once) and 550–650 MB.
//!
//! Every wait is on a real condition: the mon's `mon_status` is `leader`, the OSD's `status` is
//! `active`, the MDS's is `up:active`, `ceph health` says `HEALTH_OK`; a mount is in mountinfo as
//! `fuse.ceph-fuse` and answers `statfs` as FUSE.

use crate::{poll_until, require, require_root, run, Child, Netns};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The file system every cluster creates.
pub const FS_NAME: &str = "cephfs";

/// How long a bring-up step may take on a loaded 2-core machine before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the OSD keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectStore {
    /// In the OSD's memory: the fastest bring-up, lost when the cluster stops (which a test
    /// cluster does anyway). The OSD's memory grows with the data written.
    Memstore,
    /// BlueStore on a sparse file in the cluster's directory: a slower `mkfs`, a bounded cache.
    Bluestore,
}

/// What [`CephCluster::start_with`] builds.
#[derive(Clone, Debug)]
pub struct CephOptions {
    pub store: ObjectStore,
    /// The OSD's capacity: memstore's limit, or the size of BlueStore's sparse file.
    pub size_mb: u64,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            store: ObjectStore::Memstore,
            size_mb: 4096,
        }
    }
}

/// A running cluster; see [the module documentation](self).
#[derive(Clone)]
pub struct CephCluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// The cluster's own address, where every daemon listens.
    addr: String,
    interface: String,
    conf: PathBuf,
    fsid: String,
    store: ObjectStore,
    bring_up: Duration,
    /// In start order (mon, mgr, mds, osd); stopped in reverse.
    daemons: Mutex<Vec<(String, Child)>>,
    mounts: AtomicU32,
    dir: tempfile::TempDir,
}

/// A client's name and keyring, made by [`CephCluster::client_key`].
#[derive(Clone, Debug)]
pub struct CephClient {
    /// Without the `client.` prefix, as `ceph-fuse --id` takes it.
    pub name: String,
    pub keyring: PathBuf,
    /// The MDS capability it was authorized with: `rw`, `rws`.
    pub caps: String,
}

/// A `ceph-fuse` mount, unmounted when dropped.
pub struct CephMount {
    pub mountpoint: PathBuf,
    pub client: CephClient,
    /// The network namespace its traffic comes from (`None`: the test's own).
    pub netns: Option<String>,
    /// The client's admin socket (`perf dump`, `status`).
    pub admin_socket: PathBuf,
    /// The mount's FUSE connection, `/sys/fs/fuse/connections/N`.
    pub fuse_connection: PathBuf,
    fuse: Child,
    cluster: CephCluster,
}

/// What a client's object cacher holds, from its `perf dump`: bytes written into it by the
/// kernel (the FUSE requests) and bytes it flushed to the OSDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheCounters {
    pub written: u64,
    pub flushed: u64,
}

impl CacheCounters {
    /// Bytes in the client's cache that have not reached the OSDs yet.
    pub fn dirty(&self) -> u64 {
        self.written.saturating_sub(self.flushed)
    }
}

impl CephCluster {
    /// A memstore cluster of 4 GB; see [`CephCluster::start_with`].
    pub fn start() -> CephCluster {
        CephCluster::start_with(CephOptions::default())
    }

    /// One cluster for the tests of this process: the running one if another test holds it,
    /// else a new one. Client names are shared with those tests: pick names of your own.
    pub fn shared() -> CephCluster {
        static SHARED: Mutex<Weak<Inner>> = Mutex::new(Weak::new());
        // Held during a bring-up: a second test waits for the same cluster.
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(inner) = shared.upgrade() {
            return CephCluster { inner };
        }
        let cluster = CephCluster::start();
        *shared = Arc::downgrade(&cluster.inner);
        cluster
    }

    /// Brings up a cluster: mon `a`, mgr `x`, OSD 0, MDS `a`, the file system [`FS_NAME`] with
    /// snapshots allowed; returns once `ceph health` is `HEALTH_OK`.
    pub fn start_with(options: CephOptions) -> CephCluster {
        require_root();
        for (tool, package) in [
            ("ceph-mon", "ceph-mon"),
            ("ceph-mgr", "ceph-mgr"),
            ("ceph-osd", "ceph-osd"),
            ("ceph-mds", "ceph-mds"),
            ("ceph-fuse", "ceph-fuse"),
            ("ceph", "ceph-common"),
            ("ceph-authtool", "ceph-common"),
            ("monmaptool", "ceph-base"),
            ("nsenter", "util-linux"),
            ("ip", "iproute2"),
        ] {
            require(tool, package);
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("quiesce-ceph-")
            .tempdir()
            .unwrap();
        let (interface, addr) = own_address();
        let fsid = uuid();
        let mut inner = Inner {
            addr,
            interface,
            conf: dir.path().join("ceph.conf"),
            fsid,
            store: options.store,
            bring_up: Duration::ZERO,
            daemons: Mutex::new(Vec::new()),
            mounts: AtomicU32::new(0),
            dir,
        };
        // From here on, a panic drops `inner`: daemons, interface and directory go with it.
        inner.bring_up(&options);
        inner.bring_up = started.elapsed();
        CephCluster {
            inner: Arc::new(inner),
        }
    }

    /// The address every daemon listens on (the mon at ports 3300 and 6789).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The cluster's `ceph.conf`: `ceph -c CONF …` runs as `client.admin`.
    pub fn conf(&self) -> &Path {
        &self.inner.conf
    }

    pub fn fsid(&self) -> &str {
        &self.inner.fsid
    }

    /// The interface that holds [`CephCluster::addr`].
    pub fn interface(&self) -> &str {
        &self.inner.interface
    }

    /// The MDS's client sessions (its admin socket's `session ls`): one object per client,
    /// with `inst` (`client.ID ADDR:0/NONCE`) and `client_metadata.entity_id` (the client's
    /// name).
    pub fn mds_sessions(&self) -> Vec<serde_json::Value> {
        let socket = self.dir().join("run/mds.a.asok");
        match admin_socket(&socket, "session ls") {
            Ok(serde_json::Value::Array(sessions)) => sessions,
            other => panic!("session ls on {}: {other:?}", socket.display()),
        }
    }

    pub fn store(&self) -> ObjectStore {
        self.inner.store
    }

    /// The cluster's directory: configuration, keyrings, daemons' data, logs (`log/`), admin
    /// sockets (`run/`).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// How long [`CephCluster::start_with`] took, until `HEALTH_OK`.
    pub fn bring_up_time(&self) -> Duration {
        self.inner.bring_up
    }

    /// Each daemon's resident memory now (VmRSS, KiB), by name (`mon.a`, `mgr.x`, ...).
    pub fn memory_kib(&self) -> Vec<(String, u64)> {
        let daemons = self.inner.daemons.lock().unwrap();
        daemons
            .iter()
            .map(|(name, child)| (name.clone(), rss_kib(child.pid())))
            .collect()
    }

    /// The pids of the daemons, by name.
    pub fn daemon_pids(&self) -> Vec<(String, u32)> {
        let daemons = self.inner.daemons.lock().unwrap();
        daemons.iter().map(|(n, c)| (n.clone(), c.pid())).collect()
    }

    /// Runs `ceph ARGS…` as `client.admin`, failing with its output when it fails.
    pub fn ceph(&self, args: &[&str]) -> String {
        self.inner.ceph(args)
    }

    /// A client key for the file system's root: `ceph fs authorize cephfs client.NAME / CAPS`.
    /// `rws` may take snapshots; `rw` may not (`mkdir .snap/x` is Permission denied).
    pub fn client_key(&self, name: &str, caps: &str) -> CephClient {
        let keyring_text = self.ceph(&[
            "fs",
            "authorize",
            FS_NAME,
            &format!("client.{name}"),
            "/",
            caps,
        ]);
        let keyring = self.dir().join(format!("client.{name}.keyring"));
        std::fs::write(&keyring, keyring_text).unwrap();
        CephClient {
            name: name.to_string(),
            keyring,
            caps: caps.to_string(),
        }
    }

    /// Makes the cluster reachable from network namespace `netns` through `gateway`, an
    /// address of the test's namespace that `netns` reaches directly (its veth peer, or the
    /// bridge it hangs on). Idempotent.
    pub fn route_from(&self, netns: &str, gateway: &str) {
        run(Command::new("ip").args([
            "-n",
            netns,
            "route",
            "replace",
            &format!("{}/32", self.addr()),
            "via",
            gateway,
        ]));
    }

    /// A mount point for a mount of this cluster, `DIR/mnt/NAME`: removed with the cluster,
    /// after every mount is gone.
    ///
    /// Prefer it to a directory of a test's own `TempDir`: a `TempDir` dropped while the mount is
    /// still there (a `let` declared before the mount is dropped after it, but a tuple or struct
    /// the other way round) empties the file system with `remove_dir_all` — every other test's
    /// files on the shared cluster with it.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.dir().join("mnt").join(name)
    }

    /// Mounts the file system's root at `mountpoint` (created if missing) with `ceph-fuse` as
    /// `client`; from `netns`, whose route to the cluster this adds, or from the test's own
    /// namespace. See [`CephCluster::mountpoint`] for where.
    pub fn mount(
        &self,
        netns: Option<&Netns>,
        client: &CephClient,
        mountpoint: &Path,
    ) -> CephMount {
        if let Some(netns) = netns {
            self.route_from(&netns.name, &netns.outside_ip);
        }
        self.mount_in(netns.map(|n| n.name.as_str()), client, mountpoint)
    }

    /// [`CephCluster::mount`] from any named namespace (one that reaches [`CephCluster::addr`]:
    /// see [`CephCluster::route_from`]). `ceph-fuse` runs in the foreground as a child of the
    /// test, entered into the namespace with `nsenter --net`, so that its mount stays visible
    /// to the test (`ip netns exec` would make it in a mount namespace of its own) while its
    /// traffic comes from the node.
    pub fn mount_in(
        &self,
        netns: Option<&str>,
        client: &CephClient,
        mountpoint: &Path,
    ) -> CephMount {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mountpoint = mountpoint.canonicalize().unwrap();
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg("ceph-fuse");
                c
            }
            None => Command::new("ceph-fuse"),
        };
        command
            .arg("-f")
            .arg("-c")
            .arg(self.conf())
            .args(["--id", &client.name])
            .arg("-k")
            .arg(&client.keyring)
            .arg(&mountpoint);
        let n = self.inner.mounts.fetch_add(1, Ordering::Relaxed);
        let log = self
            .dir()
            .join("log")
            .join(format!("ceph-fuse.{}.{n}.stderr", client.name));
        let mut fuse = spawn_tied(command, log);
        let what = format!(
            "ceph-fuse mounting {} as client.{}{}",
            mountpoint.display(),
            client.name,
            netns.map(|n| format!(" from {n}")).unwrap_or_default()
        );
        let admin_socket =
            self.dir()
                .join("run")
                .join(format!("client.{}.{}.asok", client.name, fuse.pid()));
        let mounted = poll_until(STEP_TIMEOUT, || {
            if let Ok(Some(status)) = fuse.child.try_wait() {
                panic!("{what}: ceph-fuse exited ({status}):\n{}", fuse.log());
            }
            (is_ceph_fuse_mount(&mountpoint)
                && answers_as_fuse(&mountpoint)
                && admin_socket.exists())
            .then_some(())
        });
        if mounted.is_none() {
            panic!("{what}: not within {STEP_TIMEOUT:?}\n{}", fuse.log());
        }
        ensure_fusectl();
        let fuse_connection = Path::new(FUSECTL).join(
            fuse_connection(&mountpoint).unwrap_or_else(|| panic!("{what}: not in mountinfo")),
        );
        CephMount {
            mountpoint,
            client: client.clone(),
            netns: netns.map(str::to_string),
            admin_socket,
            fuse_connection,
            fuse,
            cluster: self.clone(),
        }
    }
}

impl CephMount {
    /// The `ceph-fuse` process.
    pub fn pid(&self) -> u32 {
        self.fuse.pid()
    }

    /// What `ceph-fuse` wrote to stderr so far.
    pub fn log(&self) -> String {
        self.fuse.log()
    }

    /// The cluster this mount belongs to.
    pub fn cluster(&self) -> &CephCluster {
        &self.cluster
    }

    /// The client's object-cacher counters now, from its admin socket.
    pub fn cache_counters(&self) -> CacheCounters {
        let dump = admin_socket(&self.admin_socket, "perf dump").unwrap_or_else(|e| {
            panic!(
                "perf dump of client.{} ({}): {e}",
                self.client.name,
                self.admin_socket.display()
            )
        });
        let cacher = &dump["objectcacher-libcephfs"];
        let counter = |name: &str| {
            cacher[name].as_u64().unwrap_or_else(|| {
                panic!(
                    "no {name} in client.{}'s perf dump: {dump}",
                    self.client.name
                )
            })
        };
        CacheCounters {
            written: counter("data_written"),
            flushed: counter("data_flushed"),
        }
    }
}

impl CephMount {
    /// Requests of this mount's FUSE connection not yet answered by `ceph-fuse` (its fusectl
    /// `waiting`): the kernel's writeback requests among them.
    pub fn fuse_waiting(&self) -> u64 {
        let path = self.fuse_connection.join("waiting");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for CephMount {
    fn drop(&mut self) {
        // A plain umount: the kernel writes back what it holds, ceph-fuse flushes its cache and
        // exits. Bounded: a hung one is aborted through the FUSE connection, then detached.
        let umount = Command::new("umount")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .spawn();
        let done = umount.ok().and_then(|mut child| {
            let done = poll_until(Duration::from_secs(60), || child.try_wait().ok().flatten());
            if done.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            done
        });
        if !done.is_some_and(|s| s.success()) && is_ceph_fuse_mount(&self.mountpoint) {
            let _ = std::fs::write(self.fuse_connection.join("abort"), "1");
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let exited = poll_until(Duration::from_secs(60), || {
            self.fuse.child.try_wait().ok().flatten()
        });
        if exited.is_none() {
            self.fuse.kill();
        }
    }
}

impl Inner {
    fn ceph(&self, args: &[&str]) -> String {
        run(Command::new("ceph")
            .arg("-c")
            .arg(&self.conf)
            .args(["--connect-timeout", "120"])
            .args(args))
    }

    fn try_ceph(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("ceph")
            .arg("-c")
            .arg(&self.conf)
            .args(["--connect-timeout", "120"])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bring_up(&mut self, options: &CephOptions) {
        let dir = self.dir.path().to_path_buf();
        for sub in [
            "mon.a", "mgr.x", "osd.0", "mds.a", "run", "log", "crash", "mnt",
        ] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        std::fs::write(&self.conf, self.config(options)).unwrap();

        // Every key exists before the mon does: the mon's initial keyring holds them all with
        // their capabilities, so no `ceph auth` round trip is needed for the daemons.
        let mon_keyring = self.path("mon.keyring");
        authtool(&mon_keyring, "mon.", &[("mon", "allow *")]);
        for (entity, keyring, caps) in [
            (
                "client.admin",
                "admin.keyring",
                &[
                    ("mon", "allow *"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                    ("mgr", "allow *"),
                ][..],
            ),
            (
                "mgr.x",
                "mgr.x/keyring",
                &[
                    ("mon", "allow profile mgr"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                ][..],
            ),
            (
                "osd.0",
                "osd.0/keyring",
                &[
                    ("mon", "allow profile osd"),
                    ("mgr", "allow profile osd"),
                    ("osd", "allow *"),
                ][..],
            ),
            (
                "mds.a",
                "mds.a/keyring",
                &[
                    ("mon", "allow profile mds"),
                    ("osd", "allow rwx"),
                    ("mds", "allow"),
                    ("mgr", "allow profile mds"),
                ][..],
            ),
        ] {
            let keyring = self.path(keyring);
            authtool(&keyring, entity, caps);
            run(Command::new("ceph-authtool")
                .arg(&mon_keyring)
                .arg("--import-keyring")
                .arg(&keyring));
        }
        let monmap = self.path("monmap");
        run(Command::new("monmaptool")
            .args([
                "--create",
                "--fsid",
                &self.fsid,
                "--addv",
                "a",
                &self.mon_addrs(),
            ])
            .arg(&monmap));
        run(Command::new("ceph-mon")
            .arg("-c")
            .arg(&self.conf)
            .args(["--mkfs", "-i", "a", "--monmap"])
            .arg(&monmap)
            .arg("--keyring")
            .arg(&mon_keyring));

        self.spawn("mon.a", "ceph-mon", "a");
        self.wait("the mon to lead its quorum", || {
            let status = admin_socket(&self.path("run/mon.a.asok"), "mon_status").ok()?;
            (status["state"] == "leader").then_some(())
        });
        // The mgr and the MDS wait for the file system on their own; the OSD's mkfs needs the
        // mon (it fetches the cluster's configuration) and runs meanwhile.
        self.spawn("mgr.x", "ceph-mgr", "x");
        self.spawn("mds.a", "ceph-mds", "a");
        let osd_uuid = uuid();
        let mkfs = {
            let mut command = Command::new("ceph-osd");
            command
                .arg("-c")
                .arg(&self.conf)
                .args(["-i", "0", "--mkfs", "--osd-uuid", &osd_uuid]);
            std::thread::spawn(move || run(&mut command))
        };
        // One `ceph` process for all of them (each start of the CLI costs ~0.5 s): commands on
        // stdin, run in order. Pools of 8 PGs (one OSD); no standby MDS wanted, so that a
        // healthy cluster says HEALTH_OK.
        let script = format!(
            "osd new {osd_uuid}\n\
             osd pool create cephfs.{FS_NAME}.meta 8\n\
             osd pool create cephfs.{FS_NAME}.data 8\n\
             fs new {FS_NAME} cephfs.{FS_NAME}.meta cephfs.{FS_NAME}.data\n\
             fs set {FS_NAME} allow_new_snaps true\n\
             fs set {FS_NAME} standby_count_wanted 0\n"
        );
        let output = ceph_script(&self.conf, &script);
        assert!(
            !output.contains("Error"),
            "creating the OSD and the file system failed:\n{script}\n{output}"
        );
        mkfs.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        self.spawn("osd.0", "ceph-osd", "0");

        self.wait("the OSD to be active", || {
            let status = admin_socket(&self.path("run/osd.0.asok"), "status").ok()?;
            (status["state"] == "active").then_some(())
        });
        self.wait("the MDS to be up:active", || {
            let status = admin_socket(&self.path("run/mds.a.asok"), "status").ok()?;
            (status["state"] == "up:active").then_some(())
        });
        self.wait("ceph health to be HEALTH_OK", || {
            let health = self.try_ceph(&["health"])?;
            health.starts_with("HEALTH_OK").then_some(())
        });
    }

    fn mon_addrs(&self) -> String {
        format!("[v2:{0}:3300,v1:{0}:6789]", self.addr)
    }

    fn config(&self, options: &CephOptions) -> String {
        let dir = self.dir.path().display();
        let bytes = options.size_mb << 20;
        let store = match options.store {
            ObjectStore::Memstore => {
                format!("osd_objectstore = memstore\nmemstore_device_bytes = {bytes}\n")
            }
            ObjectStore::Bluestore => format!(
                "osd_objectstore = bluestore\n\
                 bluestore_block_path = {dir}/osd.0.block\n\
                 bluestore_block_create = true\n\
                 bluestore_block_size = {bytes}\n\
                 bluestore_cache_autotune = false\n\
                 bluestore_cache_size = 134217728\n"
            ),
        };
        // Everything under the cluster's directory (admin sockets, logs, pid files, crash
        // reports): nothing in /var/lib/ceph, /var/run/ceph or /var/log/ceph. No `keyring` in
        // [global]: it would override each daemon's own. The mon's store is a few MB: it must
        // not stop (at 5 % free by default) or warn because the machine's disk is nearly full.
        format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon_host = {mon}\n\
             public_network = {addr}/32\n\
             auth_cluster_required = cephx\n\
             auth_service_required = cephx\n\
             auth_client_required = cephx\n\
             auth_allow_insecure_global_id_reclaim = false\n\
             osd_pool_default_size = 1\n\
             osd_pool_default_min_size = 1\n\
             osd_pool_default_pg_autoscale_mode = off\n\
             mon_allow_pool_size_one = true\n\
             mon_warn_on_pool_no_redundancy = false\n\
             osd_crush_chooseleaf_type = 0\n\
             mon_data_avail_warn = 1\n\
             mon_data_avail_crit = 0\n\
             run_dir = {dir}/run\n\
             admin_socket = {dir}/run/$name.asok\n\
             pid_file = {dir}/run/$name.pid\n\
             log_file = {dir}/log/$name.log\n\
             mon_cluster_log_file = {dir}/log/cluster.log\n\
             crash_dir = {dir}/crash\n\
             {store}\
             [mon]\n\
             mon_data = {dir}/mon.$id\n\
             [mgr]\n\
             mgr_data = {dir}/mgr.$id\n\
             keyring = {dir}/mgr.$id/keyring\n\
             [osd]\n\
             osd_data = {dir}/osd.$id\n\
             keyring = {dir}/osd.$id/keyring\n\
             [mds]\n\
             mds_data = {dir}/mds.$id\n\
             keyring = {dir}/mds.$id/keyring\n\
             [client]\n\
             # Several clients of one name at once (the CLI, ceph-fuse): one socket each.\n\
             admin_socket = {dir}/run/$name.$pid.asok\n\
             log_file = {dir}/log/$name.$pid.log\n\
             [client.admin]\n\
             keyring = {dir}/admin.keyring\n",
            fsid = self.fsid,
            mon = self.mon_addrs(),
            addr = self.addr,
        )
    }

    /// Starts a daemon in the foreground (`-f`), as a child of the test.
    fn spawn(&self, name: &str, program: &str, id: &str) {
        let mut command = Command::new(program);
        command.args(["-f", "-c"]).arg(&self.conf).args(["-i", id]);
        let child = spawn_tied(command, self.path(&format!("log/{name}.stderr")));
        self.daemons.lock().unwrap().push((name.to_string(), child));
    }

    /// Waits for a bring-up condition, failing at once when a daemon exits, and with the
    /// daemons' logs after [`STEP_TIMEOUT`].
    fn wait(&self, what: &str, mut condition: impl FnMut() -> Option<()>) {
        let done = poll_until(STEP_TIMEOUT, || {
            let mut daemons = self.daemons.lock().unwrap();
            for (name, child) in daemons.iter_mut() {
                if let Ok(Some(status)) = child.child.try_wait() {
                    panic!(
                        "waiting for {what}: {name} exited ({status}):\n{}\n{}",
                        child.log(),
                        log_tail(&self.path(&format!("log/{name}.log")))
                    );
                }
            }
            drop(daemons);
            condition()
        });
        if done.is_none() {
            let logs: String = self
                .daemons
                .lock()
                .unwrap()
                .iter()
                .map(|(name, _)| {
                    format!(
                        "--- {name}\n{}\n",
                        log_tail(&self.path(&format!("log/{name}.log")))
                    )
                })
                .collect();
            panic!(
                "waiting for {what}: not within {STEP_TIMEOUT:?}\nceph status: {}\n{logs}",
                self.try_ceph(&["status"])
                    .unwrap_or_else(|| "(no answer)".into())
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No mount is left: each holds a handle. SIGKILL: the cluster is thrown away, and the
        // MDS takes seconds to stop on SIGTERM.
        let mut daemons = self.daemons.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, mut child)) = daemons.pop() {
            child.kill();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.interface])
            .status();
    }
}

/// An interface of this cluster's own with a free address `10.251.X.Y/32` on it.
fn own_address() -> (String, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    for _ in 0..250 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Other test processes use 10.100-249.x.x (Netns, the lab); 10.251/16 is the clusters'.
        let addr = format!(
            "10.251.{}.{}",
            (pid / 250 + n / 250) % 250,
            1 + (pid + n) % 250
        );
        let in_use =
            run(Command::new("ip").args(["-o", "addr", "show", "to", &format!("{addr}/32")]));
        if !in_use.trim().is_empty() {
            continue;
        }
        // Interface names are at most 15 bytes.
        let interface = format!("qzc{}x{n}", pid % 100_000);
        run(Command::new("ip").args(["link", "add", &interface, "type", "bridge"]));
        run(Command::new("ip").args(["addr", "add", &format!("{addr}/32"), "dev", &interface]));
        run(Command::new("ip").args(["link", "set", &interface, "up"]));
        return (interface, addr);
    }
    panic!("no free address in 10.251.0.0/16 for a Ceph cluster");
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

/// A new keyring at `path` with a fresh key for `entity` and its capabilities.
fn authtool(path: &Path, entity: &str, caps: &[(&str, &str)]) {
    let mut command = Command::new("ceph-authtool");
    command
        .arg("--create-keyring")
        .arg(path)
        .args(["--gen-key", "-n", entity]);
    for (service, cap) in caps {
        command.args(["--cap", service, cap]);
    }
    run(&mut command);
}

/// Runs `ceph` once with `script` (one command a line) on stdin; its output and errors.
fn ceph_script(conf: &Path, script: &str) -> String {
    let mut child = Command::new("ceph")
        .arg("-c")
        .arg(conf)
        .args(["--connect-timeout", "120"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ceph");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "ceph failed ({}):\n{script}\n{text}",
        output.status
    );
    text
}

/// One request on a Ceph admin socket: the JSON command, a NUL; the answer is a 32-bit
/// big-endian length and that many bytes of JSON.
pub fn admin_socket(socket: &Path, prefix: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let request = serde_json::json!({ "prefix": prefix, "format": "json" }).to_string();
    stream.write_all(request.as_bytes())?;
    stream.write_all(&[0])?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Spawns `command` from one long-lived thread, with `PR_SET_PDEATHSIG` = SIGKILL: the kernel
/// kills the child when the thread that forked it ends, so forking from a test's own thread
/// would kill it when that test ends; this thread lives as long as the process.
fn spawn_tied(mut command: Command, stderr: PathBuf) -> Child {
    type Request = (Command, mpsc::Sender<std::io::Result<std::process::Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("ceph-spawner".into())
            .spawn(move || {
                for (mut command, reply) in requests {
                    let _ = reply.send(command.spawn());
                }
            })
            .unwrap();
        Mutex::new(sender)
    });
    let file = std::fs::File::create(&stderr).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let description = format!("{command:?}");
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply))
        .unwrap();
    let child = answer
        .recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("starting {description}: {e}"));
    Child { child, stderr }
}

/// Whether `/proc/self/mountinfo` shows a `fuse.ceph-fuse` mount at `mountpoint` (canonical).
pub fn is_ceph_fuse_mount(mountpoint: &Path) -> bool {
    mountinfo_entry(mountpoint).is_some_and(|(fs_type, _)| fs_type == "fuse.ceph-fuse")
}

/// The file system type and the device minor of the mount at `mountpoint`, the last one
/// mounted there.
fn mountinfo_entry(mountpoint: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|f| *f == "-")?;
        let minor = fields.get(2)?.split_once(':')?.1.to_string();
        let fs_type = fields.get(separator + 1)?.to_string();
        (Path::new(fields.get(4)?) == mountpoint).then_some((fs_type, minor))
    })
}

/// Where the FUSE connections are (the fusectl file system).
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mounts fusectl where it belongs if nothing did (systemd does on most machines): the
/// connections' `waiting` counts and `abort` switches live there.
fn ensure_fusectl() {
    static MOUNTED: Mutex<bool> = Mutex::new(false);
    let mut mounted = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
    if *mounted {
        return;
    }
    let present = || mountinfo_entry(Path::new(FUSECTL)).is_some_and(|(t, _)| t == "fusectl");
    if !present() {
        // Another process may mount it at the same moment: what counts is that it is there.
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "fusectl", FUSECTL])
            .status();
        assert!(present(), "fusectl could not be mounted on {FUSECTL}");
    }
    *mounted = true;
}

fn fuse_connection(mountpoint: &Path) -> Option<String> {
    mountinfo_entry(mountpoint).map(|(_, minor)| minor)
}

/// Whether `statfs` on `mountpoint` is answered, by a FUSE file system.
fn answers_as_fuse(mountpoint: &Path) -> bool {
    nix::sys::statfs::statfs(mountpoint)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The last 40 lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
