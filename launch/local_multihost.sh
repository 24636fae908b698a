#!/usr/bin/env bash
# Runs N local processes of one multi-host JAX program, each with D CPU devices, the way a TPU pod
# runs one process per host: process i gets --coordinator/--num_processes/--process_id appended.
#
# Usage: launch/local_multihost.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT]
#                                  [-l LOG_DIR] -- COMMAND [ARGS...]
#   e.g. launch/local_multihost.sh -n 2 -d 4 -- python launch/train.py \
#          --config configs/demo.py:runlocal --workdir runs/mh
#
# COMMAND must accept --coordinator HOST:PORT --num_processes N --process_id I (launch/train.py
# does). Logs go to LOG_DIR/process_I.log (default: a new temporary directory); process 0's log is
# also streamed to stdout. Exits with the first non-zero status; when one process fails the others
# are stopped (they would otherwise wait for it in a collective).
set -euo pipefail

usage() {
  sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

num=2
devices=4
port=""
log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
[[ $# -ge 1 ]] || usage
[[ "$num" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || usage

python_bin="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  # A free port from the OS (the standard library only: works with any python3).
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d -t flowtok_multihost.XXXXXX)}"
mkdir -p "$log_dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < num; i++)); do
  # Every process sees only its own CPU devices; JAX_PLATFORMS keeps libtpu (if installed) quiet.
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" JAX_NUM_CPU_DEVICES="$devices" \
    "$@" --coordinator "127.0.0.1:$port" --num_processes "$num" --process_id "$i" \
    >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $num processes (pids ${pids[*]}), coordinator 127.0.0.1:$port, logs in $log_dir" >&2

tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
tail_pid=$!

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  # The first process to finish decides: a failure stops the rest. Polled, not `wait -n`: bash
  # may reap two children at once, and `wait -n PID...` then says "no such job" for the second.
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
      continue
    fi
    set +e
    wait "$pid"  # The saved exit status, also of a child bash has already reaped.
    rc=$?
    set -e
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "process with pid $pid failed (exit $rc); stopping the others" >&2
      cleanup
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  if [[ ${#remaining[@]} -gt 0 ]]; then
    sleep 0.2
  fi
done
wait "$tail_pid" 2>/dev/null || true
for ((i = 1; i < num; i++)); do
  if [[ $status -ne 0 ]]; then
    echo "--- process $i log (tail) ---" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
  fi
done
exit "$status"
