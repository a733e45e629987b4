#!/usr/bin/env bash
# Installs the official RocketMQ 5 clients that tests/tests/rocketmq.rs
# drives, into DIR (default target/rocketmq-clients):
#   DIR/py          a venv with PyPI rocketmq-python-client
#   DIR/node        npm rocketmq-client-nodejs
#   DIR/rust-target the build of tests/rocketmq/rust (crates.io rocketmq 5.0.0)
# Needs python3 (with venv), node/npm and cargo; fetches from PyPI, npm and
# crates.io. Versions are pinned here and in tests/rocketmq/rust/Cargo.lock.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${1:-${HALFMQ_ROCKETMQ_CLIENTS:-$root/target/rocketmq-clients}}"
mkdir -p "$dir/home"

PY_CLIENT="rocketmq-python-client==5.1.2"
NODE_CLIENT="rocketmq-client-nodejs@1.0.8"

if [ ! -x "$dir/py/bin/python" ] || ! "$dir/py/bin/python" -c 'import rocketmq' 2>/dev/null; then
  echo "== RocketMQ Python client ($PY_CLIENT)"
  python3 -m venv "$dir/py"
  "$dir/py/bin/pip" install --quiet --disable-pip-version-check "$PY_CLIENT"
fi

if [ ! -d "$dir/node/node_modules/rocketmq-client-nodejs" ]; then
  echo "== RocketMQ Node.js client ($NODE_CLIENT)"
  mkdir -p "$dir/node"
  (cd "$dir/node" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --silent --no-audit --no-fund "$NODE_CLIENT")
fi

echo "== RocketMQ Rust client scenarios (rocketmq 5.0.0)"
CARGO_TARGET_DIR="$dir/rust-target" cargo build --quiet --locked \
  --manifest-path "$root/tests/rocketmq/rust/Cargo.toml"
echo "RocketMQ clients ready in $dir"
