//! The QEMU writer against real guests, driven by the real host, on a real btrfs volume.
//!
//! Each test boots tiny guests of the test bed (`quiesce_testbed::guest`: Debian's kernel,
//! busybox, the real `qemu-ga`) whose disk image lies on the test's btrfs volume, loads the built
//! plugin into a `quiesce_host::Host` and runs snapshot sets of the volume. The guest's workload
//! acknowledges each record once it is written to its ext4 disk (`durable`: fsynced;
//! `buffered`: in the guest's page cache); snapshots are checked by attaching the snapshot's copy
//! of the disk image read-only and reading it.
//!
//! One guest runs at a time: under TCG (software emulation) a guest takes a whole core, and
//! several at once on two cores only make every deadline a matter of luck.

use quiesce_host::worker::State;
use quiesce_host::{Config, Host};
use quiesce_proto::{ComponentKind, Level, Outcome, Phase, SetRecord, SetRequest, WriterState};
use quiesce_testbed::guest::{self, Guest, GuestSpec, ImageState};
use quiesce_testbed::{self as testbed, wait_until, BtrfsVolume};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const UUID: &str = "8c3a4b8e-3f59-4d7a-9e0a-2d5c1c2b7f11";

fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A btrfs volume, a scratch directory with the socket directory, and guests on the volume.
struct Bed {
    volume: BtrfsVolume,
    tmp: tempfile::TempDir,
    sockets: PathBuf,
}

impl Bed {
    fn new() -> Bed {
        let volume = BtrfsVolume::create(512);
        let tmp = tempfile::tempdir().unwrap();
        let sockets = tmp.path().join("sockets");
        std::fs::create_dir_all(volume.data.join("vms")).unwrap();
        Bed {
            volume,
            tmp,
            sockets,
        }
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.volume.data.join("vms").join(format!("{name}.img"))
    }

    /// Boots guest `name` with a fresh disk on the volume.
    fn boot(&self, name: &str, uuid: &str, agent: bool) -> Guest {
        let disk = self.disk(name);
        guest::make_ext4_image(&disk, 64);
        let mut spec = GuestSpec::new(name, uuid, &disk, &self.sockets);
        spec.agent = agent;
        let image = guest::guest_image();
        if let Some(took) = image.built_in {
            eprintln!(
                "guest image built in {took:?} ({})",
                image.initramfs.display()
            );
        }
        let guest = Guest::boot(spec);
        eprintln!(
            "guest {name} booted in {:?} ({})",
            guest.boot_time, guest.accel
        );
        guest
    }

