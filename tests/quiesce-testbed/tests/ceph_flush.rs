//! What a CephFS snapshot taken from one node holds of another node's unflushed data — the raw
//! fact the node flush of a snapshot set is built on, with its negative control.
//!
//! Node A (a network namespace with its own `ceph-fuse` client) writes a file; node B (another
//! namespace, another client) takes the snapshot with `mkdir .snap/NAME` and reads the file
//! from it. Each case runs several trials; the counters of A's client (its object cacher's
//! `data_written` / `data_flushed`, from its admin socket) tell where the data was: still in A's
//! kernel (nothing reached `ceph-fuse`), in `ceph-fuse`'s cache (dirty), or on the OSDs.
//!
//! Found here (kernel 6.18, Debian's ceph-fuse 16 on libfuse2):
//!
//! - data a process wrote through a `MAP_SHARED` mapping and did not sync stays in A's kernel,
//!   and the snapshot holds zeros in its place;
//! - `syncfs` of A's mount starts writing those pages to A's `ceph-fuse` but **returns before
//!   `ceph-fuse` has them** (the kernel does not wait for a FUSE server's writeback): a snapshot
//!   taken right after can still lack pages. Once the mount's FUSE connection has no request
//!   waiting (fusectl's `waiting` is 0), `ceph-fuse` holds every page (dirty, in its cache),
//!   and the snapshot holds them (the MDS makes A's client flush its cache for the snapshot);
//! - `msync(MS_SYNC)` and `fsync` wait, and write through to the OSDs;
//! - data `write()` returned is in A's `ceph-fuse` at once (no writeback caching) and in the
//!   snapshot without any flush; `syncfs` does not flush `ceph-fuse`'s cache, `fsync` does.
//!
//! Closing any descriptor of a FUSE file writes its dirty pages back (`fuse_flush`), also a
//! copy closed by a child's `exec`: the mapped file's descriptor is closed before the pages are
//! dirtied, so that no process the test (or a parallel test) starts can flush them.

use quiesce_testbed::{wait_until, CephCluster, CephMount, Netns};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// Trials per case.
const TRIALS: usize = 6;
/// One file of 64 pages per trial.
const SIZE: usize = 64 * 4096;

/// Node A's and node B's mounts of one cluster, and the directory the trials run in.
struct Nodes {
    a: CephMount,
    b: CephMount,
    dir: &'static str,
    _namespaces: (Netns, Netns),
}

impl Nodes {
    fn new(tag: &str, dir: &'static str) -> Nodes {
        let cluster = CephCluster::shared();
        let (node_a, node_b) = (Netns::create(), Netns::create());
        let a = cluster.mount(
            Some(&node_a),
            &cluster.client_key(&format!("{tag}-a"), "rws"),
            &cluster.mountpoint(&format!("{tag}-a")),
        );
        let b = cluster.mount(
            Some(&node_b),
            &cluster.client_key(&format!("{tag}-b"), "rws"),
            &cluster.mountpoint(&format!("{tag}-b")),
        );
        std::fs::create_dir(a.mountpoint.join(dir)).unwrap();
        Nodes {
            a,
            b,
            dir,
            _namespaces: (node_a, node_b),
        }
    }

    fn on_a(&self, name: &str) -> PathBuf {
        self.a.mountpoint.join(self.dir).join(name)
    }

    /// Waits until A's client holds nothing dirty, so that its counters tell what one trial
    /// adds (a leftover is flushed within `client_oc_max_dirty_age`, 5 s).
    fn a_is_clean(&self) {
        wait_until(
            "node A's ceph-fuse to hold nothing dirty",
            Duration::from_secs(60),
            || (self.a.cache_counters().dirty() == 0).then_some(()),
        );
    }

    /// Takes a snapshot of the trials' directory from node B and reads `name` from it; then
    /// removes the snapshot. Returns the contents and how long `mkdir` took.
    fn snapshot_from_b(&self, snapshot: &str, name: &str) -> (Vec<u8>, Duration) {
        let snap = self
            .b
            .mountpoint
            .join(self.dir)
            .join(".snap")
            .join(snapshot);
        let started = Instant::now();
        std::fs::create_dir(&snap).unwrap();
        let took = started.elapsed();
        let contents = std::fs::read(snap.join(name)).unwrap();
        std::fs::remove_dir(&snap).unwrap();
        (contents, took)
    }
}

