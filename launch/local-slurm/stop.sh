#!/usr/bin/env bash
# Stop the loopback SLURM cluster started by start.sh: cancel all jobs, stop the daemons it
# started (by pid file), remove the generated slurm.conf, the /etc/hosts line and LOCAL_SLURM_BASE.
# munged is stopped only if start.sh started it. Needs root (Debian/Ubuntu, same as start.sh).
# Safe to run when nothing is running.
#
# Env:   LOCAL_SLURM_BASE (default /tmp/dist-dejpeg-slurm), as given to start.sh
# Usage: stop.sh [--keep-munge]   (start.sh uses --keep-munge for its restart)
set -euo pipefail
BASE=${LOCAL_SLURM_BASE:-/tmp/dist-dejpeg-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# dist-dejpeg-local-slurm"
KEEP_MUNGE=0; [ "${1:-}" = "--keep-munge" ] && KEEP_MUNGE=1

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pids() {  # pidfile...: TERM all, wait up to 10 s, then KILL
  local f pid pids=()
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f"); rm -f "$f"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 100); do
    local up=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && up=1; done
    [ $up = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# Cancel jobs while slurmctld is up, so job steps are cleaned up by slurmd.
if alive "$BASE/run/slurmctld.pid"; then
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --full $(squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
shopt -s nullglob
stop_pids "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"
if [ $KEEP_MUNGE = 0 ] && [ -e "$BASE/run/munged.ours" ]; then
  stop_pids /run/munge/munged.pid
  rm -f "$BASE/run/munged.ours"
fi
# Remove only what we generated.
if head -n1 "$CONF" 2>/dev/null | grep -q "^$MARK"; then rm -f "$CONF"; fi
if grep -q "$MARK\$" /etc/hosts; then
  # /etc/hosts may be a bind mount (containers): rewrite in place, do not replace the file.
  sed "/$MARK\$/d" /etc/hosts > /tmp/.hosts.$$ && cat /tmp/.hosts.$$ > /etc/hosts
  rm -f /tmp/.hosts.$$
fi
[ $KEEP_MUNGE = 1 ] || rm -rf "$BASE"
echo "[local-slurm] stopped"
