#!/usr/bin/env bash
# The test command: the whole workspace's tests (unit, integration, doc).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