/// What a trial writes: no zero byte, different per trial.
fn pattern(trial: usize) -> Vec<u8> {
    (0..SIZE)
        .map(|i| 1 + ((i * 31 + trial * 7) % 251) as u8)
        .collect()
}

/// A file of [`SIZE`] bytes mapped `MAP_SHARED`, with no descriptor left open.
struct Mapped {
    ptr: NonNull<std::ffi::c_void>,
}

impl Mapped {
    fn create(path: &Path) -> Mapped {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        file.set_len(SIZE as u64).unwrap();
        // SAFETY: a fresh shared mapping of the whole file, unmapped on drop; nothing else
        // maps it.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(SIZE).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .unwrap();
        // Closed before any page is dirty: this close has nothing to write back.
        drop(file);
        Mapped { ptr }
    }

    fn write(&mut self, data: &[u8]) {
        assert_eq!(data.len(), SIZE);
        // SAFETY: the mapping is SIZE bytes long, readable and writable, and only this value
        // refers to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), SIZE) }
            .copy_from_slice(data);
    }

    fn msync(&self) {
        // SAFETY: the whole mapping, still mapped.
        unsafe { nix::sys::mman::msync(self.ptr, SIZE, nix::sys::mman::MsFlags::MS_SYNC) }.unwrap();
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Synced first, so that no page of this trial is written back during the next one.
        self.msync();
        // SAFETY: mapped by `create`, SIZE bytes, not used after this.
        unsafe { nix::sys::mman::munmap(self.ptr, SIZE) }.unwrap();
    }
}

fn syncfs(mount: &Path) {
    nix::unistd::syncfs(File::open(mount).unwrap()).unwrap();
}

/// One trial's observations.
#[derive(Debug)]
struct Trial {
    /// Bytes A's ceph-fuse received from A's kernel between the write and the snapshot's end.
    received: u64,
    /// Bytes dirty in A's ceph-fuse right after the flush (or the write, without one).
    dirty_after: u64,
    flush: Duration,
    snapshot: Duration,
    contents: Vec<u8>,
}

