//! Issue 16, long calls: a set started and followed instead of waited for, and cancelled. On
//! the sets' cluster of `sets.rs`, with the `db` writer hanging in freeze, so that the set is
//! surely still running while the test looks at it: the broker's `Start` names the set at once
//! and then each phase; `Cancel` aborts it for its requester or root alone; `quiesce snapshot
//! create` shows the phases on a terminal and cancels its set on SIGTERM.
//!
//! The negative control of a cancellation is `sets.rs`'s timeout test: the same hung set,
//! neither cancelled nor timed out, fails only at the writer's own freeze deadline, for it.

use super::*;
use quiesce_link::v1::sets_client::SetsClient;
use quiesce_link::v1::{CancelSetRequest, CreateSetRequest, SetProgress};
use std::io::Read;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The next message of a started set, within the deadline.
async fn next(stream: &mut tonic::Streaming<SetProgress>) -> SetProgress {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the broker tells the set's progress within the deadline")
        .expect("the progress stream does not break")
        .expect("the progress stream ends only after the record")
}

/// `Start` answers with the set's id while the set runs (its writer hangs in freeze), then
/// each phase it enters. Another client and another uid on the node may not cancel it (the
/// set runs on); root on a node may: the set fails saying who cancelled it, its last message
/// is its record, every writer is released and no snapshot is kept. A set no longer running
/// cannot be cancelled again.
#[test]
fn start_names_the_set_at_once_and_only_its_requester_or_root_may_cancel_it() {
    let cluster = Cluster::start(&[Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    }]);
    let node = &cluster.nodes[0];
    let url = cluster.broker.url.clone();
    let client = |name: &str| {
        let url = url.clone();
        let security = cluster.certs.tls(name);
        async move { SetsClient::new(quiesce_link::connect(&url, &security).await.unwrap()) }
    };
    let (record, phases, refusals) = runtime().block_on(async {
        let mut stream = client("backup")
            .await
            .start(CreateSetRequest {
                volumes: vec!["shared".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await;
        assert!(first.id.starts_with("set-"), "{first:?}");
        assert_eq!((first.phase.as_str(), first.record_json.as_str()), ("", ""));
        let id = first.id;
        let mut phases = vec![];
        while phases.last().map(String::as_str) != Some("freeze") {
            let progress = next(&mut stream).await;
            assert_eq!(
                progress.record_json, "",
                "the set ended early: {progress:?}"
            );
            phases.push(progress.phase);
        }
        // Hung in the writer's freeze: the set cannot end before it is cancelled.
        tokio::task::block_in_place(|| {
            wait_for(
                "the db writer to hang in freeze",
                || node.called("freeze").then_some(()),
                || cluster.logs(),
            )
        });

        let cancel = |name: &'static str, uid: Option<u32>| {
            let id = id.clone();
            let client = client(name);
            async move {
                client
                    .await
                    .cancel(CancelSetRequest {
                        id,
                        requester_uid: uid,
                    })
                    .await
            }
        };
        let mut refusals = vec![];
        for (name, uid) in [("admin", None), ("node1", Some(1000))] {
            let status = cancel(name, uid).await.unwrap_err();
            refusals.push((status.code(), status.message().to_string()));
        }
        cancel("node1", Some(0)).await.unwrap();
        let record = loop {
            let progress = next(&mut stream).await;
            if !progress.record_json.is_empty() {
                break serde_json::from_str::<SetRecord>(&progress.record_json).unwrap();
            }
            phases.push(progress.phase);
        };
        let again = cancel("node1", Some(0)).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
        (record, phases, refusals)
    });
    node.release_hang();

    for (code, message) in &refusals {
        assert_eq!(*code, tonic::Code::PermissionDenied, "{message}");
        assert!(
            message.contains("only its requester (client backup) or root"),
            "{message}"
        );
    }
    assert!(
        refusals[0].1.contains("client admin may not"),
        "{refusals:?}"
    );
    assert!(
        refusals[1].1.contains("node node1, uid 1000 may not"),
        "{refusals:?}"
    );
    assert_eq!(phases[..2], ["prepare", "freeze"], "{phases:?}");
    assert_eq!(
        phases.last().map(String::as_str),
        Some("abort"),
        "{phases:?}"
    );
    let (_, _, reason) = failed(&record);
    assert!(
        reason.contains("cancelled by node node1, uid 0"),
        "the set failed for the cancellation: {record:?}"
    );
    assert_eq!(record.snapshot, None, "{record:?}");
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
    assert!(
        !app_frozen(&node.app_events),
        "the app writer was released: {}",
        cluster.logs()
    );
}

/// `quiesce snapshot create` on a terminal shows each phase the set enters on stderr, and a
/// SIGTERM mid-set cancels the set: the command prints the set's record (failed: cancelled by
/// this node's root) and exits 2, every writer released, no snapshot kept. Off a terminal,
/// stderr stays quiet.
#[test]
fn create_on_a_terminal_shows_the_phases_and_sigterm_cancels_its_set() {
    let cluster = Cluster::start(&[Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    }]);
    let node = &cluster.nodes[0];
    let pty = nix::pty::openpty(None, None).unwrap();
    let create = node
        .cli(&["snapshot", "create", "--volume", "shared", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .unwrap();
    // The terminal's output, read as it comes (the read ends once the command exited).
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let mut terminal = std::fs::File::from(pty.master);
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = terminal.read(&mut buf) {
            text.extend_from_slice(&buf[..n]);
            let _ = lines_tx.send(String::from_utf8_lossy(&text).into_owned());
        }
    });
    let mut shown = String::new();
    let mut terminal_shows = |what: &str| {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !shown.contains(what) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(text) => shown = text,
                Err(_) => panic!(
                    "the terminal never showed {what:?}: {shown}\n{}",
                    cluster.logs()
                ),
            }
        }
        shown.clone()
    };
    terminal_shows(": prepare (");
    terminal_shows(": freeze (");
    wait_for(
        "the db writer to hang in freeze",
        || node.called("freeze").then_some(()),
        || cluster.logs(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(create.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, record, _) = finish(create);
    node.release_hang();

    let record = record.unwrap_or_else(|| panic!("no record printed (exit {code})"));
    // Waited for whole: the terminal's output may come in pieces.
    let shown = terminal_shows(&format!("SIGTERM: cancelling set {}", record.id.0));
    assert_eq!(code, 2, "a failed set: {record:?}\n{shown}");
    let (_, _, reason) = failed(&record);
    assert!(
        reason.contains("cancelled by node node1, uid 0"),
        "{record:?}"
    );
    assert_eq!(record.snapshot, None);
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
    assert!(!app_frozen(&node.app_events), "{}", cluster.logs());

    // Off a terminal: the phases are not shown; the cancellation still is.
    let create = cluster.spawn_create(0);
    wait_for(
        "the db writer to hang in freeze again",
        || (node.calls().iter().filter(|c| *c == "freeze").count() == 2).then_some(()),
        || cluster.logs(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(create.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, record, stderr) = finish(create);
    node.release_hang();
    assert_eq!(code, 2, "{record:?}\n{stderr}");
    assert!(stderr.contains("SIGTERM: cancelling set"), "{stderr}");
    assert!(!stderr.contains(": prepare ("), "{stderr}");
}
