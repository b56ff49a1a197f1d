#!/usr/bin/env bash
# rustspeed-comm's shm collectives next to OpenMPI's for the same buffers, in one run.
# Needs openmpi-bin and libopenmpi-dev (apt). Usage: tools/bench/collectives.sh [iters]
set -euo pipefail
cd "$(dirname "$0")/../.."
iters=${1:-10}
cargo build --release -q -p rustspeed-comm --example bench_collectives
mpicc -O2 -o target/release/mpi_collectives tools/bench/mpi_collectives.c
echo "## $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/examples/bench_collectives --ranks 2 --iters "$iters"
echo
mpirun --allow-run-as-root -np 2 --bind-to none target/release/mpi_collectives "$iters" 16 64 256
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
