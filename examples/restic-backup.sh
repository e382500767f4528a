#!/usr/bin/env bash
# Back up an application-consistent snapshot of a shared volume with restic, from any node.
#
#   RESTIC_REPOSITORY=/srv/backup RESTIC_PASSWORD_FILE=/etc/quiesce/restic.pass \
#       examples/restic-backup.sh shared [more restic backup options...]
#
# `quiesce snapshot exec` asks this node's quiesce host for a snapshot of VOLUME (every
# application on every node of the cluster that uses it flushes and holds still for it), runs
# restic with the snapshot mounted read-only at /run/quiesce/snapshots/VOLUME — the same path
# for every backup, so restic finds the last one as its parent and reads only what changed —
# and deletes the snapshot however restic ends. The backup is tagged `quiesce-set=<id>`.
#
# The one-line recipe is the README's:
#   quiesce snapshot exec --volume shared -- restic backup /run/quiesce/snapshots/shared
# This script adds the tag, and backs up from inside the snapshot so that the repository holds
# the volume's own tree (paths relative to its root).
#
# Needs `quiesce`, `restic` and `jq` on PATH, root, and restic's own variables
# (RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE, ...); QUIESCE_BUS names another D-Bus than the
# system bus.
#
# Prints `backed up set <id> (<outcome>) from <path> as restic snapshot <restic-id>` and exits 0.
# Exits 2 when the set failed (nothing was backed up), restic's status when restic failed, and
# `quiesce snapshot --help`'s status for anything else.
# Restore: restic restore latest --tag quiesce-set=<id> --target DIR (DIR is the volume's root).
set -euo pipefail

volume=${1:?usage: restic-backup.sh VOLUME [restic backup options...]}
shift

# shellcheck disable=SC2016 # expanded by the inner bash, in the environment exec gives it
exec quiesce snapshot exec --volume "$volume" -- bash -c '
  set -euo pipefail
  cd "$QUIESCE_SNAPSHOT_PATH"
  summary=$(restic backup --json --tag "quiesce-set=$QUIESCE_SET_ID" "$@" . | tail -n 1)
  restic_id=$(jq -er "select(.message_type == \"summary\") | .snapshot_id" <<<"$summary")
  echo "backed up set $QUIESCE_SET_ID ($QUIESCE_OUTCOME) from $QUIESCE_SNAPSHOT_SOURCE as restic snapshot $restic_id"
' restic-backup "$@"
