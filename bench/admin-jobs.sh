#!/usr/bin/env bash
# Benchmark of the admin jobs: sync (both directions) and the consistency
# check over 10,000 and 100,000 records, with the server's peak RSS per size.
#
# Each size gets a fresh server process (so its peak RSS belongs to that size)
# on a fresh database and key prefix. Beside the job figures, the script
# measures the raw read speed of each store on the same data (psql COPY of the
# records table, redis-cli --scan of the copies) as the baseline the jobs are
# bounded by.
#
#   bash bench/admin-jobs.sh            # sizes 10000 100000
#   SIZES="1000 10000" bash bench/admin-jobs.sh
#
# Needs: initdb/pg_ctl/psql (PostgreSQL 15), redis-server, redis-cli.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
SIZES=${SIZES:-"10000 100000"}

cargo build --release --quiet
start_postgres fsync=off
start_redis --save '' --appendonly no

peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

printf '\n%-9s %-34s %12s %10s\n' records step records/s seconds
for n in $SIZES; do
  db="bench_$n"
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE $db"
  start_server "$db" "b$n"
  start_rss=$(rss_mib "$SERVER_PID")

  # The data set: n records of ~250 bytes, written straight into PostgreSQL.
  "${RUN_AS[@]}" "${PSQL[@]}" -d "$db" -c "INSERT INTO records
    (collection, id, version, created_version, data, created_at, updated_at)
    SELECT 'accounts', 'r' || lpad(g::text, 7, '0'), g, g,
      jsonb_build_object('i', g, 'owner', 'user' || (g % 977), 'pad', repeat('x', 200)),
      now(), now() FROM generate_series(1, $n) g"

  t0=$(now); "${RUN_AS[@]}" "${PSQL[@]}" -d "$db" -c "\\copy (SELECT * FROM records) TO '/dev/null'"; t1=$(now)
  printf '%-9s %-34s %12s %10.2f\n' "$n" "baseline: psql COPY of the table" "$(rate "$n" "$t0" "$t1")" "$(secs "$t0" "$t1")"

  t0=$(now); "$BIN" --json sync --source postgres --target redis >/dev/null; t1=$(now)
  printf '%-9s %-34s %12s %10.2f\n' "$n" "sync postgres -> redis (writes)" "$(rate "$n" "$t0" "$t1")" "$(secs "$t0" "$t1")"

  t0=$(now); copies=$(redis-cli -p "$REDIS_PORT" --scan --pattern "b$n:*:r:accounts:*" | wc -l); t1=$(now)
  printf '%-9s %-34s %12s %10.2f\n' "$n" "baseline: redis-cli --scan ($copies)" "$(rate "$copies" "$t0" "$t1")" "$(secs "$t0" "$t1")"

  t0=$(now); "$BIN" --json check-consistency >/dev/null; t1=$(now)
  printf '%-9s %-34s %12s %10.2f\n' "$n" "consistency check (both passes)" "$(rate "$n" "$t0" "$t1")" "$(secs "$t0" "$t1")"

  t0=$(now); "$BIN" --json sync --source redis --target postgres >/dev/null; t1=$(now)
  printf '%-9s %-34s %12s %10.2f\n' "$n" "sync redis -> postgres (no-op)" "$(rate "$n" "$t0" "$t1")" "$(secs "$t0" "$t1")"

  printf '%-9s %-34s %12s\n' "$n" "server RSS at start / peak (MiB)" "$start_rss / $(peak_rss_mib "$SERVER_PID")"
  stop_server
done
