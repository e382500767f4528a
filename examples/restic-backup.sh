#!/usr/bin/env bash
# Back up an application-consistent snapshot of a shared volume with restic, from any node.
#
#   RESTIC_REPOSITORY=/srv/backup RESTIC_PASSWORD_FILE=/etc/quiesce/restic.pass \
#       examples/restic-backup.sh shared [more restic backup options...]
#
# 1. `quiesce snapshot create` asks this node's quiesce host for a snapshot of VOLUME: every
#    application on every node of the cluster that uses it flushes and holds still for it;
# 2. restic backs up the snapshot's directory (read-only, consistent), tagged `quiesce-set=<id>`;
# 3. `quiesce snapshot delete` releases the snapshot, also when the backup failed.
#
# restic knows nothing about the cluster, quiesce nothing about restic. Needs `quiesce`, `restic`
# and `jq` on PATH, root or the quiesce group, and restic's own variables (RESTIC_REPOSITORY,
# RESTIC_PASSWORD_FILE, ...); QUIESCE_BUS names another D-Bus than the system bus.
#
# Prints `backed up set <id> (<outcome>) from <path> as restic snapshot <restic-id>` and exits 0.
# Exits 2 when the set failed (its record on stderr; nothing was backed up), 1 on any other error.
# Restore: restic restore latest --tag quiesce-set=<id> --target DIR (DIR is the volume's root).
set -euo pipefail

volume=${1:?usage: restic-backup.sh VOLUME [restic backup options...]}
shift

status=0
record=$(quiesce snapshot create --volume "$volume" --json) || status=$?
if [ "$status" -ne 0 ]; then
  if [ -n "$record" ]; then
    echo "restic-backup: the snapshot set failed; nothing was backed up. Its record:" >&2
    echo "$record" >&2
  fi
  exit "$status"
fi
id=$(jq -er .id <<<"$record")
outcome=$(jq -er .outcome.outcome <<<"$record")
path=$(jq -er .snapshot.path <<<"$record")

# Release the snapshot however the backup ends.
release() {
  quiesce snapshot delete "$id" >/dev/null ||
    echo "restic-backup: could not release snapshot $id: run quiesce snapshot delete $id" >&2
}
trap release EXIT

# From inside the snapshot, so that the repository holds the volume's own tree (paths relative
# to its root), whatever the snapshot's directory is called.
cd "$path"
summary=$(restic backup --json --tag "quiesce-set=$id" "$@" . | tail -n 1)
restic_id=$(jq -er 'select(.message_type == "summary") | .snapshot_id' <<<"$summary")
echo "backed up set $id ($outcome) from $path as restic snapshot $restic_id"
