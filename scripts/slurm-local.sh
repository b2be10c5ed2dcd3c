#!/usr/bin/env bash
# Purpose:  a real one-node SLURM on 127.0.0.1 for the tests that run cluster/slurm/*.sbatch
#           (tests/it/slurm.rs): munged, slurmctld and slurmd started directly (no systemd), as
#           root, with two fake GPUs. scripts/test.sh starts it before `cargo test` and stops it
#           after.
# Hardware: any Linux machine with Debian's `slurm-wlm` (22.05) and `munge` packages
#           (scripts/test.sh installs them); no GPU: the two "GPUs" are links to /dev/null named like
#           NVIDIA device nodes, so SLURM hands out GPU ids and sets CUDA_VISIBLE_DEVICES.
# Command:  bash scripts/slurm-local.sh start|stop|status|env
#             start   writes the configuration, starts the three daemons (a no-op when they already
#                     answer) and waits until the node is idle
#             stop    stops them (a no-op when none runs)
#             status  exit 0 when the controller answers and the node can run jobs
#             env     prints `export SLURM_CONF=...` for clients (sbatch, srun, scontrol)
#           Everything lives under DEVISE_SLURM_DIR (default /tmp/devise-slurm): config, logs,
#           state, spool, munge key and socket. Ports: DEVISE_SLURM_PORT (default 6817) for
#           slurmctld and the next one for slurmd.
# Time:     ~5 s to start.
#
# The cluster: node `localhost` (127.0.0.1) with 8 CPUs (declared: config_overrides lets a
# 2-core machine run 8 tasks) and `gpu:2`; partitions `debug` (default; preempted jobs are
# requeued), `cancel` (preempted jobs are cancelled), both with GraceTime=30, `nograce`
# (requeued, GraceTime=0) and `urgent` (a higher priority tier whose jobs preempt the other
# three); `preempt_send_user_signal`, so a job preempted with a grace time first gets its
# `--signal`. proctrack/linuxproc and task/none: no cgroups. KillWait=30 (SIGTERM to SIGKILL).
set -euo pipefail

dir=${DEVISE_SLURM_DIR:-/tmp/devise-slurm}
port=${DEVISE_SLURM_PORT:-6817}
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
log() { printf '[slurm-local] %s\n' "$*" >&2; }

pid_alive() { # pid_alive PIDFILE
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_config() {
  mkdir -p "$dir"/{munge,state,spool/localhost,log,dev}
  chmod 755 "$dir/munge"
  [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
  chmod 600 "$dir/munge/munge.key"
  # The fake GPUs: slurmd needs character devices (it stats them); links to /dev/null are. The
  # digits at the end of each name are the GPU ids it puts into CUDA_VISIBLE_DEVICES.
  ln -sfn /dev/null "$dir/dev/nvidia0"
  ln -sfn /dev/null "$dir/dev/nvidia1"
  cat >"$dir/gres.conf" <<EOF
NodeName=localhost Name=gpu File=$dir/dev/nvidia[0-1]
EOF
  cat >"$conf" <<EOF
ClusterName=devise-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munged.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=cancel Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=30
PartitionName=nograce Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=0
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

# The controller answers and the node is idle or allocated (not down, drained or unknown).
ready() {
  scontrol ping >/dev/null 2>&1 || return 1
  local state
  state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1)
  case "$state" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

start() {
  if pid_alive "$dir/munge/munged.pid" && pid_alive "$dir/slurmctld.pid" &&
    pid_alive "$dir/slurmd.pid" && ready; then
    log "already running (SLURM_CONF=$conf)"
    return 0
  fi
  stop
  for cmd in munged mungekey slurmctld slurmd scontrol sinfo; do
    command -v "$cmd" >/dev/null || { log "$cmd not found: apt-get install slurm-wlm munge"; exit 1; }
  done
  write_config
  # --force: as root, in a folder that is not munge's own.
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munged.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  # -c: a fresh controller state (no jobs from an earlier run).
  slurmctld -c -f "$conf"
  slurmd -f "$conf" -N localhost
  local waited=0
  until ready; do
    if ((waited >= 60)); then
      log "the node did not become idle in 30 s:"
      sinfo -N -l >&2 || true
      tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
      exit 1
    fi
    # A node left DOWN by an earlier controller state comes back here.
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    sleep 0.5
    waited=$((waited + 1))
  done
  log "running: $(sinfo -h -o '%P %T %G' | tr '\n' ' ')(SLURM_CONF=$conf)"
}

stop_one() { # stop_one NAME PIDFILE
  local name=$1 pidfile=$2 pid i
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop in 10 s: SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  [ -d "$dir" ] || return 0
  # Jobs first, so that no step daemon outlives slurmd.
  if [ -f "$conf" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
  fi
  stop_one slurmd "$dir/slurmd.pid"
  stop_one slurmctld "$dir/slurmctld.pid"
  stop_one munged "$dir/munge/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if ready; then
      sinfo -h -o '%P %T %G'
    else
      log "not running (SLURM_CONF=$conf)"
      exit 1
    fi
    ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