    /// The control file and FIFO of misbehave writer `id`.
    fn control(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.tmp.path().join(format!("{id}.control")),
            self.tmp.path().join(format!("{id}.fifo")),
        )
    }

    fn events(&self) -> PathBuf {
        self.tmp.path().join("misbehave.events")
    }

    /// A host on the volume with `plugins` and their tables. `hold_limit_ms` and `[timeouts]`
    /// as given.
    /// `qemu`: the qemu plugin, with these extra keys in its table.
    fn host(&self, dir: &str, qemu: Option<&str>, misbehave: bool, timeouts: &str) -> Host {
        let dir = self.tmp.path().join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut plugins = Vec::new();
        let mut body = format!("{timeouts}\n");
        if let Some(extra) = qemu {
            plugins.push(testbed::plugin("quiesce-writer-qemu"));
            body.push_str(&format!(
                "[plugins.qemu]\nsocket_dir = {:?}\nthaw_retry_ms = 500\n{extra}\n\
                 [[plugins.qemu.volumes]]\nname = \"shared\"\npath = {:?}\n",
                self.sockets.display().to_string(),
                self.volume.data.display().to_string(),
            ));
        }
        if misbehave {
            plugins.push(testbed::plugin("quiesce-test-plugin"));
            body.push_str(&format!(
                "[plugins.misbehave]\nevents = {:?}\n",
                self.events().display().to_string()
            ));
            // `beside`: a system writer like the guest's, frozen together with it;
            // `before`: a front-end writer, frozen before it.
            for (id, level) in [("beside", "system"), ("before", "front-end")] {
                let (control, fifo) = self.control(id);
                if !fifo.exists() {
                    testbed::run(Command::new("mkfifo").arg(&fifo));
                }
                body.push_str(&format!(
                    "[[plugins.misbehave.writers]]\nid = \"{id}\"\nlevel = \"{level}\"\n\
                     volume = \"shared\"\nneeds_post_snapshot = true\ncontrol = {:?}\n\
                     hang_fifo = {:?}\n",
                    control.display().to_string(),
                    fifo.display().to_string()
                ));
            }
        }
        let libs: Vec<&Path> = plugins.iter().map(PathBuf::as_path).collect();
        let text = testbed::host_config(&dir, &self.volume, &libs, &body);
        let host = Host::start(Config::parse(&text, &dir.join("host.toml")).unwrap());
        assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
        host
    }

    /// Orders misbehave writer `id` (its control file, replaced whole); "" clears them.
    fn order(&self, id: &str, orders: &str) {
        let (control, _) = self.control(id);
        let tmp = control.with_extension("tmp");
        std::fs::write(&tmp, orders).unwrap();
        std::fs::rename(&tmp, &control).unwrap();
    }

    /// Lets a misbehave writer hanging in a call go on.
    fn release(&self, id: &str) {
        let (_, fifo) = self.control(id);
        assert!(
            quiesce_testbed::release_fifo(&fifo, Duration::from_secs(60)),
            "{id} is not hanging on {}",
            fifo.display()
        );
    }

    /// How many lines `line` (e.g. "beside freeze") the misbehave events log has now.
    fn event_count(&self, line: &str) -> usize {
        std::fs::read_to_string(self.events())
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == line)
            .count()
    }

    /// Waits until the misbehave events log has more than `before` lines `line`.
    fn wait_event(&self, line: &str, before: usize) {
        wait_until(
            &format!("misbehave event {line:?}"),
            Duration::from_secs(60),
            || (self.event_count(line) > before).then_some(()),
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run_set(rt: &tokio::runtime::Runtime, host: &Host) -> SetRecord {
    rt.block_on(host.run_local_set(SetRequest {
        volumes: vec!["shared".into()],
        best_effort: false,
    }))
    .unwrap()
}

fn result<'a>(record: &'a SetRecord, id: &str) -> &'a quiesce_proto::WriterResult {
    record
        .writers
        .iter()
        .find(|w| w.writer.writer == id)
        .unwrap_or_else(|| panic!("writer {id} is not in the set: {record:#?}"))
}

/// The failure of a failed set: phase, writer id, reason.
fn failure(record: &SetRecord) -> (Phase, Option<String>, String) {
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => (
            *phase,
            writer.as_ref().map(|w| w.writer.clone()),
            reason.clone(),
        ),
        other => panic!("the set must fail, it ended {other:?}: {record:#?}"),
    }
}

fn snapshot_image(record: &SetRecord, name: &str) -> PathBuf {
    let snapshot = record
        .snapshot
        .as_ref()
        .unwrap_or_else(|| panic!("no snapshot kept: {record:#?}"));
    PathBuf::from(&snapshot.path)
        .join("vms")
        .join(format!("{name}.img"))
}

/// Waits until the host's worker of `id` is in `state`.
fn wait_state(host: &Host, id: &str, state: State) {
    let writer = host.writer(id).unwrap();
    wait_until(
        &format!("writer {id} {}", state.as_str()),
        Duration::from_secs(60),
        || (writer.status().state == state).then_some(()),
    );
}

/// The guest is thawed and writing: its agent says so, and it acknowledges new records.
fn assert_thawed_and_writing(guest: &Guest, what: &str) {
    let status = guest.fsfreeze_status(Duration::from_secs(30));
    assert_eq!(status, "thawed", "{what}: {}", guest.diagnostics());
    let acked = guest.acked();
    guest.wait_acked_beyond(acked, Duration::from_secs(30));
}

