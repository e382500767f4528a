//! The btrfs provider on a real btrfs file system on a loop device.

use quiesce_provider::{Btrfs, Provider, ProviderConfig};
use quiesce_testbed::BtrfsVolume;
use std::path::Path;

#[test]
fn takes_a_writable_snapshot_finalizes_it_read_only_and_deletes_it() {
    let volume = BtrfsVolume::create(256);
    std::fs::write(volume.data.join("table"), "before").unwrap();
    let provider = Btrfs::new(volume.data.clone(), volume.snapshots.clone());

    let snapshot = provider.take("set-1").unwrap();
    assert_eq!(snapshot.provider, "btrfs");
    let path = Path::new(&snapshot.path);
    assert_eq!(path, volume.snapshots.join("set-1"));
    // Atomic copy of the moment: later writes to the volume do not reach it.
    std::fs::write(volume.data.join("table"), "after").unwrap();
    assert_eq!(
        std::fs::read_to_string(path.join("table")).unwrap(),
        "before"
    );

    // Writable until finalized: post-snapshot work lands in it.
    std::fs::write(path.join("label"), "set-1").unwrap();
    assert!(!BtrfsVolume::is_read_only(path));
    provider.finalize(&snapshot).unwrap();
    assert!(BtrfsVolume::is_read_only(path));
    assert!(
        std::fs::write(path.join("late"), "x").is_err(),
        "a finalized snapshot refuses writes"
    );

    // What a restarted daemon finds of the set: the snapshot, until it is deleted.
    assert_eq!(provider.find("set-1").unwrap(), Some(snapshot.clone()));
    assert_eq!(provider.find("set-other").unwrap(), None);

    // A read-only snapshot can still be deleted by the provider.
    provider.delete(&snapshot).unwrap();
    assert!(!path.exists());
    assert!(volume.snapshot_list().is_empty());
    assert_eq!(provider.find("set-1").unwrap(), None);
}

#[test]
fn a_snapshot_is_never_taken_into_an_existing_directory() {
    let volume = BtrfsVolume::create(256);
    let provider = Btrfs::new(volume.data.clone(), volume.snapshots.clone());
    provider.take("set-1").unwrap();
    let err = provider.take("set-1").unwrap_err().to_string();
    assert!(err.contains("set-1 exists already"), "{err}");
    assert!(
        !volume.snapshots.join("set-1/data").exists(),
        "no snapshot nested in it"
    );
}

#[test]
fn find_refuses_a_plain_directory_where_a_snapshot_would_be() {
    let volume = BtrfsVolume::create(256);
    std::fs::create_dir(volume.snapshots.join("set-3")).unwrap();
    let provider = Btrfs::new(volume.data.clone(), volume.snapshots.clone());
    let err = provider.find("set-3").unwrap_err().to_string();
    assert!(err.contains("is not a btrfs subvolume"), "{err}");
    assert!(err.contains("move it out of"), "{err}");
}

#[test]
fn check_accepts_a_subvolume_and_refuses_what_cannot_be_snapshotted() {
    let volume = BtrfsVolume::create(256);
    let config = |subvolume: &Path, snapshots: &Path| ProviderConfig::Btrfs {
        subvolume: subvolume.into(),
        snapshots: snapshots.into(),
    };
    config(&volume.data, &volume.snapshots).check(&[]).unwrap();

    let plain = volume.data.join("plain-dir");
    std::fs::create_dir(&plain).unwrap();
    let err = config(&plain, &volume.snapshots).check(&[]).unwrap_err();
    assert!(
        err.to_string().contains("is not a btrfs subvolume"),
        "{err}"
    );

    let err = config(&volume.data.join("missing"), &volume.snapshots)
        .check(&[])
        .unwrap_err();
    assert!(err.to_string().contains("btrfs subvolume create"), "{err}");

    // The scratch directory is on the machine's own file system, not on the volume.
    let err = config(&volume.data, volume.scratch())
        .check(&[])
        .unwrap_err();
    assert!(err.to_string().contains("another file system"), "{err}");
}

#[test]
fn a_source_that_is_not_a_subvolume_is_refused_naming_it() {
    let volume = BtrfsVolume::create(256);
    let plain = volume.data.join("plain-dir");
    std::fs::create_dir(&plain).unwrap();
    let provider = Btrfs::new(plain, volume.snapshots.clone());
    let err = provider.take("set-2").unwrap_err().to_string();
    assert!(
        err.contains("plain-dir a btrfs subvolume?) failed: Invalid argument"),
        "{err}"
    );
    assert!(volume.snapshot_list().is_empty(), "nothing left behind");
}
