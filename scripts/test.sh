#!/usr/bin/env bash
# The test command of README.md: installs what a fresh machine lacks for the
# tests (scripts/test-tools.sh), then runs every test of the workspace.
# Arguments go to cargo test (e.g. `bash scripts/test.sh --test it records`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-tools.sh
# pip --user installs land here.
export PATH="$PATH:$HOME/.local/bin"
exec cargo test --workspace "$@"