/// A snapshot's image as a freeze leaves it: clean, with every record up to `acked`.
fn assert_consistent(state: &ImageState, acked: u64, what: &str) {
    assert!(
        !state.needs_recovery && state.fsck_clean && state.mounts_read_only,
        "{what}: the image is not clean: {state:#?}"
    );
    for (file, records) in [("durable", &state.durable), ("buffered", &state.buffered)] {
        assert!(
            records.contiguous() && records.max() >= acked,
            "{what}: {file} holds 1..={} (contiguous: {}), {acked} were acknowledged",
            records.max(),
            records.contiguous()
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// A set freezes the guest — its writes stop until the thaw — and the snapshot's image is clean
/// and holds every record acknowledged before the freeze, fsynced or not; then sets under load.
#[test]
fn a_set_holds_the_guests_writes_and_the_snapshot_holds_every_acknowledged_record() {
    let _one = one_guest_at_a_time();
    let started = Instant::now();
    let bed = Bed::new();
    let guest = bed.boot("vm1", UUID, true);
    let host = bed.host("host", Some(""), true, "hold_limit_ms = 30000");

    let ids: Vec<String> = host.writers().iter().map(|w| w.id().to_string()).collect();
    for id in ["qemu-vm1", "qemu-new-guests.shared", "beside", "before"] {
        assert!(ids.iter().any(|i| i == id), "{id} not in {ids:?}");
    }
    let metadata = &host.writer("qemu-vm1").unwrap().metadata;
    assert_eq!(metadata.name, "QEMU guest vm1");
    assert_eq!(metadata.instance, UUID);
    assert_eq!(metadata.level, Level::System);
    assert!(
        metadata.vendor_version.starts_with("QEMU "),
        "{metadata:#?}"
    );
    let disk = bed.disk("vm1").canonicalize().unwrap();
    let components: Vec<(&str, ComponentKind, &str, &[String])> = metadata
        .components
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.kind,
                c.volume.as_str(),
                c.paths.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        components,
        [(
            "disk:disk0",
            ComponentKind::Files,
            "shared",
            &[disk.display().to_string()][..]
        )],
        "{metadata:#?}"
    );
    let rt = runtime();

    // 1. A set held in its freeze phase by `beside` (a system writer frozen together with the
    //    guest): the guest stays frozen as long as the set holds.
    guest.wait_acked_beyond(50, Duration::from_secs(60));
    bed.order("beside", "hang_in = \"freeze\"");
    let n = bed.event_count("beside freeze");
    let (record, at_freeze) = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        wait_state(&host, "qemu-vm1", State::Frozen);
        bed.wait_event("beside freeze", n);
        let at_freeze = guest.acked();
        // Absence can only be shown over a while: 2 s is ~300 records of this workload.
        let held = guest.acks_stay_at(at_freeze, Duration::from_secs(2));
        let status = guest.fsfreeze_status(Duration::from_secs(10));
        bed.order("beside", "");
        bed.release("beside");
        let record = set.join().unwrap();
        assert_eq!(held, Ok(()), "the guest acknowledged records while frozen");
        assert_eq!(status, "frozen");
        (record, at_freeze)
    });
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let vm = result(&record, "qemu-vm1");
    assert_eq!(vm.state, WriterState::Thawed, "{vm:#?}");
    assert_eq!(vm.reports["filesystems_frozen"], "1", "{vm:#?}");
    assert_eq!(vm.reports["filesystems_thawed"], "1", "{vm:#?}");
    assert_eq!(vm.reports["fsfreeze_status"], "thawed");
    assert_eq!(vm.reports["vm"], "vm1");
    assert_eq!(vm.reports["uuid"], UUID);
    assert!(vm.reports["disks"].contains("disk:disk0"), "{vm:#?}");
    assert_thawed_and_writing(&guest, "after the set");
    let state = guest::inspect_image(&snapshot_image(&record, "vm1"));
    assert_consistent(&state, at_freeze, "the held set");
    // Exactly: nothing after the last acknowledgement but, perhaps, the next record's append
    // to `durable` (written, then blocked in its fsync by the freeze).
    assert_eq!(state.buffered.max(), at_freeze, "{state:#?}");
    assert!(
        state.durable.max() <= at_freeze + 1,
        "{state:#?} ({at_freeze})"
    );
    eprintln!(
        "held set: {at_freeze} acknowledged at the freeze, none during it; the snapshot holds \
         durable 1..={} and buffered 1..={}, clean",
        state.durable.max(),
        state.buffered.max()
    );

    // 2. Sets under load: every record acknowledged before the set is in its snapshot.
    let mut timings = Vec::new();
    for i in 0..4 {
        let acked = guest.wait_acked_beyond(guest.acked() + 20, Duration::from_secs(60));
        let record = run_set(&rt, &host);
        assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
        let vm = result(&record, "qemu-vm1");
        let state = guest::inspect_image(&snapshot_image(&record, "vm1"));
        assert_consistent(&state, acked, &format!("set {i}"));
        timings.push(format!(
            "freeze {} ms, thaw {} ms (agent round trips), freeze window {} ms",
            vm.reports["freeze_ms"],
            vm.reports["thaw_ms"],
            record.freeze_window_ms.unwrap_or(0)
        ));
        eprintln!(
            "set {i}: {acked} acknowledged before the set; snapshot holds durable 1..={}, \
             buffered 1..={}; {}",
            state.durable.max(),
            state.buffered.max(),
            timings[i]
        );
    }
    assert_thawed_and_writing(&guest, "after the sets");
    eprintln!("whole test {:?}", started.elapsed());
}

