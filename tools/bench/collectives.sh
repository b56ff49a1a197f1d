#!/usr/bin/env bash
# rustspeed-comm's shm collectives next to OpenMPI's for the same buffers, in one run.
# Needs openmpi-bin and libopenmpi-dev (apt).
#
#   tools/bench/collectives.sh [iters] [repeats] [world]
#
# Runs, `repeats` times in turn: this build's bench_collectives (f32, then bf16), OpenMPI's
# figure (f32), and, when BASELINE names another build of bench_collectives (e.g. main's,
# built with CARGO_TARGET_DIR elsewhere), that one too, so a machine shared with other work
# slows every side alike. The load average is printed with every figure.
set -euo pipefail
cd "$(dirname "$0")/../.."
iters=${1:-10}
repeats=${2:-1}
world=${3:-2}
cargo build --release -q -p rustspeed-comm --example bench_collectives
mpicc -O2 -o target/release/mpi_collectives tools/bench/mpi_collectives.c
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "## $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, world $world, load: $(load)"
for r in $(seq 1 "$repeats"); do
    if [ -n "${BASELINE:-}" ]; then
        echo "### repeat $r: baseline $BASELINE, load $(load)"
        "$BASELINE" --ranks "$world" --iters "$iters"
    fi
    for dt in f32 bf16; do
        echo "### repeat $r: this build, $dt, load $(load)"
        target/release/examples/bench_collectives --ranks "$world" --iters "$iters" --dtype "$dt"
    done
    echo "### repeat $r: OpenMPI, load $(load)"
    mpirun --allow-run-as-root --oversubscribe -np "$world" --bind-to none target/release/mpi_collectives "$iters" 16 64 256
done
echo "load after: $(load)"
