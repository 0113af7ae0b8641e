#!/usr/bin/env bash
# Installs (or reuses) the pinned coding agents (package.json) into DIR and prints DIR/node_modules/.bin.
# Usage: tests/clients/agents/setup.sh [DIR]   (default /tmp/tollgate-agents)
#
#   TOLLGATE_AGENTS_BIN=$(tests/clients/agents/setup.sh | tail -n1) \
#       cargo test -p tollgate-tests --test agents -- --ignored
set -euo pipefail
dir="${1:-/tmp/tollgate-agents}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$dir"
cp "$here/package.json" "$dir/package.json"
want_codex=$(node -e 'console.log(require(process.argv[1]).dependencies["@openai/codex"])' "$dir/package.json")
want_claude=$(node -e 'console.log(require(process.argv[1]).dependencies["@anthropic-ai/claude-code"])' "$dir/package.json")
have_codex=$("$dir/node_modules/.bin/codex" --version 2>/dev/null | awk '{print $NF}' || true)
have_claude=$("$dir/node_modules/.bin/claude" --version 2>/dev/null | awk '{print $1}' || true)
if [ "$have_codex" != "$want_codex" ] || [ "$have_claude" != "$want_claude" ]; then
    (cd "$dir" && npm install --no-package-lock --no-audit --no-fund --loglevel=error >&2)
fi
echo "$dir/node_modules/.bin"
