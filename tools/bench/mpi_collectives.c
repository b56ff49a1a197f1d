/* OpenMPI's figure for the same buffers as rustspeed-comm's bench_collectives, same formulas.
 *
 *   mpicc -O2 -o /tmp/mpi_collectives tools/bench/mpi_collectives.c
 *   mpirun --allow-run-as-root -np 2 --bind-to none /tmp/mpi_collectives [iters] [sizes MiB...]
 *
 * S = bytes of the full buffer, t = median over iterations of the slowest rank,
 * algbw = S / t; busbw = algbw * (n-1)/n (reduce_scatter, all_gather), * 2(n-1)/n (all_reduce).
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, ws;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ws);
    int iters = argc > 1 ? atoi(argv[1]) : 10;
    int default_sizes[] = {16, 64, 256};
    int nsizes = argc > 2 ? argc - 2 : 3;
    double *t = malloc(sizeof(double) * (iters + 1));
    if (rank == 0) {
        printf("# OpenMPI, %d ranks, f32, median of %d iterations; busbw per nccl-tests\n", ws, iters);
        printf("| op | size | time | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|\n");
    }
    for (int s = 0; s < nsizes; s++) {
        int mb = argc > 2 ? atoi(argv[s + 2]) : default_sizes[s];
        size_t bytes = (size_t)mb << 20, n = bytes / 4, c = n / ws;
        float *x = malloc(bytes), *full = malloc(bytes), *piece = malloc(c * 4);
        for (size_t i = 0; i < n; i++) x[i] = 0.5f + rank + (float)(i % 7);
        memset(full, 0, bytes);
        memset(piece, 0, c * 4);
        for (int op = 0; op < 3; op++) {
            for (int k = 0; k <= iters; k++) {
                MPI_Barrier(MPI_COMM_WORLD);
                double t0 = MPI_Wtime();
                if (op == 0)
                    MPI_Reduce_scatter_block(x, piece, (int)c, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                else if (op == 1)
                    MPI_Allgather(piece, (int)c, MPI_FLOAT, full, (int)c, MPI_FLOAT, MPI_COMM_WORLD);
                else
                    MPI_Allreduce(MPI_IN_PLACE, full, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                t[k] = MPI_Wtime() - t0;
            }
            qsort(t + 1, iters, sizeof(double), cmp);
            double med = t[1 + iters / 2], slowest;
            MPI_Allreduce(&med, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            double alg = bytes / slowest / 1e9;
            double factor = op == 2 ? 2.0 * (ws - 1) / ws : (double)(ws - 1) / ws;
            const char *name = op == 0 ? "reduce_scatter" : op == 1 ? "all_gather" : "all_reduce";
            if (rank == 0)
                printf("| %s | %d MiB | %.2f ms | %.2f | %.2f |\n", name, mb, slowest * 1e3, alg, alg * factor);
        }
        free(x);
        free(full);
        free(piece);
    }
    free(t);
    MPI_Finalize();
    return 0;
}
