#!/usr/bin/env bash
# A local multi-process Ray cluster for trying `ray job submit` against: a head plus one worker.
#   cluster/local.sh start   → prints the address to use (RAY_ADDRESS / --address)
#   cluster/local.sh stop
set -euo pipefail
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
case "${1:-start}" in
  start)
    "$BIN/ray" start --head --num-cpus=2 --port=6380 --dashboard-host=127.0.0.1 --dashboard-port=8265
    "$BIN/ray" start --address=127.0.0.1:6380 --num-cpus=2
    echo "submit with: RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python jobs/pretrain.py configs/gpt2/tiny_pretrain.yaml"
    ;;
  stop) "$BIN/ray" stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
