#!/usr/bin/env bash
# A local multi-node Ray cluster for trying `lifelong submit` against: a head plus N worker nodes,
# all processes on this machine, token authentication on.
#   cluster/local.sh start [N]   (default N=1) → returns once the dashboard answers and every node
#                                has joined, then prints the address and how to submit
#   cluster/local.sh stop        stops only the processes this script started (each node is its own
#                                process group, whose leader's pid is in $STATE)
#   cluster/local.sh ports [N]   the fixed ports a start binds; a start refuses at once, naming it,
#                                when one is taken
# Each node has its own temp directory: nodes that shared one would share the directory Ray unpacks
# a job's working directory into, and one node's clean-up would delete it under the other.
# The head's ports other than 6380 and 8265 are set too, away from Ray's defaults, so that another
# Ray on this machine (an embedded one of `lifelong pretrain`, say) does not collide with it, and
# below the kernel's ephemeral range (32768-60999 on Linux): a port in it may be any process's
# outgoing connection or another Ray's randomly chosen listener, and a head whose metrics port was
# taken waited 30 s for its raylet and died ("timed out during startup").
set -euo pipefail
shopt -s nullglob
PROJECT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$PROJECT/.venv/bin"
STATE="${LIFELONG_LOCAL_CLUSTER:-/tmp/lifelong-local-cluster}"
export PATH="$BIN:$PATH" RAY_AUTH_MODE=token

