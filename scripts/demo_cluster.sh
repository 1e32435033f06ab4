#!/usr/bin/env bash
# make demo-cluster: bring up N hosts (default 3) joined by RATE links (default 100mbit), run the
# quickstart comparison across them with horovodrun over ssh, and take the hosts down again,
# also when the run fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${1:-3}
rate=${2:-100mbit}
name=prsgddemo
cluster() { python3 scripts/cluster.py --name "$name" "$@"; }
trap 'cluster down' EXIT
cluster up "$hosts" "$rate"
cluster hvd 1 env OMP_NUM_THREADS=1 PYTHONPATH="$PWD" \
  horovodrun -np "$hosts" -H "$(cluster hosts 1)" --gloo --network-interface eth0 \
  "$PWD/.venv/bin/python" examples/quickstart.py ${DEMO_ARGS:-}
