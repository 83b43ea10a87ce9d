#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine lacks, and nothing
# else: redis-server and the PostgreSQL 15 server binaries (the tests start
# their own servers from them on free loopback ports), promtool and
# docker-compose (they check the deployment files offline), schemathesis
# (pinned; it fuzzes the API from its OpenAPI document). apt and pip, as
# root or through sudo. Run by scripts/test.sh; safe to run again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
SCHEMATHESIS_PIN='schemathesis==4.32.5'
has_schemathesis() { schemathesis --version 2>/dev/null | grep -q '4.32.5'; }

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
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

# PostgreSQL refuses to run as root; as root the testkit runs it as 'postgres'.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
