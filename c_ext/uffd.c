/* userfaultfd WP-async + PAGEMAP_SCAN dirty tracker. See uffd.h. */
#define _GNU_SOURCE
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SCAN_VEC_LEN 4096

/* Sync mode, lock held: page p's word of unprot/report/cooled may be non-zero now. */
static inline void
touch_summary(struct uffd_tracker *t, uint64_t p)
{
    uint64_t w = p / 64;
    t->summary_bm[w / 64] |= 1ULL << (w % 64);
}

int
uffd_create(bool user_mode_only)
{
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    int fd = (int)syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : fd;
}

int
uffd_probe(struct uffd_caps *caps, bool user_mode_only)
{
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    struct pm_scan_arg arg;
    int fd, pm;

    memset(caps, 0, sizeof(*caps));
    fd = uffd_create(user_mode_only);
    if (fd < 0) {
        caps->uffd_errno = -fd;
    } else {
        /* features = 0 asks for nothing and reports everything on offer. */
        if (ioctl(fd, UFFDIO_API, &api) == 0)
            caps->features = api.features;
        else
            caps->uffd_errno = errno;
        close(fd);
    }

    pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        return -errno;
    /* An empty range: the ioctl exists iff it does not fail with ENOTTY. */
    memset(&arg, 0, sizeof(arg));
    arg.size = sizeof(arg);
    arg.start = arg.end = 0;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    caps->pagemap_scan = ioctl(pm, PAGEMAP_SCAN, &arg) >= 0 || (errno != ENOTTY && errno != EINVAL);
    close(pm);
    return 0;
}

static void
record_removed(struct uffd_tracker *t, uint64_t from, uint64_t to)
{
    uint64_t lo = from > t->start ? from : t->start;
    uint64_t hi = to < t->start + t->length ? to : t->start + t->length;

    if (lo >= hi)
        return;
    uint64_t first = (lo - t->start) / t->page_size;
    uint64_t last = (hi - t->start + t->page_size - 1) / t->page_size;
    pthread_mutex_lock(&t->lock);
    t->events_remove++;
    t->any_removed = true;
    for (uint64_t p = first; p < last; p++) {
        uint64_t bit = 1ULL << (p % 64);
        t->removed_bm[p / 64] |= bit;
        if (t->mode == UFFD_MODE_SYNC) {
            /* A punched hole may have lost its protection marker: treat the page
             * as writable until it is protected again. */
            t->unprot_bm[p / 64] |= bit;
            t->report_bm[p / 64] |= bit;
            if (t->age[p] != UINT8_MAX) /* a queued page stays queued exactly once */
                t->age[p] = 0;
            touch_summary(t, p);
        }
    }
    pthread_mutex_unlock(&t->lock);
}

static void
mark_resync(struct uffd_tracker *t, int err)
{
    pthread_mutex_lock(&t->lock);
    t->resync = true;
    t->events_other++;
    if (err)
        t->thread_errno = err;
    pthread_mutex_unlock(&t->lock);
}

static bool
overlaps(const struct uffd_tracker *t, uint64_t from, uint64_t to)
{
    return from < t->start + t->length && to > t->start;
}

