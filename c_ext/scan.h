/* Dirty tracking by comparison with a shadow copy (the fallback tracker).
 *
 * Works on any kernel and any mapping the caller can read: the caller maps the
 * guest-RAM file (shared) into its own process and hands its address here. The
 * tracker keeps a private shadow copy; each harvest compares every page with its
 * shadow (64-byte vector compares, AVX2 when the CPU has it, chosen at run time
 * by the loader), in `nthreads` threads, copies changed pages into the shadow and
 * reports their indexes. Cost is O(RAM size), whatever the number of dirty pages.
 * Harvest only while the VM is stopped (the Python layer enforces it).
 */
#ifndef CUJU_SCAN_H
#define CUJU_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CUJU_SCAN_MAX_THREADS 16

struct scan_tracker {
    /* Set by open; read-only afterwards. */
    const uint8_t *ram;  /* the caller's mapping; must outlive the tracker */
    uint8_t *shadow;     /* owned, private anonymous mapping */
    uint64_t length;     /* bytes, multiple of page_size */
    uint64_t page_size;
    int nthreads;
    /* Scratch per worker, written only by that worker during a harvest. */
    uint64_t *found[CUJU_SCAN_MAX_THREADS];
};

/* Allocate the shadow (not yet filled). Returns 0 or -errno. */
int scan_tracker_open(struct scan_tracker *t, const void *ram, uint64_t length, int nthreads);

/* Copy the whole region into the shadow: the next harvest reports pages that
 * differ from now. */
int scan_tracker_arm(struct scan_tracker *t);

/* Indexes (ascending) of pages that differ from the shadow, shadow updated.
 * Returns the count (at most cap; more sets *resync) or -errno. */
int64_t scan_tracker_harvest(struct scan_tracker *t, uint64_t *out, uint64_t cap, bool *resync);

void scan_tracker_close(struct scan_tracker *t);

#endif