/// The negative control: the same snapshot without the writer is a crash image — it needs
/// journal recovery, and after recovery it lacks records the guest had acknowledged (written,
/// not fsynced); fsynced records are there either way. With the writer, on the same guest a
/// moment later, neither is true.
#[test]
fn without_the_writer_the_snapshot_needs_recovery_and_misses_acknowledged_records() {
    let _one = one_guest_at_a_time();
    let bed = Bed::new();
    let guest = bed.boot("vm1", UUID, true);
    let rt = runtime();

    let bare = bed.host("bare", None, false, "");
    assert!(bare.writers().is_empty());
    let acked = guest.wait_acked_beyond(100, Duration::from_secs(60));
    let record = run_set(&rt, &bare);
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let image = snapshot_image(&record, "vm1");
    let raw = guest::inspect_image(&image);
    assert!(
        raw.needs_recovery && !raw.mounts_read_only,
        "without the writer the image should need journal recovery: {raw:#?}"
    );
    let recovered = guest::inspect_recovered(&image, bed.tmp.path());
    assert!(
        recovered.durable.contiguous() && recovered.durable.max() >= acked,
        "fsynced records survive in a crash image: {recovered:#?} ({acked} acknowledged)"
    );
    assert!(
        recovered.buffered.max() < acked,
        "the crash image must miss buffered records acknowledged before the set: \
         {recovered:#?} ({acked} acknowledged)"
    );
    eprintln!(
        "without the writer: needs recovery; after it, durable 1..={} (all {acked}), buffered \
         1..={} ({} acknowledged buffered records missing)",
        recovered.durable.max(),
        recovered.buffered.max(),
        acked - recovered.buffered.max()
    );
    drop(bare);

    let host = bed.host("host", Some(""), false, "");
    let acked = guest.wait_acked_beyond(guest.acked() + 100, Duration::from_secs(60));
    let record = run_set(&rt, &host);
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let state = guest::inspect_image(&snapshot_image(&record, "vm1"));
    assert_consistent(&state, acked, "with the writer");
    eprintln!(
        "with the writer: clean, durable 1..={}, buffered 1..={} ({acked} acknowledged)",
        state.durable.max(),
        state.buffered.max()
    );
}