static int
writeprotect(const struct uffd_tracker *t, uint64_t first, uint64_t npages, bool protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = t->start + first * t->page_size, .len = npages * t->page_size},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (int tries = 0; tries < 100; tries++) {
        if (ioctl(t->uffd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
    }
    return -EAGAIN;
}

/* Sync mode: the target's thread waits on a write fault at page p. Record the page
 * first, then un-protect it (which wakes the thread). If that fails the thread would
 * fault for ever: un-protect the whole range and give up tracking (every harvest
 * from now on asks for a full resync). */
static void
resolve_fault(struct uffd_tracker *t, uint64_t addr)
{
    uint64_t p = (addr - t->start) / t->page_size;
    uint64_t bit = 1ULL << (p % 64);

    if (addr < t->start || p >= t->length / t->page_size) {
        mark_resync(t, 0);
        return;
    }
    pthread_mutex_lock(&t->lock);
    t->unprot_bm[p / 64] |= bit;
    t->report_bm[p / 64] |= bit;
    if (t->cooled_bm[p / 64] & bit) /* it was protected again too early */
        t->hold[p] = t->hold[p] >= UFFD_HOLD_MAX / 2 ? UFFD_HOLD_MAX : (uint8_t)(t->hold[p] * 2);
    t->age[p] = 0;
    touch_summary(t, p);
    t->faults++;
    pthread_mutex_unlock(&t->lock);
    int err = writeprotect(t, p, 1, false);
    if (err < 0) {
        pthread_mutex_lock(&t->lock);
        t->broken = true;
        t->resync = true;
        t->thread_errno = -err;
        pthread_mutex_unlock(&t->lock);
        writeprotect(t, 0, t->length / t->page_size, false);
    }
}

/* Read every queued event; caller holds read_lock. Returns 0, or -errno when
 * the fd is unusable. */
static int
drain_events_locked(struct uffd_tracker *t)
{
    struct uffd_msg msgs[64];

    for (;;) {
        ssize_t n = read(t->uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN)
                return 0;
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0 || n % (ssize_t)sizeof(msgs[0]) != 0)
            return -EIO;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
            const struct uffd_msg *m = &msgs[i];
            switch (m->event) {
            case UFFD_EVENT_REMOVE:
                record_removed(t, m->arg.remove.start, m->arg.remove.end);
                break;
            case UFFD_EVENT_UNMAP:
                if (overlaps(t, m->arg.remove.start, m->arg.remove.end))
                    mark_resync(t, 0);
                break;
            case UFFD_EVENT_REMAP:
                if (overlaps(t, m->arg.remap.from, m->arg.remap.from + m->arg.remap.len))
                    mark_resync(t, 0);
                break;
            case UFFD_EVENT_PAGEFAULT:
                if (t->mode == UFFD_MODE_SYNC && (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
                    resolve_fault(t, m->arg.pagefault.address & ~(t->page_size - 1));
                    break;
                }
                /* A fault we did not ask for (async mode resolves WP faults in the
                 * kernel): wake the thread, the tracker's assumptions no longer hold. */
                mark_resync(t, 0);
                {
                    struct uffdio_range wake = {.start = m->arg.pagefault.address & ~(t->page_size - 1),
                                                .len = t->page_size};
                    ioctl(t->uffd, UFFDIO_WAKE, &wake);
                }
                break;
            default:
                /* An event we did not ask for: the tracker's assumptions no longer hold. */
                mark_resync(t, 0);
                break;
            }
        }
    }
}

/* Read every queued event and record it before returning (under read_lock);
 * returns 0, or -errno when the fd is unusable. */
static int
drain_events(struct uffd_tracker *t)
{
    pthread_mutex_lock(&t->read_lock);
    int err = drain_events_locked(t);
    pthread_mutex_unlock(&t->read_lock);
    return err;
}

/* Sync mode, event thread: protect up to `budget` queued pages again (runs of
 * consecutive pages in one ioctl). Returns true while work is left. */
static bool
cool_some(struct uffd_tracker *t, uint64_t budget)
{
    uint64_t npages = t->length / t->page_size;

    for (;;) {
        uint64_t first, n = 0;
        pthread_mutex_lock(&t->lock);
        /* Skip entries that are no longer writable (a re-arm cleared them). */
        while (t->cool_done < t->cool_len) {
            uint64_t p = t->cool_queue[t->cool_done];
            if ((t->unprot_bm[p / 64] >> (p % 64)) & 1)
                break;
            t->cool_done++;
        }
        if (t->cool_done >= t->cool_len || budget == 0 || t->broken) {
            bool left = t->cool_done < t->cool_len && !t->broken;
            pthread_mutex_unlock(&t->lock);
            return left;
        }
        first = t->cool_queue[t->cool_done];
        while (t->cool_done + n < t->cool_len && n < budget && t->cool_queue[t->cool_done + n] == first + n &&
               ((t->unprot_bm[(first + n) / 64] >> ((first + n) % 64)) & 1))
            n++;
        pthread_mutex_unlock(&t->lock);
        if (first + n > npages)
            return false;
        /* Protect first, then clear the bits: a fault after the ioctl is handled
         * by this same thread afterwards and sets them again. */
        int err = writeprotect(t, first, n, true);
        pthread_mutex_lock(&t->lock);
        t->cool_done += n;
        if (err == 0) {
            for (uint64_t p = first; p < first + n; p++) {
                uint64_t bit = 1ULL << (p % 64);
                t->unprot_bm[p / 64] &= ~bit;
                t->cooled_bm[p / 64] |= bit;
                t->age[p] = 0;
                touch_summary(t, p);
            }
            t->reprotected += n;
        } else {
            /* Still writable: stays in unprot_bm, so it is reported; try later. */
            for (uint64_t p = first; p < first + n; p++)
                t->age[p] = 0;
        }
        pthread_mutex_unlock(&t->lock);
        budget = budget > n ? budget - n : 0;
    }
}

