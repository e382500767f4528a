#!/usr/bin/env bash
# Drives quiesce-host over D-Bus with busctl: its objects, its writers, one local snapshot set.
#   examples/busctl-demo.sh [BUS_ADDRESS [VOLUME]]   (no address: the system bus; volume: demo)
set -euo pipefail

bus=(busctl)
if [ -n "${1:-}" ]; then bus+=("--address=$1"); fi
volume=${2:-demo}
host=(org.quiesce.Host1 /org/quiesce/Host1 org.quiesce.Host1)

run() { echo "\$ $*" >&2; "$@"; }

run "${bus[@]}" tree org.quiesce.Host1
run "${bus[@]}" introspect org.quiesce.Host1 /org/quiesce/Host1
run "${bus[@]}" get-property "${host[@]}" Node
run "${bus[@]}" call "${host[@]}" ListWriters
# The reply is: sss "<set id>" "<outcome>" "<snapshot path>"
reply=$(run "${bus[@]}" call "${host[@]}" RunLocalSet sb "$volume" false)
echo "$reply"
set_id=$(awk -F'"' '{ print $2 }' <<<"$reply")
run "${bus[@]}" call "${host[@]}" ShowSet s "$set_id"
