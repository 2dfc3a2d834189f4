#!/usr/bin/env bash
# Two more SLURM nodes on this machine, each a real host as far as SLURM, gloo and dist_ft can tell: its own
# network namespace (address on a bridge), its own UTS namespace (hostname) and its own slurmd. The
# controller is the one tests/slurm/local_cluster.sh starts; its slurm.conf already declares these nodes
# (partition "two"), which stay down* until this script brings them up.
#
#   bash tests/slurm/two_nodes.sh up          # namespaces, veths, /etc/hosts names, slurmds; waits for idle
#   bash tests/slurm/two_nodes.sh down        # everything above removed (idempotent)
#   bash tests/slurm/two_nodes.sh kill N      # node N dies: its slurmd and every process in it, SIGKILL
#   bash tests/slurm/two_nodes.sh start N     # node N's slurmd again (the node comes back)
#
# Addresses: TEST-NET-2 (RFC 5737), 198.51.100.0/24 unless DIST_FT_NODES_NET (first three octets) says
# otherwise; the bridge holds .1, node N holds .1N. Needs root. Nothing leaves this machine.
set -euo pipefail

net=${DIST_FT_NODES_NET:-198.51.100}
bridge=dftbr0
nodes=(dftn1 dftn2)
mark="# dist-ft two-node test cluster"

_hosts_without_ours() {  # /etc/hosts may be a bind mount: rewrite it in place, never replace the file
    local kept
    kept=$(grep -v -- "$mark" /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
}

_start_slurmd() {  # node $1 (index from 1): slurmd in the node's namespaces, with the node's hostname
    local name=${nodes[$1 - 1]}
    mkdir -p "/var/spool/slurmd.$name"
    # nsenter, not `ip netns exec`: that one remounts /sys for the namespace, hiding /sys/fs/cgroup from slurmd
    nsenter --net="/run/netns/$name" unshare --uts sh -c "hostname $name && exec slurmd -N $name"
}

_kill_node() {  # everything running inside node $1's network namespace, SIGKILL (a power cut)
    local name=${nodes[$1 - 1]} pids
    pids=$(ip netns pids "$name" 2>/dev/null || true)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
}

down() {
    for i in 1 2; do
        _kill_node "$i"
        ip link del "${nodes[$i - 1]}-h" 2>/dev/null || true
        ip netns del "${nodes[$i - 1]}" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    _hosts_without_ours
    rm -rf /var/spool/slurmd.dftn1 /var/spool/slurmd.dftn2
}

up() {
    command -v slurmd >/dev/null || { echo "slurmd not installed: run tests/slurm/local_cluster.sh first" >&2; exit 1; }
    scontrol show partition two >/dev/null 2>&1 \
        || { echo "the controller does not declare partition 'two': run tests/slurm/local_cluster.sh first" >&2; exit 1; }
    if ip -4 -o addr show | grep -v " $bridge " | grep -q " $net\."; then
        echo "$net.0/24 is in use on this machine; set DIST_FT_NODES_NET to a free /24 (e.g. 203.0.113)" >&2
        exit 1
    fi
    down
    ip link add "$bridge" type bridge
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
    for i in 1 2; do
        local name=${nodes[$i - 1]}
        ip netns add "$name"
        ip link add "$name-h" type veth peer name "$name-n"
        ip link set "$name-h" master "$bridge"
        ip link set "$name-h" up
        ip link set "$name-n" netns "$name"
        ip -n "$name" link set lo up
        ip -n "$name" link set "$name-n" name eth0
        ip -n "$name" addr add "$net.1$i/24" dev eth0
        ip -n "$name" link set eth0 up
        ip -n "$name" route add default via "$net.1"  # the controller's address is the host's own
        echo "$net.1$i $name $mark" >> /etc/hosts     # what DNS does on a real cluster
    done
    for i in 1 2; do
        _start_slurmd "$i"
    done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -p two -o %t | sort -u)" = "idle" ]; then
            echo "two-node SLURM up: ${nodes[*]} at $net.11, $net.12 (partition two)"
            return 0
        fi
        scontrol update NodeName=dftn1,dftn2 State=RESUME >/dev/null 2>&1 || true  # a node marked down earlier
        sleep 1
    done
    echo "the two nodes did not come up; see /var/log/slurm/slurmd.dftn*.log" >&2
    sinfo -p two >&2 || true
    exit 1
}

case ${1:-} in
    up) up ;;
    down) down ;;
    kill) _kill_node "${2:?node number}" ;;
    start) _start_slurmd "${2:?node number}" ;;
    *) echo "usage: $0 up|down|kill N|start N" >&2; exit 2 ;;
esac