/* The event thread cannot go on. In sync mode nobody would resolve the next write
 * fault and the target would hang: un-protect the whole range first (and wake
 * whoever waits); every harvest from now on asks for a full resync. */
static void
give_up(struct uffd_tracker *t, int err)
{
    mark_resync(t, err);
    if (t->mode == UFFD_MODE_SYNC) {
        struct uffdio_range all = {.start = t->start, .len = t->length};
        pthread_mutex_lock(&t->lock);
        t->broken = true;
        pthread_mutex_unlock(&t->lock);
        writeprotect(t, 0, t->length / t->page_size, false);
        ioctl(t->uffd, UFFDIO_WAKE, &all);
    }
}

static void *
event_thread(void *arg)
{
    struct uffd_tracker *t = arg;
    sigset_t all;
    bool work = false;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        struct pollfd p[3] = {{.fd = t->uffd, .events = POLLIN}, {.fd = t->stop_pipe[0], .events = POLLIN},
                              {.fd = t->work_pipe[0], .events = POLLIN}};
        int r = poll(p, t->mode == UFFD_MODE_SYNC ? 3 : 2, work ? 0 : -1);
        if (r >= 0 && t->mode == UFFD_MODE_SYNC) {
            if (p[2].revents & POLLIN) {
                char buf[64];
                while (read(t->work_pipe[0], buf, sizeof(buf)) > 0) {
                }
                work = true;
            }
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            give_up(t, errno);
            return NULL;
        }
        if (p[1].revents)
            return NULL;
        if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            give_up(t, EIO);
            return NULL;
        }
        if (p[0].revents & POLLIN) {
            int err = drain_events(t);
            if (err < 0) {
                give_up(t, -err);
                return NULL;
            }
        }
        /* Faults first, then a slice of the re-protection work. */
        if (work)
            work = cool_some(t, 256);
    }
}

