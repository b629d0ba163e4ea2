/* Shadow-compare dirty tracker: see scan.h. */
#define _GNU_SOURCE
#include "scan.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef uint64_t v8u64 __attribute__((vector_size(64)));

/* Non-zero when the pages differ. GCC lowers the 64-byte vector type to SSE2 or
 * AVX2; target_clones picks the AVX2 body at load time on CPUs that have it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static int
page_differs(const uint8_t *a, const uint8_t *b, uint64_t n)
{
    v8u64 acc = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint64_t i = 0; i < n; i += 256) {
        v8u64 a0, a1, a2, a3, b0, b1, b2, b3;
        memcpy(&a0, a + i, 64);
        memcpy(&a1, a + i + 64, 64);
        memcpy(&a2, a + i + 128, 64);
        memcpy(&a3, a + i + 192, 64);
        memcpy(&b0, b + i, 64);
        memcpy(&b1, b + i + 64, 64);
        memcpy(&b2, b + i + 128, 64);
        memcpy(&b3, b + i + 192, 64);
        acc |= (a0 ^ b0) | (a1 ^ b1) | (a2 ^ b2) | (a3 ^ b3);
    }
    uint64_t r = 0;
    for (int k = 0; k < 8; k++)
        r |= acc[k];
    return r != 0;
}

struct job {
    struct scan_tracker *t;
    uint64_t first, last; /* page range [first, last) of this worker */
    uint64_t *found;      /* this worker's scratch */
    uint64_t count;       /* out: pages found */
    bool copy_all;        /* arm: copy everything, report nothing */
};

static void *
work(void *arg)
{
    struct job *j = arg;
    struct scan_tracker *t = j->t;
    uint64_t ps = t->page_size;

    j->count = 0;
    if (j->copy_all) {
        memcpy(t->shadow + j->first * ps, t->ram + j->first * ps, (j->last - j->first) * ps);
        return NULL;
    }
    for (uint64_t p = j->first; p < j->last; p++) {
        const uint8_t *src = t->ram + p * ps;
        uint8_t *dst = t->shadow + p * ps;
        if (page_differs(src, dst, ps)) {
            memcpy(dst, src, ps);
            j->found[j->count++] = p;
        }
    }
    return NULL;
}

static int
run_jobs(struct scan_tracker *t, bool copy_all, struct job *jobs)
{
    uint64_t npages = t->length / t->page_size;
    pthread_t th[CUJU_SCAN_MAX_THREADS];
    int started = 0;

    for (int i = 0; i < t->nthreads; i++) {
        jobs[i].t = t;
        jobs[i].first = npages * (uint64_t)i / (uint64_t)t->nthreads;
        jobs[i].last = npages * (uint64_t)(i + 1) / (uint64_t)t->nthreads;
        jobs[i].found = t->found[i];
        jobs[i].copy_all = copy_all;
        jobs[i].count = 0;
    }
    /* Worker 0 is the calling thread. */
    for (int i = 1; i < t->nthreads; i++) {
        if (pthread_create(&th[i], NULL, work, &jobs[i]) != 0)
            break;
        started = i;
    }
    work(&jobs[0]);
    /* Any worker that could not be started runs here, so the result is complete. */
    for (int i = started + 1; i < t->nthreads; i++)
        work(&jobs[i]);
    for (int i = 1; i <= started; i++)
        pthread_join(th[i], NULL);
    return 0;
}

int
scan_tracker_open(struct scan_tracker *t, const void *ram, uint64_t length, int nthreads)
{
    memset(t, 0, sizeof(*t));
    t->page_size = (uint64_t)sysconf(_SC_PAGESIZE);
    if (length == 0 || length % t->page_size || nthreads < 1)
        return -EINVAL;
    if (nthreads > CUJU_SCAN_MAX_THREADS)
        nthreads = CUJU_SCAN_MAX_THREADS;
    t->ram = ram;
    t->length = length;
    t->nthreads = nthreads;
    void *sh = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (sh == MAP_FAILED)
        return -errno;
    t->shadow = sh;
    uint64_t npages = length / t->page_size;
    for (int i = 0; i < nthreads; i++) {
        uint64_t share = npages * (uint64_t)(i + 1) / (uint64_t)nthreads - npages * (uint64_t)i / (uint64_t)nthreads;
        t->found[i] = malloc((share ? share : 1) * sizeof(uint64_t));
        if (t->found[i] == NULL) {
            scan_tracker_close(t);
            return -ENOMEM;
        }
    }
    return 0;
}

int
scan_tracker_arm(struct scan_tracker *t)
{
    struct job jobs[CUJU_SCAN_MAX_THREADS];
    if (t->shadow == NULL)
        return -EBADF;
    return run_jobs(t, true, jobs);
}

int64_t
scan_tracker_harvest(struct scan_tracker *t, uint64_t *out, uint64_t cap, bool *resync)
{
    struct job jobs[CUJU_SCAN_MAX_THREADS];
    uint64_t n = 0;
    int err;

    *resync = false;
    if (t->shadow == NULL)
        return -EBADF;
    if ((err = run_jobs(t, false, jobs)) < 0)
        return err;
    for (int i = 0; i < t->nthreads; i++) {
        for (uint64_t k = 0; k < jobs[i].count; k++) {
            if (n < cap)
                out[n] = jobs[i].found[k];
            n++;
        }
    }
    if (n > cap) {
        *resync = true;
        n = cap;
    }
    return (int64_t)n;
}

void
scan_tracker_close(struct scan_tracker *t)
{
    if (t->shadow != NULL)
        munmap(t->shadow, t->length);
    t->shadow = NULL;
    for (int i = 0; i < CUJU_SCAN_MAX_THREADS; i++) {
        free(t->found[i]);
        t->found[i] = NULL;
    }
}
