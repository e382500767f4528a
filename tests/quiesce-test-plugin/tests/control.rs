//! The control file: read at every call, it replaces the configured misbehaviour while the
//! host runs (through the SDK's in-process harness).

use quiesce_sdk::harness::{FailureKind, Phase, Plugin};

#[test]
fn the_control_file_changes_what_a_writer_does_from_one_call_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let fifo = dir.path().join("fifo");
    let plugin = Plugin::new("misbehave", quiesce_test_plugin::init);
    let config = format!(
        "[[writers]]\nid = \"w\"\nfail_in = \"thaw\"\nhang_fifo = {fifo:?}\ncontrol = {control:?}\n"
    );
    let mut writers = plugin.init(&config).unwrap();
    let writer = &mut writers[0];
    let first_error = |run: &quiesce_sdk::harness::Run| {
        run.error()
            .map(|(step, e)| (step, e.kind, e.reason.clone()))
    };

    // No control file: the configuration applies.
    let run = writer.run(|_| Ok(()));
    let (step, kind, _) = first_error(&run).unwrap();
    assert_eq!((step, kind), (Phase::Thaw, FailureKind::Error));

    // The control file's orders replace the configured ones.
    std::fs::write(&control, "panic_in = \"freeze\"\n").unwrap();
    let run = writer.run(|_| Ok(()));
    let (step, kind, message) = first_error(&run).unwrap();
    assert_eq!((step, kind), (Phase::Freeze, FailureKind::Panicked));
    assert!(
        message.contains("w was told to panic in freeze"),
        "{message}"
    );

    // Empty (or removed): the configuration again.
    std::fs::write(&control, "").unwrap();
    let run = writer.run(|_| Ok(()));
    assert_eq!(first_error(&run).unwrap().0, Phase::Thaw);
    std::fs::remove_file(&control).unwrap();
    let run = writer.run(|_| Ok(()));
    assert_eq!(first_error(&run).unwrap().0, Phase::Thaw);

    // Orders it cannot read fail the call, saying why.
    std::fs::write(&control, "hang_in = \"never\"\n").unwrap();
    let run = writer.run(|_| Ok(()));
    let (step, kind, message) = first_error(&run).unwrap();
    assert_eq!((step, kind), (Phase::Prepare, FailureKind::Error));
    assert!(message.contains("control file"), "{message}");

    // A hang it orders waits on the FIFO until someone opens it for writing.
    quiesce_testbed::run(std::process::Command::new("mkfifo").arg(&fifo));
    std::fs::write(&control, "hang_in = \"prepare\"\n").unwrap();
    let opener = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::OpenOptions::new().write(true).open(fifo).unwrap()
    });
    let run = writer.run(|_| Ok(()));
    opener.join().unwrap();
    assert!(
        first_error(&run).is_none(),
        "prepare returned once the FIFO was opened, and the orders replace the configured \
         failure in thaw: {:?}",
        first_error(&run)
    );
}
