#!/usr/bin/env bash
# Host discovery for examples/elastic.py: this machine, with as many slots as
# $PRSGD_SLOTS_FILE says (default 2). Change the file while the job runs to grow or shrink it.
slots=2
if [ -n "${PRSGD_SLOTS_FILE:-}" ] && [ -s "$PRSGD_SLOTS_FILE" ]; then
  slots=$(cat "$PRSGD_SLOTS_FILE")
fi
echo "localhost:${slots}"
