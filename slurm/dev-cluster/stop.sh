#!/usr/bin/env bash
# Tear down the dev cluster of start.sh: SIGTERM each daemon by its pid file, in dependency order,
# waiting for each to exit. Never kills by name.
set -uo pipefail
DIR="${CXR_SLURM_DIR:-/tmp/cxr-slurm}"
stop() {  # stop NAME PIDFILE
  local pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile" 2>/dev/null) || return 0
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { echo "stopped $1 ($pid)"; return 0; }; sleep 0.1; done
  echo "stop.sh: $1 ($pid) still running after 10s; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null
}
if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
  scancel --quiet -u "$(id -un)" 2>/dev/null; sleep 1  # jobs first, so nothing outlives its daemon
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop slurmdbd "$DIR/slurmdbd.pid"
stop mariadbd "$DIR/mysql-run/mysqld.pid"
stop munged /run/munge/munged.pid
rm -f "$DIR/munged.pid"