/// Wherever the set fails — prepare, freeze (an error, a timeout, the hold limit), snapshot,
/// thaw, post-snapshot — the guest ends thawed and writing.
#[test]
fn the_guest_is_thawed_whatever_phase_the_set_fails_in() {
    let _one = one_guest_at_a_time();
    let bed = Bed::new();
    let guest = bed.boot("vm1", UUID, true);
    let host = bed.host(
        "host",
        Some(""),
        true,
        "hold_limit_ms = 3000\n[timeouts]\nfreeze_ms = 8000",
    );
    let rt = runtime();
    let cases: &[(&str, &str, Phase, Option<&str>)] = &[
        (
            "prepare",
            "fail_in = \"prepare\"",
            Phase::Prepare,
            Some("beside"),
        ),
        (
            "freeze",
            "fail_in = \"freeze\"",
            Phase::Freeze,
            Some("beside"),
        ),
        ("thaw", "fail_in = \"thaw\"", Phase::Thaw, Some("beside")),
        (
            "post-snapshot",
            "fail_in = \"post-snapshot\"",
            Phase::PostSnapshot,
            Some("beside"),
        ),
    ];
    for (what, orders, phase, writer) in cases {
        bed.order("beside", orders);
        let record = run_set(&rt, &host);
        bed.order("beside", "");
        let (failed_in, by, reason) = failure(&record);
        assert_eq!(failed_in, *phase, "{what}: {record:#?}");
        assert_eq!(by.as_deref(), *writer, "{what}: {reason}");
        let vm = result(&record, "qemu-vm1");
        assert!(
            matches!(
                vm.state,
                WriterState::Aborted | WriterState::Thawed | WriterState::Done
            ),
            "{what}: {vm:#?}"
        );
        assert_thawed_and_writing(&guest, what);
        eprintln!(
            "failed in {what}: qemu-vm1 {:?}; guest thawed and writing",
            vm.state
        );
    }

    // The snapshot itself fails: its directory cannot take a new subvolume.
    testbed::run(Command::new("chattr").arg("+i").arg(&bed.volume.snapshots));
    let record = run_set(&rt, &host);
    testbed::run(Command::new("chattr").arg("-i").arg(&bed.volume.snapshots));
    let (failed_in, by, _) = failure(&record);
    assert_eq!((failed_in, by), (Phase::Snapshot, None), "{record:#?}");
    assert_thawed_and_writing(&guest, "snapshot");

    // A writer beside it hangs in its freeze past the hold limit (3 s, before its freeze
    // deadline of 8 s, which the hold limit cuts): the guest is thawed at the hold limit, not
    // when `beside` comes back, and `beside` is named.
    bed.order("beside", "hang_in = \"freeze\"");
    let record = run_set(&rt, &host);
    let (failed_in, by, reason) = failure(&record);
    assert_eq!(
        (failed_in, by.as_deref()),
        (Phase::Freeze, Some("beside")),
        "{record:#?}"
    );
    assert!(reason.contains("hold limit"), "{reason}");
    assert_eq!(result(&record, "qemu-vm1").state, WriterState::Aborted);
    // `beside` still hangs; the guest is already thawed.
    assert!(host.writer("beside").unwrap().status().busy.is_some());
    assert_thawed_and_writing(&guest, "hold limit");
    bed.order("beside", "");
    bed.release("beside");
    rt.block_on(host.writer("beside").unwrap().settled());
    eprintln!("hold limit: guest thawed while the other writer still hung ({reason})");
}