int
uffd_tracker_open(struct uffd_tracker *t, int uffd, int pid, uint64_t start, uint64_t length,
                  int nwalkers, enum uffd_mode mode, uint64_t *missing)
{
    struct uffdio_api api = {.api = UFFD_API};
    char path[64];
    long ps = sysconf(_SC_PAGESIZE);
    int err;

    memset(t, 0, sizeof(*t));
    t->uffd = uffd;
    t->pagemap_fd = t->stop_pipe[0] = t->stop_pipe[1] = t->work_pipe[0] = t->work_pipe[1] = -1;
    t->page_size = (uint64_t)ps;
    t->mode = mode;
    t->start = start;
    t->length = length;
    *missing = 0;
    if (pthread_mutex_init(&t->lock, NULL) != 0 || pthread_mutex_init(&t->read_lock, NULL) != 0) {
        close(uffd);
        t->uffd = -1;
        return -ENOMEM;
    }
    if (length == 0 || start % t->page_size || length % t->page_size) {
        err = -EINVAL;
        goto error;
    }
    /* The fd must be non-blocking: the event thread drains it until EAGAIN. */
    int fl = fcntl(uffd, F_GETFL);
    if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) < 0) {
        err = -errno;
        goto error;
    }

    snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
    t->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (t->pagemap_fd < 0) {
        err = -errno;
        goto error;
    }

    /* Ask for exactly what we need plus the optional extras the kernel offers.
     * The kernel rejects unknown bits with EINVAL, so probe first. */
    struct uffd_caps caps;
    uint64_t required = mode == UFFD_MODE_SYNC ? CUJU_UFFD_REQUIRED_SYNC : CUJU_UFFD_REQUIRED;
    if (uffd_probe(&caps, true) == 0 && caps.features) {
        *missing = required & ~caps.features;
        if (*missing) {
            err = -EPROTONOSUPPORT;
            goto error;
        }
        if (!caps.pagemap_scan && mode == UFFD_MODE_ASYNC) {
            err = -ENOTTY;
            goto error;
        }
        api.features = required | (CUJU_UFFD_OPTIONAL & caps.features);
    } else {
        api.features = required;
    }
    if (ioctl(uffd, UFFDIO_API, &api) < 0) {
        err = -errno;
        if (err == -EINVAL)
            *missing = required;
        goto error;
    }
    t->features = api.features;
    if (mode == UFFD_MODE_SYNC) {
        uint64_t npages = length / t->page_size;
        t->unprot_bm = calloc((npages + 63) / 64, sizeof(uint64_t));
        t->report_bm = calloc((npages + 63) / 64, sizeof(uint64_t));
        t->cooled_bm = calloc((npages + 63) / 64, sizeof(uint64_t));
        t->summary_bm = calloc(((npages + 63) / 64 + 63) / 64, sizeof(uint64_t));
        t->age = calloc(npages, 1);
        t->hold = malloc(npages);
        t->cool_queue = malloc(npages * sizeof(uint64_t));
        if (!t->unprot_bm || !t->report_bm || !t->cooled_bm || !t->summary_bm || !t->age || !t->hold ||
            !t->cool_queue) {
            err = -ENOMEM;
            goto error;
        }
        memset(t->hold, 1, npages);
        if (pipe2(t->work_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
            err = -errno;
            goto error;
        }
    }

    t->vec_len = SCAN_VEC_LEN;
    t->vec = calloc(t->vec_len, sizeof(*t->vec));
    if (t->vec == NULL) {
        err = -ENOMEM;
        goto error;
    }
    t->bm_words = (length / t->page_size + 63) / 64;
    t->bitmap = calloc(t->bm_words, sizeof(uint64_t));
    t->removed_bm = calloc(t->bm_words, sizeof(uint64_t));
    if (t->bitmap == NULL || t->removed_bm == NULL) {
        err = -ENOMEM;
        goto error;
    }
    if (nwalkers > CUJU_UFFD_MAX_WALKERS)
        nwalkers = CUJU_UFFD_MAX_WALKERS;
    t->nwalkers = nwalkers > 1 ? nwalkers : 1;
    if (t->nwalkers > 1) {
        uint64_t npages = length / t->page_size;
        for (int i = 0; i < t->nwalkers; i++) {
            uint64_t share = npages * (uint64_t)(i + 1) / (uint64_t)t->nwalkers -
                             npages * (uint64_t)i / (uint64_t)t->nwalkers;
            t->walker_vec[i] = calloc(SCAN_VEC_LEN, sizeof(struct page_region));
            t->walker_out[i] = malloc((share ? share : 1) * sizeof(uint64_t));
            if (t->walker_vec[i] == NULL || t->walker_out[i] == NULL) {
                err = -ENOMEM;
                goto error;
            }
        }
    }
    if (pipe2(t->stop_pipe, O_CLOEXEC) < 0) {
        err = -errno;
        goto error;
    }
    err = pthread_create(&t->thread, NULL, event_thread, t);
    if (err) {
        err = -err;
        goto error;
    }
    t->thread_started = true;
    return 0;

error:
    uffd_tracker_close(t);
    return err;
}

