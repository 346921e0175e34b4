#!/usr/bin/env bash
# Start a real single-node SLURM on this machine (Debian slurm-wlm + munge), for tests/test_slurm.py and CI.
#
#   bash tests/slurm/start.sh     # installs the packages if missing, starts munged, slurmctld and slurmd
#   bash tests/slurm/stop.sh      # stops the daemons that start.sh started (and only those)
#
# Idempotent: a daemon that already runs is reused and left running by stop.sh; an existing slurm.conf that this
# script did not write is left alone. The daemons it starts are listed in $CPSL_SLURM_STATE/started.
# Needs root (apt-get, /etc/munge, /etc/slurm). Prints `sinfo` when the node accepts jobs.
set -euo pipefail
STATE=${CPSL_SLURM_STATE:-/tmp/cpsl-slurm}
MARK="# written by cpsl-pipeline tests/slurm/start.sh"
mkdir -p "$STATE"
touch "$STATE/started"

say() { echo "slurm-setup: $*"; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
started() { grep -qx "$1" "$STATE/started" || echo "$1" >> "$STATE/started"; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: reuse a working daemon, else start one with a local key.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
  started munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  say "munged started"
fi

H=$(hostname -s)
CONF=/etc/slurm/slurm.conf
if [ ! -f "$CONF" ] || grep -qxF "$MARK" "$CONF"; then
  MEM=$(( $(free -m | awk '/Mem:/{print $2}') - 2000 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF.new" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue for 10 minutes (the executor plugin's squeue status command needs this)
MinJobAge=600
# a job past its time limit gets SIGTERM, then SIGKILL 10 s later
KillWait=10
NodeName=$H CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
  if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    # a controller that runs with an older config of ours re-reads it
    if running /run/slurmctld.pid; then scontrol reconfigure || true; fi
  else
    rm -f "$CONF.new"
  fi
fi

if running /run/slurmctld.pid; then
  say "slurmctld already running"
else
  slurmctld
  started slurmctld
  say "slurmctld started"
fi
if running /run/slurmd.pid; then
  say "slurmd already running"
else
  slurmd
  started slurmd
  say "slurmd started"
fi

# Wait until the node takes jobs (idle, mixed or allocated); resume it if it came up drained or down.
for i in $(seq 60); do
  st=$(sinfo -h -n "$H" -o %t 2>/dev/null | head -1 || true)
  case "$st" in
    idle*|mix*|alloc*) sinfo; exit 0 ;;
    down*|drain*|drng*) [ $((i % 5)) -eq 0 ] && scontrol update nodename="$H" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
say "error: node $H did not become ready (state: ${st:-none}); see /var/log/slurm/"
sinfo || true
exit 1
