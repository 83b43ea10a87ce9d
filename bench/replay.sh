#!/usr/bin/env bash
# Benchmark of journal replay: how fast writes taken during a PostgreSQL
# outage reach PostgreSQL once it is back, beside a plain COPY of the same
# rows into a table of the same shape (the floor any replay is bounded by).
#
# A release server (dual_write) runs on a fresh PostgreSQL and Redis;
# PostgreSQL is killed, RECORDS writes go into the outage journal, PostgreSQL
# starts again, and the replay's own figures (entries, elapsed) are read from
# the server's log: the replay starts when the breaker closes and ends when
# the journal is empty, while nothing else runs.
#
#   bash bench/replay.sh                # 50000 records
#   RECORDS=20000 bash bench/replay.sh
#
# Needs: initdb/pg_ctl/psql (PostgreSQL 15), redis-server, python3.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RECORDS=${RECORDS:-50000}
export RUST_LOG=info

cargo build --release --quiet
start_postgres
start_redis --save '' --appendonly no
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench"
start_server bench r
admin() { curl -s -H "authorization: Bearer $ADMIN_TOKEN" "$HYBRIDSTORE_URL$1"; }

"${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null
for _ in $(seq 100); do
  admin /admin/database/health | grep -q '"durable":{[^}]*"state":"open"' && break
  sleep 0.1
done

# RECORDS distinct records of ~250 bytes, 16 connections (timed: each write
# into the outage journal also tries to publish its key past the open
# breaker, which a dead PostgreSQL refuses).
w0=$(now)
python3 - "$HYBRIDSTORE_URL" "$ADMIN_TOKEN" "$RECORDS" <<'PY'
import http.client, json, sys, threading, urllib.parse
url, token, n = urllib.parse.urlparse(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def work(start):
    c = http.client.HTTPConnection(url.hostname, url.port)
    for i in range(start, n, 16):
        body = json.dumps({"i": i, "owner": f"user{i % 977}", "pad": "x" * 200})
        c.request("PUT", f"/v1/collections/accounts/records/r{i:07d}", body,
                  {"authorization": f"Bearer {token}", "content-type": "application/json"})
        r = c.getresponse(); r.read()
        assert r.status in (200, 201), r.status
threads = [threading.Thread(target=work, args=(s,)) for s in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
PY
w1=$(now)
BACKLOG=$(admin /admin/database/status | python3 -c 'import json,sys; print(json.load(sys.stdin)["journal_backlog"]["outage"])')
[ "$BACKLOG" = "$RECORDS" ] || { echo "journaled $BACKLOG of $RECORDS" >&2; exit 1; }

"${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
for _ in $(seq 600); do
  grep -q 'journal replay finished' "$WORK/server-r.log" && break
  sleep 0.1
done
LINE=$(grep 'journal replay finished' "$WORK/server-r.log" | tail -1)
ENTRIES=$(sed -E 's/.*entries=([0-9]+).*/\1/' <<<"$LINE")
ELAPSED=$(sed -E 's/.*elapsed_ms=([0-9]+).*/\1/' <<<"$LINE")
ROWS=$("${PSQL[@]}" -d bench -c "SELECT count(*) FROM records")
[ "$ROWS" = "$RECORDS" ] || { echo "PostgreSQL holds $ROWS of $RECORDS" >&2; exit 1; }
stop_server

# The same rows, COPYed into an empty table of the same shape.
# (The stored columns only: the generated data_bytes is computed by COPY
# too, as it is by the replay.)
"${PSQL[@]}" -d bench -c "CREATE TABLE copy_target (LIKE records INCLUDING ALL)"
COLUMNS=$("${PSQL[@]}" -d bench -c "SELECT string_agg(quote_ident(column_name), ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = 'records' AND is_generated = 'NEVER'")
"${PSQL[@]}" -d bench -c "\\copy (SELECT $COLUMNS FROM records) TO '$WORK/rows.copy'"
t0=$(now)
"${RUN_AS[@]}" "${PSQL[@]}" -d bench -c "\\copy copy_target ($COLUMNS) FROM '$WORK/rows.copy'"
t1=$(now)

printf '\n%s journaled writes of ~250 bytes, replayed into PostgreSQL\n' "$RECORDS"
printf '%-28s %12s %10s\n' step rows/s seconds
printf '%-28s %12s %10s\n' "hybridstore replay" \
  "$(python3 -c "print(f'{$ENTRIES/($ELAPSED/1000):,.0f}')")" "$(python3 -c "print($ELAPSED/1000)")"
printf '%-28s %12s %10s\n' "psql COPY (same rows)" "$(rate "$RECORDS" "$t0" "$t1")" "$(secs "$t0" "$t1")"
printf '%-28s %12s %10s\n' "writes into the journal" "$(rate "$RECORDS" "$w0" "$w1")" "$(secs "$w0" "$w1")"
