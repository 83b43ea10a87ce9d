# Shared by the benchmark scripts: a throw-away PostgreSQL and Redis on free
# loopback ports, and a release server in front of them. Source it from a
# script that has `set -euo pipefail`; everything goes when the script exits.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1 || command -v initdb)")
WORK=$(mktemp -d)
chmod 755 "$WORK"
RUN_AS=()
if [ "$(id -u)" = 0 ]; then RUN_AS=(runuser -u postgres --); chown postgres "$WORK"; fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); REDIS_PORT=$(free_port)
PSQL=(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qAt)
BIN=$PWD/target/release/hybridstore
SERVER_PID=
export ADMIN_TOKEN=bench-admin-token-0123456789 HYBRIDSTORE_ADMIN_TOKEN=bench-admin-token-0123456789
export RUST_LOG=warn

bench_cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

# start_postgres [extra postgres -c settings ...]
start_postgres() {
  local options="-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1"
  for setting in "$@"; do options+=" -c $setting"; done
  "${RUN_AS[@]}" "$PGBIN/initdb" -D "$WORK/pg" -U postgres -A trust >/dev/null
  "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w -o "$options" start >/dev/null
}

# start_redis [extra redis-server arguments ...]
start_redis() {
  redis-server --port "$REDIS_PORT" --dir "$WORK" --daemonize yes \
    --logfile "$WORK/redis.log" "$@" >/dev/null
}

# start_server DATABASE KEY_PREFIX: a release server on a free port, ready.
start_server() {
  local port
  port=$(free_port)
  PORT=$port DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$1" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" HYBRIDSTORE_REDIS__KEY_PREFIX="$2" \
    "$BIN" serve >"$WORK/server-$2.log" 2>&1 &
  SERVER_PID=$!
  export HYBRIDSTORE_URL="http://127.0.0.1:$port"
  for _ in $(seq 100); do "$BIN" ping && return; sleep 0.1; done
  echo "the server did not come up: $(tail -5 "$WORK/server-$2.log")" >&2
  return 1
}

stop_server() {
  kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=
}

now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 2))"; }
rate() { python3 -c "print(f'{$1/($3-$2):,.0f}')"; }