fn summary(case: &str, trials: &[Trial]) {
    let mut flush: Vec<Duration> = trials.iter().map(|t| t.flush).collect();
    let mut snapshot: Vec<Duration> = trials.iter().map(|t| t.snapshot).collect();
    flush.sort();
    snapshot.sort();
    eprintln!(
        "{case}: {} trials; flush min {:?} median {:?} max {:?}; mkdir .snap median {:?} max {:?}",
        trials.len(),
        flush[0],
        flush[flush.len() / 2],
        flush[flush.len() - 1],
        snapshot[snapshot.len() / 2],
        snapshot[snapshot.len() - 1],
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MmapFlush {
    None,
    Syncfs,
    Msync,
    Fsync,
}

fn mmap_trial(nodes: &Nodes, flush: MmapFlush, trial: usize) -> Trial {
    let name = format!("mmap-{flush:?}-{trial}");
    let path = nodes.on_a(&name);
    let data = pattern(trial);
    nodes.a_is_clean();
    let mut mapped = Mapped::create(&path);
    let before = nodes.a.cache_counters();
    mapped.write(&data);
    let started = Instant::now();
    match flush {
        MmapFlush::None => {}
        MmapFlush::Syncfs => {
            syncfs(&nodes.a.mountpoint);
            // syncfs has queued the writeback, not waited for it: wait for the connection.
            wait_until(
                "A's FUSE connection to drain after syncfs",
                Duration::from_secs(60),
                || (nodes.a.fuse_waiting() == 0).then_some(()),
            );
        }
        MmapFlush::Msync => mapped.msync(),
        MmapFlush::Fsync => File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .sync_all()
            .unwrap(),
    }
    let flush_time = started.elapsed();
    let after = nodes.a.cache_counters();
    let (contents, snapshot) = nodes.snapshot_from_b(&name, &name);
    // Read once the snapshot was taken: a writeback A's kernel started on its own while B
    // snapshotted (dirty_expire, memory pressure from a loaded machine) counts too.
    let taken = nodes.a.cache_counters();
    drop(mapped);
    std::fs::remove_file(&path).unwrap();
    Trial {
        received: taken.written - before.written,
        dirty_after: after.dirty(),
        flush: flush_time,
        snapshot,
        contents,
    }
}

#[test]
fn mmap_data_is_in_a_snapshot_from_another_node_only_after_a_flush_on_its_own() {
    let nodes = Nodes::new("flush-mmap", "flush-mmap");

    // The negative control: nothing flushed on A. A trial in which A's kernel wrote the pages
    // back on its own before the snapshot (dirty_expire_centisecs, memory pressure) proves
    // nothing either way: it is run again, a bounded number of times.
    let mut unflushed = Vec::new();
    let mut written_back = 0;
    for trial in 0..TRIALS * 3 {
        if unflushed.len() == TRIALS {
            break;
        }
        let result = mmap_trial(&nodes, MmapFlush::None, trial);
        if result.received > 0 {
            written_back += 1;
            continue;
        }
        assert!(
            result.contents.len() == SIZE && result.contents.iter().all(|b| *b == 0),
            "trial {trial}: A's ceph-fuse never received the mapped data, yet the snapshot from \
             B holds {} non-zero bytes of {SIZE}",
            result.contents.iter().filter(|b| **b != 0).count()
        );
        unflushed.push(result);
    }
    assert_eq!(
        unflushed.len(),
        TRIALS,
        "A's kernel wrote the mapped pages back on its own in {written_back} trials"
    );
    summary("mmap, no flush (snapshot holds zeros)", &unflushed);

    for flush in [MmapFlush::Syncfs, MmapFlush::Msync, MmapFlush::Fsync] {
        let trials: Vec<Trial> = (0..TRIALS).map(|t| mmap_trial(&nodes, flush, t)).collect();
        for (trial, result) in trials.iter().enumerate() {
            assert_eq!(
                result.received, SIZE as u64,
                "{flush:?}, trial {trial}: the flush hands every mapped page to A's ceph-fuse"
            );
            assert!(
                result.contents == pattern(trial),
                "{flush:?}, trial {trial}: the snapshot from B lacks A's flushed data \
                 ({} zero bytes)",
                result.contents.iter().filter(|b| **b == 0).count()
            );
            if flush == MmapFlush::Syncfs {
                // syncfs (and the drain) reach the FUSE daemon, not past it: the data is dirty
                // in A's ceph-fuse, and the snapshot got it from there.
                assert!(
                    result.dirty_after >= SIZE as u64,
                    "syncfs, trial {trial}: {} bytes dirty in A's ceph-fuse",
                    result.dirty_after
                );
            } else {
                assert_eq!(
                    result.dirty_after, 0,
                    "{flush:?}, trial {trial}: written through to the OSDs"
                );
            }
        }
        summary(&format!("mmap, {flush:?} on A"), &trials);
    }
}

/// Pages of a 16 MB file, enough that the writeback takes many FUSE requests.
const BIG: usize = 4096 * 4096;

#[test]
fn syncfs_returns_before_ceph_fuse_has_the_mapped_pages() {
    let nodes = Nodes::new("flush-syncfs", "flush-syncfs");
    let data: Vec<u8> = (0..BIG).map(|i| 1 + (i % 251) as u8).collect();
    let map = |name: &str| {
        let path = nodes.on_a(name);
        let file = File::create_new(&path).unwrap();
        file.set_len(BIG as u64).unwrap();
        // SAFETY: a fresh shared mapping of the whole file, unmapped below; the descriptor is
        // closed before any page is dirty.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(BIG).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .unwrap();
        drop(file);
        // SAFETY: BIG bytes, mapped readable and writable, used by this closure's caller only.
        unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<u8>(), BIG) }
            .copy_from_slice(&data);
        (path, ptr)
    };
    let unmap = |path: &Path, ptr: NonNull<std::ffi::c_void>| {
        // SAFETY: mapped by `map`, BIG bytes, not used after this.
        unsafe {
            nix::sys::mman::msync(ptr, BIG, nix::sys::mman::MsFlags::MS_SYNC).unwrap();
            nix::sys::mman::munmap(ptr, BIG).unwrap();
        }
        std::fs::remove_file(path).unwrap();
    };

    // What ceph-fuse has when syncfs returns, and once the connection has drained.
    let mut short = Vec::new();
    for trial in 0..4 {
        nodes.a_is_clean();
        let before = nodes.a.cache_counters();
        let (path, ptr) = map(&format!("counted-{trial}"));
        let started = Instant::now();
        syncfs(&nodes.a.mountpoint);
        let returned = started.elapsed();
        let at_return = nodes.a.cache_counters().written - before.written;
        let waiting = nodes.a.fuse_waiting();
        wait_until(
            "A's FUSE connection to drain",
            Duration::from_secs(60),
            || (nodes.a.fuse_waiting() == 0).then_some(()),
        );
        let drained = started.elapsed();
        let at_drain = nodes.a.cache_counters().written - before.written;
        eprintln!(
            "16 MB, trial {trial}: syncfs returned after {returned:?} with {at_return} bytes in \
             ceph-fuse and {waiting} requests waiting; drained after {drained:?} with {at_drain}"
        );
        assert_eq!(
            at_drain, BIG as u64,
            "trial {trial}: every page once drained"
        );
        short.push(at_return < BIG as u64);
        unmap(&path, ptr);
    }
    assert!(
        short.iter().any(|s| *s),
        "syncfs waited for ceph-fuse in all 4 trials: this kernel waits for FUSE writeback, and \
         the node flush may rely on syncfs alone"
    );

    // The consequence, measured (a race, so not asserted): a snapshot right after syncfs.
    let mut incomplete = 0;
    for trial in 0..4 {
        nodes.a_is_clean();
        let name = format!("raced-{trial}");
        let (path, ptr) = map(&name);
        syncfs(&nodes.a.mountpoint);
        let (contents, _) = nodes.snapshot_from_b(&name, &name);
        let missing = (0..BIG)
            .step_by(4096)
            .filter(|&i| contents[i..i + 4096] != data[i..i + 4096])
            .count();
        eprintln!(
            "16 MB, trial {trial}: snapshot right after syncfs lacks {missing} of 4096 pages"
        );
        incomplete += usize::from(missing > 0);
        unmap(&path, ptr);
    }
    eprintln!("snapshots right after a bare syncfs that lacked pages: {incomplete} of 4");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum WriteFlush {
    None,
    Syncfs,
    Fsync,
}

#[test]
fn written_data_is_in_a_snapshot_from_another_node_without_a_flush() {
    let nodes = Nodes::new("flush-write", "flush-write");
    for flush in [WriteFlush::None, WriteFlush::Syncfs, WriteFlush::Fsync] {
        let mut trials = Vec::new();
        for trial in 0..TRIALS {
            let name = format!("write-{flush:?}-{trial}");
            let path = nodes.on_a(&name);
            let data = pattern(trial);
            nodes.a_is_clean();
            let before = nodes.a.cache_counters();
            // Kept open until the snapshot is read: a close is a flush of its own (FUSE_FLUSH).
            let file = File::create_new(&path).unwrap();
            file.write_all_at(&data, 0).unwrap();
            let started = Instant::now();
            match flush {
                WriteFlush::None => {}
                WriteFlush::Syncfs => syncfs(&nodes.a.mountpoint),
                WriteFlush::Fsync => file.sync_all().unwrap(),
            }
            let flush_time = started.elapsed();
            let after = nodes.a.cache_counters();
            let (contents, snapshot) = nodes.snapshot_from_b(&name, &name);
            drop(file);
            std::fs::remove_file(&path).unwrap();
            // FUSE without writeback caching: write() returns once ceph-fuse has the data.
            assert_eq!(
                after.written - before.written,
                SIZE as u64,
                "{flush:?}, trial {trial}: write() hands its data to ceph-fuse"
            );
            assert!(
                contents == data,
                "{flush:?}, trial {trial}: the snapshot from B lacks data A's write() returned \
                 ({} zero bytes)",
                contents.iter().filter(|b| **b == 0).count()
            );
            if flush == WriteFlush::Fsync {
                assert_eq!(after.dirty(), 0, "fsync, trial {trial}: on the OSDs");
            } else {
                assert!(
                    after.dirty() >= SIZE as u64,
                    "{flush:?}, trial {trial}: only in A's ceph-fuse ({} bytes dirty): syncfs \
                     does not flush ceph-fuse's own cache",
                    after.dirty()
                );
            }
            trials.push(Trial {
                received: after.written - before.written,
                dirty_after: after.dirty(),
                flush: flush_time,
                snapshot,
                contents,
            });
        }
        summary(&format!("write(), {flush:?} on A"), &trials);
    }
}