int
uffd_tracker_arm(struct uffd_tracker *t)
{
    struct uffdio_register reg = {
        .range = {.start = t->start, .len = t->length},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    struct uffdio_writeprotect wp = {
        .range = {.start = t->start, .len = t->length},
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };

    if (!t->armed) {
        if (ioctl(t->uffd, UFFDIO_REGISTER, &reg) < 0)
            return -errno;
        t->armed = true;
    }
    /* Markers in every PTE, including unmapped pages: without one, the kernel
     * counts an unmapped page as written (it is not protected), so protecting
     * only mapped pages would not make later harvests cheaper. */
    if (ioctl(t->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
        return -errno;
    /* Everything before this point is the initial full copy's business. */
    pthread_mutex_lock(&t->lock);
    memset(t->removed_bm, 0, t->bm_words * sizeof(uint64_t));
    t->any_removed = false;
    t->resync = false;
    if (t->mode == UFFD_MODE_SYNC) {
        uint64_t npages = t->length / t->page_size;
        memset(t->unprot_bm, 0, t->bm_words * sizeof(uint64_t));
        memset(t->report_bm, 0, t->bm_words * sizeof(uint64_t));
        memset(t->cooled_bm, 0, t->bm_words * sizeof(uint64_t));
        memset(t->summary_bm, 0, (t->bm_words + 63) / 64 * sizeof(uint64_t));
        memset(t->age, 0, npages);
        memset(t->hold, 1, npages);
        t->cool_len = t->cool_done = 0;
        t->broken = false;
    }
    pthread_mutex_unlock(&t->lock);
    return 0;
}

/* Walk [start, end) with PAGEMAP_SCAN, report-and-reprotect written pages, append
 * their indexes to out[0..cap) from *n on (counting beyond cap). Returns 0 or
 * -errno; sets *resync on anything unexpected. */
static int
walk_range(const struct uffd_tracker *t, uint64_t start, uint64_t end, struct page_region *vec,
           size_t vec_len, uint64_t *out, uint64_t cap, uint64_t *n, bool *resync)
{
    uint64_t npages = t->length / t->page_size;
    struct pm_scan_arg arg;

    memset(&arg, 0, sizeof(arg));
    arg.size = sizeof(arg);
    arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vec_len;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    while (arg.start < end) {
        int r = ioctl(t->pagemap_fd, PAGEMAP_SCAN, &arg);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *resync = true;
            return -errno;
        }
        for (int i = 0; i < r; i++) {
            uint64_t lo = (vec[i].start - t->start) / t->page_size;
            uint64_t hi = (vec[i].end - t->start) / t->page_size;
            if (hi > npages || lo >= hi) {
                *resync = true;
                continue;
            }
            for (uint64_t p = lo; p < hi; p++) {
                if (*n < cap)
                    out[*n] = p;
                (*n)++;
            }
        }
        if (arg.walk_end <= arg.start || arg.walk_end > end) {
            *resync = true;
            return -EIO;
        }
        arg.start = arg.walk_end;
    }
    return 0;
}

struct walker {
    const struct uffd_tracker *t;
    uint64_t start, end;     /* address range of this walker */
    struct page_region *vec; /* owned by the tracker, one per walker */
    uint64_t *out;           /* this walker's index scratch (cap entries) */
    uint64_t cap, n;
    bool resync;
    int err;
};

static void *
walker_main(void *arg)
{
    struct walker *w = arg;
    w->n = 0;
    w->resync = false;
    w->err = walk_range(w->t, w->start, w->end, w->vec, SCAN_VEC_LEN, w->out, w->cap, &w->n, &w->resync);
    return NULL;
}

/* Split the walk over t->nwalkers threads (the calling thread is walker 0): the
 * kernel's cost has a per-PTE term for the whole range, which parallelises. */
static int
walk_parallel(struct uffd_tracker *t, uint64_t *out, uint64_t cap, uint64_t *n, bool *resync)
{
    struct walker w[CUJU_UFFD_MAX_WALKERS];
    pthread_t th[CUJU_UFFD_MAX_WALKERS];
    uint64_t npages = t->length / t->page_size;
    int started = 0, err = 0;

    for (int i = 0; i < t->nwalkers; i++) {
        uint64_t first = npages * (uint64_t)i / (uint64_t)t->nwalkers;
        uint64_t last = npages * (uint64_t)(i + 1) / (uint64_t)t->nwalkers;
        w[i] = (struct walker){
            .t = t, .start = t->start + first * t->page_size, .end = t->start + last * t->page_size,
            .vec = t->walker_vec[i], .out = t->walker_out[i], .cap = last - first,
        };
    }
    for (int i = 1; i < t->nwalkers; i++) {
        if (pthread_create(&th[i], NULL, walker_main, &w[i]) != 0)
            break;
        started = i;
    }
    walker_main(&w[0]);
    for (int i = started + 1; i < t->nwalkers; i++)
        walker_main(&w[i]);
    for (int i = 1; i <= started; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < t->nwalkers; i++) {
        if (w[i].err < 0 && err == 0)
            err = w[i].err;
        *resync |= w[i].resync || w[i].n > w[i].cap;
        for (uint64_t k = 0; k < w[i].n && k < w[i].cap; k++) {
            if (*n < cap)
                out[*n] = w[i].out[k];
            (*n)++;
        }
    }
    return err;
}

struct sync_pass {
    uint64_t *out, cap, n; /* reported pages */
    uint64_t hot, queued;
};

/* Sync mode, lock held: one word of the bitmaps (pages w*64 .. w*64+63). Returns
 * true when the word is all zero in every bitmap afterwards. */
static bool
harvest_word(struct uffd_tracker *t, uint64_t w, struct sync_pass *sp)
{
    uint64_t npages = t->length / t->page_size;
    uint64_t rep = t->report_bm[w], un = t->unprot_bm[w], cooled = t->cooled_bm[w];
    bool empty = un == 0;

    t->report_bm[w] = un; /* still writable: reported again next time */
    t->cooled_bm[w] = 0;
    while (rep) {
        uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(rep);
        rep &= rep - 1;
        if (sp->n < sp->cap)
            sp->out[sp->n] = p;
        sp->n++;
    }
    /* Protected again and quiet since: it may stay protected longer next time. */
    cooled &= ~un;
    while (cooled) {
        uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(cooled);
        cooled &= cooled - 1;
        if (t->hold[p] > 1)
            t->hold[p] /= 2;
    }
    /* Writable pages whose hold ran out are queued for re-protection. */
    while (un) {
        uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(un);
        un &= un - 1;
        sp->hot++;
        if (p >= npages || t->age[p] == UINT8_MAX) /* already queued */
            continue;
        if (++t->age[p] >= t->hold[p] && t->cool_len < npages) {
            t->age[p] = UINT8_MAX;
            t->cool_queue[t->cool_len++] = p;
            sp->queued++;
        }
    }
    return empty;
}

/* Sync mode: no page-table walk. Emit report_bm, carry the writable pages over
 * into the next report, queue the pages whose hold ran out for re-protection (the
 * event thread does it while the VM runs). Visits only the bitmap words the
 * summary marks: O(dirty + hot) plus one summary bit per 4,096 pages. */
static int64_t
harvest_sync(struct uffd_tracker *t, uint64_t *out, uint64_t cap, bool *resync)
{
    struct sync_pass sp = {.out = out, .cap = cap};
    int err = drain_events(t);
    if (err < 0)
        mark_resync(t, -err);

    pthread_mutex_lock(&t->lock);
    *resync = t->resync || t->thread_errno != 0 || t->broken;
    t->resync = false;
    t->any_removed = false; /* removed pages are in report_bm already */
    /* Unfinished re-protection work keeps its place at the front of the queue. */
    if (t->cool_done > 0) {
        memmove(t->cool_queue, t->cool_queue + t->cool_done, (t->cool_len - t->cool_done) * sizeof(uint64_t));
        t->cool_len -= t->cool_done;
        t->cool_done = 0;
    }
    for (uint64_t sw = 0; sw < (t->bm_words + 63) / 64; sw++) {
        uint64_t words = t->summary_bm[sw];
        while (words) {
            uint64_t bit = words & -words;
            uint64_t w = sw * 64 + (uint64_t)__builtin_ctzll(words);
            words &= words - 1;
            if (harvest_word(t, w, &sp))
                t->summary_bm[sw] &= ~bit;
        }
    }
    t->hot = sp.hot;
    pthread_mutex_unlock(&t->lock);
    if (sp.queued && write(t->work_pipe[1], "w", 1) < 0) {
        /* The pipe is full: the event thread has a wake-up pending anyway. */
    }
    if (sp.n > cap) {
        *resync = true;
        sp.n = cap;
    }
    return (int64_t)sp.n;
}

int64_t
uffd_tracker_harvest(struct uffd_tracker *t, uint64_t *out, uint64_t cap, bool *resync)
{
    bool any_removed;
    uint64_t n = 0;
    int err;

    *resync = false;
    if (!t->armed)
        return -EBADFD;
    if (t->mode == UFFD_MODE_SYNC)
        return harvest_sync(t, out, cap, resync);

    /* Events already queued belong to this epoch: read them before scanning. The
     * event thread may read concurrently; both paths go through the lock. */
    err = drain_events(t);
    if (err < 0)
        mark_resync(t, -err);

    pthread_mutex_lock(&t->lock);
    /* Swap the event thread's bitmap for the (clear) merge scratch. */
    any_removed = t->any_removed;
    if (any_removed) {
        uint64_t *bm = t->removed_bm;
        t->removed_bm = t->bitmap;
        t->bitmap = bm;
        t->any_removed = false;
    }
    /* A dead event thread can no longer vouch for REMOVE events: every harvest
     * from then on asks for a full copy. */
    *resync = t->resync || t->thread_errno != 0;
    t->resync = false;
    pthread_mutex_unlock(&t->lock);

    /* Scan the whole range even when a resync is due: it re-protects the
     * written pages, so the next epoch starts clean. The kernel skips holes;
     * we resume from walk_end whenever the output vector fills up. */
    if (t->nwalkers > 1)
        err = walk_parallel(t, out, cap, &n, resync);
    else
        err = walk_range(t, t->start, t->start + t->length, t->vec, t->vec_len, out, cap, &n, resync);
    if (err < 0) {
        memset(t->bitmap, 0, t->bm_words * sizeof(uint64_t)); /* keep the scratch clear */
        return err;
    }
    if (n > cap) {
        *resync = true;
        n = cap;
    }
    if (!any_removed)
        return (int64_t)n;

    /* Balloon or discard: merge the removed pages through the bitmap, which
     * is cleared as it is emitted and becomes the event thread's next one. */
    uint64_t words = t->bm_words;
    for (uint64_t i = 0; i < n; i++)
        t->bitmap[out[i] / 64] |= 1ULL << (out[i] % 64);
    n = 0;
    for (uint64_t w = 0; w < words; w++) {
        uint64_t bits = t->bitmap[w];
        t->bitmap[w] = 0;
        while (bits) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (n < cap)
                out[n] = p;
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
uffd_tracker_settle(struct uffd_tracker *t)
{
    if (t->mode != UFFD_MODE_SYNC || !t->armed)
        return;
    /* Pages protected since the harvest were protected while the VM stood still:
     * nothing wrote them in between, so the next harvest need not report them. */
    pthread_mutex_lock(&t->lock);
    for (uint64_t sw = 0; sw < (t->bm_words + 63) / 64; sw++) {
        uint64_t words = t->summary_bm[sw];
        while (words) {
            uint64_t w = sw * 64 + (uint64_t)__builtin_ctzll(words);
            words &= words - 1;
            t->report_bm[w] &= ~(t->cooled_bm[w] & ~t->unprot_bm[w]);
        }
    }
    pthread_mutex_unlock(&t->lock);
}

void
uffd_tracker_close(struct uffd_tracker *t)
{
    if (t->thread_started) {
        char c = 0;
        if (write(t->stop_pipe[1], &c, 1) < 0) {
            /* The thread still ends when its pipe's write side closes below. */
        }
        pthread_join(t->thread, NULL);
        t->thread_started = false;
    }
    for (int i = 0; i < 2; i++) {
        if (t->stop_pipe[i] >= 0)
            close(t->stop_pipe[i]);
        t->stop_pipe[i] = -1;
        if (t->work_pipe[i] >= 0)
            close(t->work_pipe[i]);
        t->work_pipe[i] = -1;
    }
    if (t->pagemap_fd >= 0)
        close(t->pagemap_fd);
    t->pagemap_fd = -1;
    /* Closing the last reference to the uffd unregisters the range in the
     * target and wakes anything waiting on an event. */
    if (t->uffd >= 0)
        close(t->uffd);
    t->uffd = -1;
    t->armed = false;
    free(t->vec);
    t->vec = NULL;
    free(t->bitmap);
    t->bitmap = NULL;
    free(t->removed_bm);
    t->removed_bm = NULL;
    free(t->unprot_bm);
    free(t->report_bm);
    free(t->cooled_bm);
    free(t->summary_bm);
    t->summary_bm = NULL;
    free(t->age);
    free(t->hold);
    free(t->cool_queue);
    t->unprot_bm = t->report_bm = t->cooled_bm = t->cool_queue = NULL;
    t->age = t->hold = NULL;
    for (int i = 0; i < CUJU_UFFD_MAX_WALKERS; i++) {
        free(t->walker_vec[i]);
        free(t->walker_out[i]);
        t->walker_vec[i] = NULL;
        t->walker_out[i] = NULL;
    }
    pthread_mutex_destroy(&t->lock);
    pthread_mutex_destroy(&t->read_lock);
}
