#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start.sh started (by their pid files); leaves any others running.
set -uo pipefail
STATE=${CPSL_SLURM_STATE:-/tmp/cpsl-slurm}
[ -f "$STATE/started" ] || exit 0
stop() {  # name pidfile
  if [ -f "$2" ] && kill -0 "$(cat "$2")" 2>/dev/null; then
    local pid; pid=$(cat "$2")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "slurm-setup: stopped $1 ($pid)"
  fi
}
# reverse order of starting
grep -qx slurmd "$STATE/started" && stop slurmd /run/slurmd.pid
grep -qx slurmctld "$STATE/started" && stop slurmctld /run/slurmctld.pid
grep -qx munged "$STATE/started" && stop munged /run/munge/munged.pid
rm -f "$STATE/started"
exit 0
