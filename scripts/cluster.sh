#!/usr/bin/env bash
# Command-line face of scripts/cluster.py (the one implementation): N hosts on this machine as
# network namespaces with sshd and tbf-shaped links. Run `scripts/cluster.sh -h` for the commands.
exec python3 "$(dirname "${BASH_SOURCE[0]}")/cluster.py" "$@"