/// The guest agent killed inside the guest while the guest is frozen. Restarted at once (as
/// Debian's systemd unit does), the new agent gets the thaw and the snapshot is good. Held down
/// past the thaw's deadline, the set fails naming the VM — the guest stays frozen, which is the
/// truth: the kernel keeps the freeze — and the writer's background thaw reaches it once the
/// agent is back, with no set running. Stopped (SIGSTOP) before the freeze, the freeze times
/// out naming the VM (at its `guest-sync-delimited`: nothing is sent to an agent that does not
/// answer the sync), and once the agent continues — answering the stale syncs of the freeze and
/// of the abort, which the next exchange skips — the background thaw confirms it thawed.
#[test]
fn a_guest_agent_killed_or_stalled_mid_freeze_leaves_the_guest_thawed() {
    let _one = one_guest_at_a_time();
    let bed = Bed::new();
    let guest = bed.boot("vm1", UUID, true);
    let host = bed.host(
        "host",
        Some(""),
        true,
        "hold_limit_ms = 20000\n[timeouts]\nfreeze_ms = 3000\nthaw_ms = 3000\nabort_ms = 3000",
    );
    let rt = runtime();

    // A. Killed while frozen, restarted at once.
    bed.order("beside", "hang_in = \"freeze\"");
    let n = bed.event_count("beside freeze");
    let record = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        wait_state(&host, "qemu-vm1", State::Frozen);
        bed.wait_event("beside freeze", n);
        let at_freeze = guest.acked();
        guest.command("kill-agent");
        guest.wait_for_count("agent-started", 2, Duration::from_secs(60));
        assert_eq!(
            guest.acks_stay_at(at_freeze, Duration::from_millis(500)),
            Ok(())
        );
        bed.order("beside", "");
        bed.release("beside");
        set.join().unwrap()
    });
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let state = guest::inspect_image(&snapshot_image(&record, "vm1"));
    assert!(state.fsck_clean && !state.needs_recovery, "{state:#?}");
    assert_thawed_and_writing(&guest, "agent restarted at once");
    eprintln!("A: agent killed while frozen and restarted: the thaw reached the new agent");

    // B. Killed while frozen, held down past the thaw deadline.
    bed.order("beside", "hang_in = \"freeze\"");
    let n = bed.event_count("beside freeze");
    let (record, at_freeze) = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        wait_state(&host, "qemu-vm1", State::Frozen);
        bed.wait_event("beside freeze", n);
        let at_freeze = guest.acked();
        guest.command("kill-agent-hold");
        guest.wait_for_count("agent-held", 1, Duration::from_secs(60));
        bed.order("beside", "");
        bed.release("beside");
        (set.join().unwrap(), at_freeze)
    });
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Thaw, "{record:#?}");
    assert_eq!(by.as_deref(), Some("qemu-vm1"), "{reason}");
    for needle in ["VM vm1", "did not reach the guest", "background"] {
        assert!(reason.contains(needle), "{needle:?} not in {reason}");
    }
    assert!(record.snapshot.is_none(), "a failed set keeps no snapshot");
    // What is true: the guest is still frozen, with nobody able to thaw it but an agent.
    assert_eq!(
        guest.acks_stay_at(at_freeze, Duration::from_secs(1)),
        Ok(()),
        "the guest cannot be thawed while its agent is down"
    );
    let worker = host.writer("qemu-vm1").unwrap().status();
    let since = Instant::now();
    guest.command("release-agent");
    let thawed_at = guest.wait_acked_beyond(at_freeze, Duration::from_secs(60));
    eprintln!(
        "B: thaw failed: {reason}\nB: the agent back, the background thaw thawed the guest \
         {:?} later (ack {thawed_at})",
        since.elapsed()
    );
    assert_thawed_and_writing(&guest, "agent back after the set failed");
    // Nobody called the writer meanwhile: the host's worker did nothing more.
    let now = host.writer("qemu-vm1").unwrap().status();
    assert_eq!(now.watchdog_thaws, worker.watchdog_thaws);
    assert!(now.busy.is_none());
    let record = run_set(&rt, &host);
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");

    // C. Stalled (SIGSTOP) between prepare and the guest's freeze: `before`, a front-end
    //    writer, freezes first and holds the set there while the agent is stopped.
    bed.order("before", "hang_in = \"freeze\"");
    let n = bed.event_count("before freeze");
    let record = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        bed.wait_event("before freeze", n);
        guest.command("stop-agent");
        bed.order("before", "");
        bed.release("before");
        set.join().unwrap()
    });
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Freeze, "{record:#?}");
    assert_eq!(by.as_deref(), Some("qemu-vm1"), "{reason}");
    assert!(
        reason.contains("VM vm1")
            && reason.contains("guest-fsfreeze-freeze failed")
            && reason.contains("guest-sync-delimited"),
        "{reason}"
    );
    let vm = result(&record, "qemu-vm1");
    assert_eq!(vm.state, WriterState::Failed, "{vm:#?}");
    guest.command("cont-agent");
    assert_thawed_and_writing(&guest, "agent continued after a freeze that timed out");
    let record = run_set(&rt, &host);
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    eprintln!("C: freeze timed out on a stopped agent ({reason}); thawed after it continued");
}

