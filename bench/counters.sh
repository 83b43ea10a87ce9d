#!/usr/bin/env bash
# Benchmark of counter increments through the HTTP API (release build), with
# the number of PostgreSQL statements per 1,000 increments, side by side with
# `redis-benchmark -t incr` against the same Redis (the floor: one bare Redis
# command per request, no HTTP, no script, no journal).
#
#   bash bench/counters.sh
#   BENCH_INCREMENTS=50000 BENCH_CLIENTS=64 bash bench/counters.sh
#
# Needs: initdb/pg_ctl/psql (PostgreSQL 15 with pg_stat_statements),
# redis-server, redis-cli, redis-benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_INCREMENTS=${BENCH_INCREMENTS:-20000} BENCH_CLIENTS=${BENCH_CLIENTS:-32} BENCH_SCOPES=${BENCH_SCOPES:-100}
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | head -1)")
WORK=$(mktemp -d)
chmod 755 "$WORK"
RUN_AS=()
if [ "$(id -u)" = 0 ]; then RUN_AS=(runuser -u postgres --); chown postgres "$WORK"; fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); REDIS_PORT=$(free_port); PORT=$(free_port)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet
cargo bench --quiet --bench increments --no-run 2>/dev/null
"${RUN_AS[@]}" "$PGBIN/initdb" -D "$WORK/pg" -U postgres -A trust >/dev/null
"${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w -o "-p $PG_PORT -k $WORK \
  -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements" start >/dev/null
redis-server --port "$REDIS_PORT" --appendonly yes --appendfsync everysec --dir "$WORK" \
  --daemonize yes --logfile "$WORK/redis.log" >/dev/null
PSQL=(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qAt -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION pg_stat_statements"

export ADMIN_TOKEN=bench-admin-token-0123456789 HYBRIDSTORE_ADMIN_TOKEN=bench-admin-token-0123456789
export HYBRIDSTORE_URL="http://127.0.0.1:$PORT" RUST_LOG=warn
PORT=$PORT DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres" \
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT" ./target/release/hybridstore serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do ./target/release/hybridstore ping && break; sleep 0.1; done

baseline=$(redis-benchmark -p "$REDIS_PORT" -t incr -n 100000 -c "$BENCH_CLIENTS" -q | tr -d '\r' | grep -oE '[0-9.]+ requests per second' | grep -oE '^[0-9.]+')
"${PSQL[@]}" -c "SELECT pg_stat_statements_reset()" >/dev/null
result=$(cargo bench --quiet --bench increments 2>/dev/null | grep per_second)
# Wait until every journaled increment is in PostgreSQL.
backlog() { for k in $(redis-cli -p "$REDIS_PORT" --scan --pattern '*:counters'); do redis-cli -p "$REDIS_PORT" XLEN "$k"; done | awk '{s+=$1} END {print s+0}'; }
for _ in $(seq 300); do [ "$(backlog)" = 0 ] && break; sleep 0.1; done
statements=$("${PSQL[@]}" -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
  WHERE query ~* '(counters|counter_ops)' AND query !~* 'pg_stat_statements'")
total=$("${PSQL[@]}" -c "SELECT sum(value) FROM counters WHERE granularity = 'total' AND field = 'requests'")

per_second=$(sed -E 's/.*per_second=([0-9]+).*/\1/' <<<"$result")
printf '\n%-44s %14s\n' "what" "per second"
printf '%-44s %14s\n' "redis-benchmark -t incr (c=$BENCH_CLIENTS)" "$baseline"
printf '%-44s %14s\n' "hybridstore increments over HTTP (c=$BENCH_CLIENTS)" "$per_second"
printf '\n%s\n' "$result"
printf 'PostgreSQL statements on counters: %s for %s increments = %s per 1,000 (requests counted: %s)\n' \
  "$statements" "$BENCH_INCREMENTS" "$(python3 -c "print(round($statements * 1000 / $BENCH_INCREMENTS, 1))")" "$total"