nodes_up() { timeout 15 "$BIN/ray" status --address=127.0.0.1:6380 2>/dev/null | grep -cE '^ *1 node_' || true; }
AGENT_PORT=28400 METRICS_PORT=28500 CLIENT_PORT=10001
ports() {
  echo 6380 8265 "$CLIENT_PORT" "$AGENT_PORT" "$METRICS_PORT"
  for i in $(seq "$1"); do echo $((AGENT_PORT + i)) $((METRICS_PORT + i)); done
}
taken() {  # the first of the given ports that something on this machine holds
  "$BIN/python" - "$@" <<'PY'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", int(port)))
        except OSError:
            print(port)
            break
PY
}
holder() {  # who listens on port $1: "pid N (command)", where this machine lets us see it
  "$BIN/python" - "$1" <<'PY'
import sys
try:
    import psutil
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == int(sys.argv[1]) and c.pid:
            p = psutil.Process(c.pid)
            print(f"held by pid {c.pid} ({' '.join(p.cmdline())[:200]})")
            break
except Exception:
    pass
PY
}
alive() { for f in "$STATE"/head.pid "$STATE"/worker-*.pid; do kill -0 "$(cat "$f")" 2>/dev/null || return 1; done; }
fail() {
  echo "the cluster did not come up ($1); the logs' last lines (all in $STATE):" >&2
  tail -n 5 "$STATE"/*.log >&2
  "$0" stop
  exit 1
}
# No worker per CPU started up front for each job's driver (as lifelong's embedded Ray): each
# starts when a task or actor first needs it.
start_head() {
  setsid nohup "$BIN/ray" start --head --block --port=6380 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
    --system-config='{"prestart_worker_first_driver": false}' \
    --dashboard-agent-listen-port="$AGENT_PORT" --metrics-export-port="$METRICS_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --num-cpus=2 --temp-dir="$STATE/ray" >"$STATE/head.log" 2>&1 &
  echo $! >"$STATE/head.pid"
}
start_worker() {
  setsid nohup "$BIN/ray" start --block --address=127.0.0.1:6380 --num-cpus=2 --temp-dir="$STATE/ray-$1" \
    --dashboard-agent-listen-port=$((AGENT_PORT + $1)) --metrics-export-port=$((METRICS_PORT + $1)) >"$STATE/worker-$1.log" 2>&1 &
  echo $! >"$STATE/worker-$1.pid"
}
# Ray gives a node's raylet a fixed 30 s to register, then `ray start` exits ("timed out during
# startup"): on a machine loaded far past its cores (CI's 2 cores under `make test`) a node can
# miss it. Such a node, and only such, is started again, twice at most; its log is kept.
late_node_again() {
  for f in "$STATE"/head.pid "$STATE"/worker-*.pid; do
    kill -0 "$(cat "$f")" 2>/dev/null && continue
    node="$(basename "$f" .pid)"
    grep -q "timed out during startup" "$STATE/$node.log" || return 1
    tries="$(cat "$STATE/$node.tries" 2>/dev/null || echo 0)"
    [ "$tries" -lt 2 ] || return 1
    echo $((tries + 1)) >"$STATE/$node.tries"
    kill -KILL -- "-$(cat "$f")" 2>/dev/null || true  # what it had half started
    mv "$STATE/$node.log" "$STATE/$node.log.$tries"
    echo "node $node did not start within Ray's 30 s (load average $(cut -d' ' -f1 /proc/loadavg)): starting it again" >&2
    if [ "$node" = head ]; then start_head; else start_worker "${node#worker-}"; fi
  done
}
dashboard_up() {
  "$BIN/python" - <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=2)
except urllib.error.HTTPError:
    pass  # it answers (401 without a token): it is up
except OSError:
    sys.exit(1)
PY
}

case "${1:-start}" in
  start)
    test -x "$BIN/ray" || { echo "run 'make setup' first" >&2; exit 2; }
    workers="${2:-1}"
    busy="$(taken $(ports "$workers"))"
    if [ -n "$busy" ]; then
      echo "port $busy is taken on this machine (cluster/local.sh binds: $(ports "$workers" | xargs)) $(holder "$busy"); stop what holds it, or the cluster started before (cluster/local.sh stop)" >&2
      exit 1
    fi
    test -s "$HOME/.ray/auth_token" || "$BIN/ray" get-auth-token --generate >/dev/null
    mkdir -p "$STATE"
    rm -f "$STATE"/*.tries
    start_head
    for i in $(seq "$workers"); do
      for _ in $(seq 60); do alive || late_node_again || fail "a node exited"; [ "$(nodes_up)" -ge 1 ] && break; sleep 1; done
      start_worker "$i"
    done
    up=""
    for _ in $(seq 120); do
      alive || late_node_again || fail "a node exited"
      [ "$(nodes_up)" -ge $((workers + 1)) ] && dashboard_up && up=1 && break
      sleep 1
    done
    [ -n "$up" ] || fail "$(nodes_up) of $((workers + 1)) nodes after 120 s"
    echo "Ray cluster up: $((workers + 1)) nodes, dashboard http://127.0.0.1:8265 (token in ~/.ray/auth_token)"
    echo "  .venv/bin/lifelong submit pretrain configs/gpt2/tiny_pretrain.yaml storage.root=\$PWD/lifelong-store --carry-data --address http://127.0.0.1:8265"
    ;;
  stop)
    stopped=0
    for f in "$STATE"/worker-*.pid "$STATE"/head.pid; do
      [ -f "$f" ] || continue
      kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
      sleep 3
      kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
      stopped=$((stopped + 1))
    done
    # Returns once the nodes' ports are free again, so that a start right after finds them free:
    # on CI (2026-12-04) a start just after a stop found the head's agent port still held.
    if [ "$stopped" -gt 0 ]; then
      for _ in $(seq 60); do busy="$(taken $(ports "$((stopped - 1))"))"; [ -z "$busy" ] && break; sleep 1; done
      [ -z "$busy" ] || echo "cluster/local.sh stop: port $busy is still taken 60 s after the nodes were stopped $(holder "$busy")" >&2
    fi
    ;;
  ports) ports "${2:-1}" | xargs ;;
  *) echo "usage: $0 start [WORKER_NODES] | stop | ports [WORKER_NODES]" >&2; exit 2 ;;
esac
