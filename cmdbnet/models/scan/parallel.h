/* Work split for the C library's entry points: each takes a range of units [lo, hi) and runs it
 * in a few slices per thread. Built with OpenMP, the slices run on the process's OpenMP team:
 * torch's own (its libgomp is already loaded when the library is, and the library links to it
 * by the same name), so the threads that just ran a torch op, still spinning, take them at once
 * instead of competing for the cores with threads of ours. (Where torch uses another OpenMP
 * runtime, this one brings its own threads: still correct, as with the Python pool.) Without
 * OpenMP they run in the calling thread, and the Python side splits the units over its own
 * worker threads. */
#ifndef CMDB_PARALLEL_H
#define CMDB_PARALLEL_H
#include <stdint.h>

extern int cmdb_threads;  /* set from torch.get_num_threads() before each call (cmdb_set_threads) */

/* return RANGE (an int expression of a_ and b_, 0 on success) over [lo, hi) in slices. */
#define CMDB_SLICED(lo, hi, RANGE) do {                                                           \
        const int64_t n_ = (hi) - (lo), s4_ = 4 * (int64_t)cmdb_threads;                          \
        const int64_t slices_ = n_ < s4_ ? n_ : s4_;                                              \
        int err_ = 0;                                                                             \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(cmdb_threads) reduction(|:err_)") \
        for (int64_t s_ = 0; s_ < slices_; s_++) {                                                \
            const int64_t a_ = (lo) + n_ * s_ / slices_, b_ = (lo) + n_ * (s_ + 1) / slices_;     \
            err_ |= (RANGE) != 0;                                                                 \
        }                                                                                         \
        return err_ ? -1 : 0;                                                                     \
    } while (0)

#endif