/// Guests that start after the host loaded the plugin, stop, or have no agent: each fails the
/// set by name before anything freezes.
#[test]
fn guests_started_late_stopped_or_without_an_agent_fail_the_set_by_name() {
    let _one = one_guest_at_a_time();
    let bed = Bed::new();
    let mut vm1 = bed.boot("vm1", UUID, true);
    let host = bed.host("host", Some(""), false, "[timeouts]\nprepare_ms = 4000");
    let rt = runtime();
    assert_eq!(
        run_set(&rt, &host).outcome,
        Outcome::AppConsistent,
        "one guest"
    );

    // Started after the host loaded the plugin: no writer of its own; the set fails naming it.
    let mut vm2 = bed.boot("vm2", "0f4d1a52-5c44-4ad6-8f39-2e35a4c9d5b0", true);
    let record = run_set(&rt, &host);
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Prepare, "{record:#?}");
    assert_eq!(by.as_deref(), Some("qemu-new-guests.shared"), "{reason}");
    assert!(
        reason.contains("VM vm2") && reason.contains("started after quiesce-host loaded"),
        "{reason}"
    );
    assert!(record.phases.iter().all(|p| p.phase != Phase::Freeze));
    eprintln!("late guest: {reason}");
    // Once it stopped (its socket files stay behind, refusing connections), sets go through.
    vm2.kill();
    assert_eq!(run_set(&rt, &host).outcome, Outcome::AppConsistent);

    // The guest of a writer stopped: its writer fails the set, naming it.
    vm1.kill();
    let record = run_set(&rt, &host);
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Prepare, "{record:#?}");
    assert_eq!(by.as_deref(), Some("qemu-vm1"), "{reason}");
    assert!(reason.contains("VM vm1 is gone"), "{reason}");
    eprintln!("stopped guest: {reason}");
    drop(host);

    // A guest whose agent does not run: the set fails at prepare within its deadline, naming it.
    let vm3 = bed.boot("vm3", "5b8e6c1d-2a3f-4e7b-9c0d-1f2e3d4c5b6a", false);
    for dead in ["vm1", "vm2"] {
        for suffix in ["agent.sock", "qmp.sock"] {
            let _ = std::fs::remove_file(bed.sockets.join(format!("{dead}.{suffix}")));
        }
    }
    let host = bed.host("host3", Some(""), false, "[timeouts]\nprepare_ms = 4000");
    let started = Instant::now();
    let record = run_set(&rt, &host);
    let took = started.elapsed();
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Prepare, "{record:#?}");
    assert_eq!(by.as_deref(), Some("qemu-vm3"), "{reason}");
    assert!(
        reason.contains("VM vm3: no answer from its guest agent")
            && reason.contains("qemu-guest-agent installed"),
        "{reason}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(vm3.acked() > 0, "the guest without an agent runs");
    eprintln!("guest without an agent ({took:?}): {reason}");
}

