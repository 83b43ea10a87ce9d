#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine lacks, and nothing
# else: redis-server and the PostgreSQL 15 server binaries (the tests start
# their own servers from them on free loopback ports), promtool and
# docker-compose (they check the deployment files offline), schemathesis
# (pinned; it fuzzes the API from its OpenAPI document), Node.js and npm
# with the TypeScript client's locked packages (its tests run against the
# service). apt, pip and npm, as root or through sudo. Run by
# scripts/test.sh; safe to run again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
SCHEMATHESIS_PIN='schemathesis==4.32.5'
has_schemathesis() { schemathesis --version 2>/dev/null | grep -q '4.32.5'; }

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  packages+=(postgresql)
fi
if ! has_schemathesis && ! command -v pip3 >/dev/null 2>&1; then
  packages+=(python3-pip)
fi

as_root=()
if [ "$(id -u)" != 0 ]; then
  if [ ${#packages[@]} -gt 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "scripts/test-tools.sh: missing ${packages[*]}; install them as root (apt-get install ${packages[*]})" >&2
    exit 1
  fi
  as_root=(sudo)
fi

if [ ${#packages[@]} -gt 0 ]; then
  echo "installing ${packages[*]}" >&2
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if ! has_schemathesis; then
  echo "installing $SCHEMATHESIS_PIN" >&2
  user=()
  [ "$(id -u)" = 0 ] || user=(--user)
  pip3 install --quiet "${user[@]}" "$SCHEMATHESIS_PIN" 2>/dev/null \
    || pip3 install --quiet "${user[@]}" --break-system-packages "$SCHEMATHESIS_PIN"
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
fi

# The TypeScript client's packages, exactly as locked (again only when the
# lock file changed since).
client=clients/typescript
if [ ! -f "$client/node_modules/.package-lock.json" ] \
  || [ "$client/package-lock.json" -nt "$client/node_modules/.package-lock.json" ]; then
  echo "installing the TypeScript client's packages (npm ci)" >&2
  (cd "$client" && npm ci --no-audit --no-fund --loglevel=error)
fi

# PostgreSQL refuses to run as root; as root the testkit runs it as 'postgres'.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
