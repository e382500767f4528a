#!/bin/sh
# A Proxmox VE vzdump hook script (`vzdump --script /usr/local/bin/quiesce-vzdump-hook`, or
# `script: ...` in /etc/vzdump.conf): an application-consistent snapshot of a shared volume,
# mounted read-only at its stable path for the whole backup job, released when the job ends.
#
# vzdump runs the script with the phase first: `job-init`, `job-start`, then per guest
# `backup-start MODE VMID`, `pre-stop`, `pre-restart`, `post-restart`, `backup-end`,
# `backup-abort`, `log-end`, and last `job-end` or `job-abort`. A script that fails stops the job.
#   job-start            quiesce snapshot mount   (a set; its snapshot at the stable path)
#   job-end, job-abort   quiesce snapshot release (unmounted and deleted; nothing mounted: fine)
#   anything else        nothing
#
# QUIESCE_VOLUME (default `shared`) names the volume, QUIESCE_AT the stable path (default
# /run/quiesce/snapshots/VOLUME), QUIESCE_CLI the `quiesce` program (default: on PATH),
# QUIESCE_BUS another D-Bus than the system bus. Exits with `quiesce`'s status (`quiesce
# snapshot --help`): 0 when the snapshot is app-consistent and mounted, or released.
set -eu

phase=${1:?usage: vzdump-hook.sh PHASE [MODE VMID]}
volume=${QUIESCE_VOLUME:-shared}
at=${QUIESCE_AT:-/run/quiesce/snapshots/$volume}
quiesce=${QUIESCE_CLI:-quiesce}

case "$phase" in
job-start) exec "$quiesce" snapshot mount --volume "$volume" --at "$at" ;;
job-end | job-abort) exec "$quiesce" snapshot release --volume "$volume" --at "$at" ;;
*) exit 0 ;;
esac
