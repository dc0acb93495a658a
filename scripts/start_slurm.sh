#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine (munge + slurmctld + slurmd, node "localhost" on 127.0.0.1),
# for the real `sbatch` tests. Installs slurm-wlm and munge with apt-get when missing. Idempotent: does nothing
# when the node already answers `sinfo`. Needs root (or sudo). Stop it with `scontrol shutdown` and
# `kill "$(cat /run/munge/munged.pid)"`.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

node_state() { timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

if command -v sinfo >/dev/null && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]; then
  echo "[slurm] already running: node localhost $(node_state)"
  exit 0
fi

if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
  echo "[slurm] installing slurm-wlm and munge"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: key (the package usually creates one), run directory, daemon
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mungekey --create --keyfile /etc/munge/munge.key
  $SUDO chown munge:munge /etc/munge/munge.key
  $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge
$SUDO chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  $SUDO runuser -u munge -- /usr/sbin/munged
fi

# slurm.conf for this machine: every CPU, most of the memory
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
$SUDO mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
$SUDO tee /etc/slurm/slurm.conf >/dev/null <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || $SUDO slurmctld
pgrep -x slurmd >/dev/null || $SUDO slurmd -N localhost

for _ in $(seq 60); do
  state=$(node_state || true)
  case "$state" in
    idle*|mixed*|allocated*) echo "[slurm] running: node localhost $state ($cpus CPUs)"; exit 0 ;;
    down*|drain*) $SUDO scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "[slurm] the node did not become idle; see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd.log" >&2
exit 1
