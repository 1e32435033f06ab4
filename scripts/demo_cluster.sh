#!/usr/bin/env bash
# make demo-cluster: bring up N hosts (default 3) joined by RATE links (default 100mbit), run the
# quickstart comparison across them with horovodrun over ssh, and take the hosts down again,
# also when the run fails or is interrupted.
#
# Streaming rounds (issue 22): with DEMO_DELAY and/or DEMO_FRAGMENTS set, the demo then runs the
# 6.3M-parameter MLP of benchmarks/bench_cluster.py at the same rate: PyTorch's PostLocalSGD,
# plain DistributedLocalSGD and the streaming variant, all at DEMO_INTERVAL (default 16), and
# the no-communication ceiling, DEMO_REPEATS interleaved repeats (default 1). DEMO_WIRE=int8 or
# fp16 sends compressed deltas (DEMO_FP16=1 is DEMO_WIRE=fp16). DEMO_QUICKSTART=0 skips the
# quickstart. For example:
#     DEMO_DELAY=8 DEMO_FRAGMENTS=4 DEMO_WIRE=int8 make demo-cluster
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${1:-3}
rate=${2:-100mbit}
name=prsgddemo
interval=${DEMO_INTERVAL:-16}
variant=""
if [ -n "${DEMO_DELAY:-}" ] || [ -n "${DEMO_FRAGMENTS:-}" ]; then
  variant="ours${interval}"
  [ "${DEMO_FRAGMENTS:-1}" != 1 ] && variant+="f${DEMO_FRAGMENTS}"
  [ "${DEMO_DELAY:-0}" != 0 ] && variant+="d${DEMO_DELAY}"
  wire=${DEMO_WIRE:-}
  [ -z "$wire" ] && [ "${DEMO_FP16:-0}" = 1 ] && wire=fp16
  case "$wire" in ""|fp16|int8) variant+="$wire" ;;
    *) echo "demo-cluster: DEMO_WIRE must be fp16, int8 or empty, got '$wire'" >&2; exit 2 ;;
  esac
fi
cluster() { python3 scripts/cluster.py --name "$name" "$@"; }
trap 'cluster down' EXIT
if [ "${DEMO_QUICKSTART:-1}" != 0 ]; then
  cluster up "$hosts" "$rate"
  cluster hvd 1 env OMP_NUM_THREADS=1 PYTHONPATH="$PWD" \
    horovodrun -np "$hosts" -H "$(cluster hosts 1)" --gloo --network-interface eth0 \
    "$PWD/.venv/bin/python" examples/quickstart.py ${DEMO_ARGS:-}
  cluster down
fi
if [ -n "$variant" ]; then
  # Its own cluster (bench_cluster.py brings up and takes down 'prsgdbench').
  echo "[demo-cluster] streaming rounds: $variant against plsgd$interval and ours$interval at $rate"
  "$PWD/.venv/bin/python" benchmarks/bench_cluster.py --hosts "$hosts" --rates "$rate" \
    --models mlp6m --variants "plsgd$interval" "ours$interval" "$variant" nocomm \
    --repeats "${DEMO_REPEATS:-1}" --steps 48
fi
