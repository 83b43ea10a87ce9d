#!/usr/bin/env bash
# Benchmark of export and import: 100,000 records through `hybridstore
# import` and `hybridstore export` against a release server, in embedded
# mode (SQLite + in-process cache) and in production mode (PostgreSQL +
# Redis), each on a fresh store.
#
# Beside each figure, the baseline the server is bounded by, measured in the
# same run on the same data: reading every row straight from the store
# (python's sqlite3 for embedded, psql COPY for production), and parsing the
# same NDJSON file without storing anything (python json, one core).
#
#   bash bench/transfer.sh              # 100000 records
#   RECORDS=20000 bash bench/transfer.sh
#
# Needs: initdb/pg_ctl/psql (PostgreSQL 15), redis-server, python3.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RECORDS=${RECORDS:-100000}

cargo build --release --quiet

# The data set: one export file of RECORDS records of ~250 bytes.
DATA="$WORK/data.ndjson"
python3 - "$RECORDS" "$DATA" <<'EOF'
import json, sys
n, path = int(sys.argv[1]), sys.argv[2]
at = "2026-11-22T00:00:00Z"
with open(path, "w") as out:
    out.write(json.dumps({"type": "header", "format": "hybridstore-export", "version": 1,
        "source": {"backend": "bench", "instance": "bench", "service_version": "0"},
        "created_at": at}) + "\n")
    for i in range(1, n + 1):
        out.write(json.dumps({"type": "record", "collection": "accounts",
            "id": f"r{i:07d}", "version": i, "created_at": at, "updated_at": at,
            "data": {"i": i, "owner": f"user{i % 977}", "pad": "x" * 200}}) + "\n")
    out.write(json.dumps({"type": "end", "records": {"accounts": n},
        "deletions": 0, "counters": 0}) + "\n")
EOF

t0=$(now); python3 -c "
import json, sys
for line in open(sys.argv[1]): json.loads(line)" "$DATA"; t1=$(now)
PARSE_RATE=$(rate "$RECORDS" "$t0" "$t1")

start_embedded() {
  local port
  port=$(free_port)
  mkdir -p "$WORK/embedded"
  (cd "$WORK/embedded" && PORT=$port "$BIN" serve >"$WORK/server-embedded.log" 2>&1) &
  SERVER_PID=$!
  export HYBRIDSTORE_URL="http://127.0.0.1:$port"
  for _ in $(seq 100); do "$BIN" ping && return; sleep 0.1; done
  echo "the server did not come up: $(tail -5 "$WORK/server-embedded.log")" >&2
  return 1
}

# measure MODE BASELINE_NAME BASELINE_COMMAND...: import, export, baseline.
declare -a ROWS
measure() {
  local mode=$1 baseline=$2; shift 2
  t0=$(now); "$BIN" import "$DATA" >/dev/null; t1=$(now)
  local import_rate; import_rate=$(rate "$RECORDS" "$t0" "$t1")
  t0=$(now); "$BIN" export --output "$WORK/out-$mode.ndjson" 2>/dev/null; t1=$(now)
  local export_rate; export_rate=$(rate "$RECORDS" "$t0" "$t1")
  local lines; lines=$(($(wc -l <"$WORK/out-$mode.ndjson") - 2))
  [ "$lines" = "$RECORDS" ] || { echo "exported $lines of $RECORDS records" >&2; exit 1; }
  t0=$(now); "$@" >/dev/null; t1=$(now)
  local baseline_rate; baseline_rate=$(rate "$RECORDS" "$t0" "$t1")
  ROWS+=("$(printf '%-11s %-7s %12s    %-26s %12s' "$mode" import "$import_rate" "parse NDJSON (python)" "$PARSE_RATE")")
  ROWS+=("$(printf '%-11s %-7s %12s    %-26s %12s' "$mode" export "$export_rate" "$baseline" "$baseline_rate")")
}

start_embedded
measure embedded "read rows (sqlite3)" python3 -c "
import sqlite3, sys
c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)
for row in c.execute('SELECT * FROM records'): pass" "$WORK/embedded/data/hybridstore.db"
stop_server

start_postgres
start_redis --save '' --appendonly no
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench"
start_server bench b
measure production "psql COPY out" "${RUN_AS[@]}" "${PSQL[@]}" -d bench -c "\\copy (SELECT * FROM records) TO '/dev/null'"
stop_server

printf '\n%s records of ~250 bytes; records/s (higher is better)\n' "$RECORDS"
printf '%-11s %-7s %12s    %-26s %12s\n' mode step records/s baseline records/s
printf '%s\n' "${ROWS[@]}"
