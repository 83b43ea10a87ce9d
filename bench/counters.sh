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
source "$(dirname "$0")/lib.sh"
export BENCH_INCREMENTS=${BENCH_INCREMENTS:-20000} BENCH_CLIENTS=${BENCH_CLIENTS:-32} BENCH_SCOPES=${BENCH_SCOPES:-100}

cargo build --release --quiet
cargo bench --quiet --bench increments --no-run 2>/dev/null
start_postgres shared_preload_libraries=pg_stat_statements
start_redis --appendonly yes --appendfsync everysec
"${PSQL[@]}" -d postgres -c "CREATE EXTENSION pg_stat_statements"
start_server postgres b

baseline=$(redis-benchmark -p "$REDIS_PORT" -t incr -n 100000 -c "$BENCH_CLIENTS" -q | tr -d '\r' | grep -oE '[0-9.]+ requests per second' | grep -oE '^[0-9.]+')
"${PSQL[@]}" -d postgres -c "SELECT pg_stat_statements_reset()" >/dev/null
result=$(cargo bench --quiet --bench increments 2>/dev/null | grep per_second)
# Wait until every journaled increment is in PostgreSQL.
backlog() { for k in $(redis-cli -p "$REDIS_PORT" --scan --pattern '*:counters'); do redis-cli -p "$REDIS_PORT" XLEN "$k"; done | awk '{s+=$1} END {print s+0}'; }
for _ in $(seq 300); do [ "$(backlog)" = 0 ] && break; sleep 0.1; done
statements=$("${PSQL[@]}" -d postgres -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
  WHERE query ~* '(counters|counter_ops)' AND query !~* 'pg_stat_statements'")
total=$("${PSQL[@]}" -d postgres -c "SELECT sum(value) FROM counters WHERE granularity = 'total' AND field = 'requests'")

per_second=$(sed -E 's/.*per_second=([0-9]+).*/\1/' <<<"$result")
printf '\n%-44s %14s\n' "what" "per second"
printf '%-44s %14s\n' "redis-benchmark -t incr (c=$BENCH_CLIENTS)" "$baseline"
printf '%-44s %14s\n' "hybridstore increments over HTTP (c=$BENCH_CLIENTS)" "$per_second"
printf '\n%s\n' "$result"
printf 'PostgreSQL statements on counters: %s for %s increments = %s per 1,000 (requests counted: %s)\n' \
  "$statements" "$BENCH_INCREMENTS" "$(python3 -c "print(round($statements * 1000 / $BENCH_INCREMENTS, 1))")" "$total"
