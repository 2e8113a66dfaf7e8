#!/usr/bin/env bash
# FORWARDER for /work/shared/bench/compare.sh and bench/run.py: the forwarder as a node on
# PostgreSQL (bench/pgnode.py up $PGNODE first). Every command gets $PGNODE/node.toml; before
# `serve`, a directory that bench/run.py built in SQLite is copied into PostgreSQL.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${PGNODE:?set PGNODE to the directory given to bench/pgnode.py up}"
export FORWARDER_CONFIG="$PGNODE/node.toml"
if [ "${1:-}" = serve ]; then
  state=""
  prev=""
  for arg in "$@"; do
    [ "$prev" = "--state-dir" ] && state=$arg
    prev=$arg
  done
  [ -z "$state" ] || "$here/../.venv/bin/python" "$here/pgnode.py" seed "$state" "$FORWARDER_CONFIG"
fi
exec "$here/../.venv/bin/forwarder" "$@"
