#!/usr/bin/env bash
# A local multi-node Ray cluster for trying `lifelong submit` against: a head plus N worker nodes,
# all processes on this machine, token authentication on.
#   cluster/local.sh start [N]   (default N=1) → prints the address and how to submit
#   cluster/local.sh stop        stops only the processes this script started (each node is its own
#                                process group, whose leader's pid is in $STATE)
set -euo pipefail
PROJECT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$PROJECT/.venv/bin"
STATE="${LIFELONG_LOCAL_CLUSTER:-/tmp/lifelong-local-cluster}"
export PATH="$BIN:$PATH" RAY_AUTH_MODE=token
case "${1:-start}" in
  start)
    test -x "$BIN/ray" || { echo "run 'make setup' first" >&2; exit 2; }
    test -s "$HOME/.ray/auth_token" || "$BIN/ray" get-auth-token --generate >/dev/null
    mkdir -p "$STATE"
    setsid nohup "$BIN/ray" start --head --block --port=6380 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
      --num-cpus=2 --temp-dir="$STATE/ray" >"$STATE/head.log" 2>&1 &
    echo $! >"$STATE/head.pid"
    for _ in $(seq 60); do "$BIN/ray" status --address=127.0.0.1:6380 >/dev/null 2>&1 && break; sleep 1; done
    for i in $(seq "${2:-1}"); do
      setsid nohup "$BIN/ray" start --block --address=127.0.0.1:6380 --num-cpus=2 \
        --dashboard-agent-listen-port=$((52400 + i)) --metrics-export-port=$((52500 + i)) >"$STATE/worker-$i.log" 2>&1 &
      echo $! >"$STATE/worker-$i.pid"
    done
    echo "Ray cluster up: dashboard http://127.0.0.1:8265 (token in ~/.ray/auth_token)"
    echo "  .venv/bin/lifelong submit pretrain configs/gpt2/tiny_pretrain.yaml storage.root=\$PWD/lifelong-store --address http://127.0.0.1:8265"
    ;;
  stop)
    for f in "$STATE"/worker-*.pid "$STATE"/head.pid; do
      [ -f "$f" ] || continue
      kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
      sleep 3
      kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *) echo "usage: $0 start [WORKER_NODES] | stop" >&2; exit 2 ;;
esac