/// A libvirt domain: found through `virsh` (its disks from `domblklist`), frozen and thawed
/// through libvirt's own agent channel — the same held set as for plain QEMU, its snapshot
/// checked; the agent killed and held down mid-freeze, then thawed in the background; the
/// domain destroyed.
#[test]
fn libvirt_guests_are_found_frozen_and_thawed_through_libvirtd() {
    let _one = one_guest_at_a_time();
    let uri = guest::libvirtd();
    let bed = Bed::new();
    // Domains are system-wide: a name of this test process's own.
    let name = format!("quiesce-test-{}", std::process::id());
    let disk = bed.disk(&name);
    guest::make_ext4_image(&disk, 64);
    let mut guest = Guest::boot_libvirt(GuestSpec::new(&name, UUID, &disk, &bed.sockets), uri);
    eprintln!(
        "libvirt guest booted in {:?} ({})",
        guest.boot_time, guest.accel
    );
    let host = bed.host(
        "host",
        Some(&format!("libvirt_uri = {uri:?}")),
        true,
        "hold_limit_ms = 20000\n[timeouts]\nthaw_ms = 3000\nabort_ms = 3000",
    );
    let id = format!("qemu-{name}");
    let metadata = &host
        .writer(&id)
        .unwrap_or_else(|| panic!("no writer {id}: {:?}", host.writers()))
        .metadata;
    assert_eq!(metadata.instance, UUID);
    assert!(
        metadata.vendor_version.starts_with("QEMU "),
        "{metadata:#?}"
    );
    let components: Vec<(&str, &str, &[String])> = metadata
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.volume.as_str(), c.paths.as_slice()))
        .collect();
    assert_eq!(
        components,
        [(
            "disk:vda",
            "shared",
            &[disk.canonicalize().unwrap().display().to_string()][..]
        )]
    );
    let rt = runtime();

    // A set held in its freeze.
    guest.wait_acked_beyond(50, Duration::from_secs(60));
    bed.order("beside", "hang_in = \"freeze\"");
    let n = bed.event_count("beside freeze");
    let (record, at_freeze) = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        wait_state(&host, &id, State::Frozen);
        bed.wait_event("beside freeze", n);
        let at_freeze = guest.acked();
        let held = guest.acks_stay_at(at_freeze, Duration::from_secs(2));
        let status = guest.fsfreeze_status(Duration::from_secs(10));
        bed.order("beside", "");
        bed.release("beside");
        let record = set.join().unwrap();
        assert_eq!(held, Ok(()), "the guest acknowledged records while frozen");
        assert_eq!(status, "frozen");
        (record, at_freeze)
    });
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let vm = result(&record, &id);
    assert_eq!(vm.reports["filesystems_frozen"], "1", "{vm:#?}");
    assert_eq!(vm.reports["fsfreeze_status"], "thawed", "{vm:#?}");
    let state = guest::inspect_image(&snapshot_image(&record, &name));
    assert_consistent(&state, at_freeze, "libvirt, held set");
    assert_eq!(state.buffered.max(), at_freeze, "{state:#?}");
    assert_thawed_and_writing(&guest, "libvirt, after the set");
    eprintln!(
        "libvirt: held set, {at_freeze} acknowledged at the freeze, all in the snapshot; freeze \
         {} ms, thaw {} ms through virsh",
        vm.reports["freeze_ms"], vm.reports["thaw_ms"]
    );

    // The agent killed while frozen and held down: the set fails at thaw naming the VM; the
    // background thaw reaches the guest through libvirt once the agent is back.
    bed.order("beside", "hang_in = \"freeze\"");
    let n = bed.event_count("beside freeze");
    let (record, at_freeze) = std::thread::scope(|s| {
        let set = s.spawn(|| run_set(&rt, &host));
        wait_state(&host, &id, State::Frozen);
        bed.wait_event("beside freeze", n);
        let at_freeze = guest.acked();
        guest.command("kill-agent-hold");
        guest.wait_for_count("agent-held", 1, Duration::from_secs(60));
        bed.order("beside", "");
        bed.release("beside");
        (set.join().unwrap(), at_freeze)
    });
    let (phase, by, reason) = failure(&record);
    assert_eq!(phase, Phase::Thaw, "{record:#?}");
    assert_eq!(by.as_deref(), Some(id.as_str()), "{reason}");
    assert!(
        reason.contains(&format!("VM {name}")) && reason.contains("did not reach the guest"),
        "{reason}"
    );
    assert_eq!(
        guest.acks_stay_at(at_freeze, Duration::from_secs(1)),
        Ok(())
    );
    guest.command("release-agent");
    guest.wait_acked_beyond(at_freeze, Duration::from_secs(60));
    assert_thawed_and_writing(&guest, "libvirt, agent back");
    eprintln!("libvirt: agent held down: {reason}");

    // The domain destroyed: its writer fails the next set, naming it.
    guest.kill();
    let record = run_set(&rt, &host);
    let (phase, by, reason) = failure(&record);
    assert_eq!(
        (phase, by.as_deref()),
        (Phase::Prepare, Some(id.as_str())),
        "{reason}"
    );
    assert!(reason.contains(&format!("VM {name} is gone")), "{reason}");
}
