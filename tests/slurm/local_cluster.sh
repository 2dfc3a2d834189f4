#!/usr/bin/env bash
# Start a real SLURM cluster on this machine (Debian slurm-wlm + munge), for the SLURM tests: node vm
# (this host, partition debug, the default) is up at once; nodes dftn1 and dftn2 (partition two) are
# declared and stay down* until tests/slurm/two_nodes.sh brings them up in their own network namespaces.
# Idempotent: installs what is missing, rewrites the config, restarts the daemons, waits until vm is
# idle. Needs root (CI and the dev container run as root). No traffic leaves this machine.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v shellcheck >/dev/null || ! command -v ip >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge shellcheck iproute2 >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge shellcheck iproute2 >/dev/null; }
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
net=${DIST_FT_NODES_NET:-198.51.100}  # the namespaced nodes' /24 (tests/slurm/two_nodes.sh)
# The controller's address: this host's first global IPv4 address, which the namespaced nodes reach through
# their bridge (the host name may resolve to 127.0.0.1, which inside a namespace is the namespace itself).
addr=$(ip -4 -o addr show scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]}' | grep -v "^${net//./\\.}\\." | head -n 1 || true)

# munge: the key and its directories must belong to the munge user
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
pkill -x munged 2>/dev/null || true
sleep 0.5
su -s /bin/sh munge -c munged

mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=dist-ft-ci
SlurmctldHost=${host}${addr:+(${addr})}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
# several slurmd on one host (the namespaced nodes): each its own spool, pid and log (%n: node name)
SlurmdSpoolDir=/var/spool/slurmd.%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.%n.log
# a node that stops answering is marked down after 20 s (default 300): its jobs fail and are requeued
JobCompType=jobcomp/none
MpiDefault=none
# requeued jobs may start again right away (the default holds them 61 s+)
KillWait=30
SlurmdTimeout=20
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
NodeName=dftn[1-2] NodeAddr=${net}.[11-12] NodeHostname=dftn[1-2] CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=two Nodes=dftn[1-2] MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

bash "$(dirname "$0")/two_nodes.sh" down  # namespaced nodes of an earlier cluster
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld -c   # -c: clean start, no job state from an earlier cluster
slurmd

for _ in $(seq 60); do
    if [ "$(sinfo -h -p debug -o %t 2>/dev/null)" = idle ]; then
        echo "local SLURM up: node ${host}, ${cpus} CPUs, ${mem_mb} MB; controller at ${addr:-${host}}"
        exit 0
    fi
    sleep 1
done
echo "local SLURM did not come up; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
exit 1
