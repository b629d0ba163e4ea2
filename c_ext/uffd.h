/* Dirty tracking with userfaultfd write-protect (async mode) + PAGEMAP_SCAN.
 *
 * Mechanism only, no Python. The caller owns a userfaultfd that was created in
 * the target process's mm (see attach.h, or uffd_create() for the own process),
 * names the target pid and the address range of the guest-RAM mapping *in the
 * target*, and then:
 *
 *   uffd_tracker_open()     UFFDIO_API (WP_ASYNC + events), start the event thread
 *   uffd_tracker_arm()      UFFDIO_REGISTER(MODE_WP) + write-protect the range
 *   uffd_tracker_harvest()  PAGEMAP_SCAN(PAGE_IS_WRITTEN, WP_MATCHING|CHECK_WPASYNC)
 *                           on /proc/PID/pagemap: written pages are reported and
 *                           re-protected atomically; removed ranges are merged in
 *   uffd_tracker_close()    stop the thread, close the fds (this unregisters)
 *
 * Arm and harvest must only run while the target does not write to the range
 * (VM stopped): the Python layer enforces it.
 *
 * Two modes (chosen at open):
 *
 * UFFD_MODE_ASYNC  WP_ASYNC: the kernel resolves a write fault itself (~1.3 us) and
 *                  the harvest finds written pages with PAGEMAP_SCAN, which visits
 *                  every page-table entry of the range: O(RAM) per harvest.
 * UFFD_MODE_SYNC   every first write to a protected page is a fault message that the
 *                  event thread records and resolves (un-protects that page): the
 *                  harvest reads a bitmap and never walks page tables, and nothing is
 *                  re-protected inside the pause: O(dirty + hot) per harvest.
 *
 * Sync mode, the rules:
 *   unprot_bm  pages that are (or may be) writable without a fault. A bit is set by
 *              the event thread *before* it un-protects the page, and cleared only
 *              after the page was protected again (by the same thread), so it is a
 *              superset of the writable pages at all times.
 *   report_bm  pages the next harvest reports. A fault sets it. The harvest emits
 *              and clears it, then sets it to unprot_bm: a page left writable is
 *              reported every epoch until it is protected again (one more time after
 *              that, for the writes between the harvest and the re-protection).
 *   So a page written in an epoch was either protected when the epoch began (its
 *   first write faulted: in report_bm) or writable (in unprot_bm at the previous
 *   harvest: in report_bm). Pages stay writable ("hot") for `hold` epochs after a
 *   fault, so a page written every epoch faults once, not every epoch; the hold
 *   doubles (up to UFFD_HOLD_MAX) for a page that faults again right after it was
 *   protected, and halves when it stays quiet. Re-protection runs in the event
 *   thread while the VM runs (queued by the harvest). REMOVE events mark the pages
 *   writable (a punched hole loses its protection marker) and reported.
 *   The uffd must not have UFFD_USER_MODE_ONLY: a kernel-mode write (O_DIRECT read
 *   into guest RAM, KVM's get_user_pages, vhost) into a protected page would fail
 *   with EFAULT instead of waiting for the event thread.
 *
 * Events (thread "cuju-uffd-ev"): the kernel blocks a thread of the target that
 * calls madvise(DONTNEED/REMOVE) on the range until the REMOVE event is read, so
 * one C thread reads events at all times. REMOVE ranges are recorded as dirty for
 * the next harvest (in a bitmap, which cannot overflow); UNMAP/REMAP touching
 * the range, an unexpected message or a read error set `resync` ("full resync
 * needed"), never "nothing changed".
 */
#ifndef CUJU_UFFD_H
#define CUJU_UFFD_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Kernel ABI that Debian 12's linux-libc-dev (6.1) does not know yet. The values
 * are the kernel's uapi; whether the running kernel offers them is detected at
 * run time (uffd_probe), never assumed from a version. */
#include <linux/fs.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

/* Features the tracker needs; EVENT_UNMAP/REMAP let it notice the mapping going
 * away or moving (-> resync). WP_UNPOPULATED/WP_HUGETLBFS_SHMEM are asked for when
 * offered. */
#define CUJU_UFFD_REQUIRED (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_EVENT_REMOVE | \
                            UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP)
/* Sync mode: write faults arrive as messages; WP on shmem needs WP_HUGETLBFS_SHMEM. */
#define CUJU_UFFD_REQUIRED_SYNC (UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | \
                                 UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
#define CUJU_UFFD_OPTIONAL (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)

/* Parallel PAGEMAP_SCAN walkers at most (threads per harvest). */
#define CUJU_UFFD_MAX_WALKERS 8

enum uffd_mode {
    UFFD_MODE_ASYNC = 0, /* WP_ASYNC + PAGEMAP_SCAN walk */
    UFFD_MODE_SYNC = 1,  /* fault messages + bitmaps, no walk */
};

/* Sync mode: epochs a page stays writable after a fault, at most. */
#define UFFD_HOLD_MAX 64

/* Results of probing the running kernel (own process, scratch uffd). */
struct uffd_caps {
    uint64_t features;   /* UFFDIO_API features the kernel offers */
    bool pagemap_scan;   /* PAGEMAP_SCAN ioctl exists */
    int uffd_errno;      /* errno of userfaultfd() if it failed, else 0 */
};

/* Fill *caps. Returns 0, or -errno if probing itself failed unexpectedly. */
int uffd_probe(struct uffd_caps *caps, bool user_mode_only);

/* userfaultfd() in the calling process (for self-tests). Returns fd or -errno. */
int uffd_create(bool user_mode_only);

struct uffd_tracker {
    /* Set by open, read-only afterwards (any thread). */
    int uffd;           /* owned: closed by uffd_tracker_close */
    int pagemap_fd;     /* /proc/PID/pagemap, owned */
    int stop_pipe[2];   /* close()ing thread -> event thread */
    uint64_t start;     /* region start address in the target */
    uint64_t length;    /* bytes, multiple of page_size */
    uint64_t page_size;
    uint64_t features;  /* features accepted by UFFDIO_API */
    enum uffd_mode mode;
    int work_pipe[2];   /* harvest -> event thread: re-protection queued (sync mode) */
    pthread_t thread;
    bool thread_started;

    /* Caller's thread only (the one arming and harvesting). */
    bool armed;
    struct page_region *vec; /* PAGEMAP_SCAN output scratch */
    size_t vec_len;
    uint64_t *bitmap;        /* merge scratch (all zero between harvests); swapped with removed_bm */
    uint64_t bm_words;       /* words in each bitmap; set by open */
    int nwalkers;            /* threads splitting the walk; 1 = the caller only */
    struct page_region *walker_vec[CUJU_UFFD_MAX_WALKERS]; /* per-walker scratch */
    uint64_t *walker_out[CUJU_UFFD_MAX_WALKERS];

    /* Held across reading *and* recording a batch of messages (event thread and
     * harvest): the kernel lets madvise() return as soon as its REMOVE message was
     * read, so a harvest must not look at the bitmaps while a read batch is still
     * being recorded. Taken before `lock`, never inside it. */
    pthread_mutex_t read_lock;

    /* Protected by lock (event thread and caller). */
    pthread_mutex_t lock;
    uint64_t *removed_bm;    /* pages removed since the last harvest, one bit each */
    bool any_removed;
    bool resync;             /* full resync needed at next harvest */
    uint64_t events_remove;  /* counters for the operator */
    uint64_t events_other;
    int thread_errno;        /* why the event thread gave up (sets resync too) */

    /* Sync mode only, protected by lock. */
    uint64_t *unprot_bm;     /* pages (maybe) writable without a fault */
    uint64_t *report_bm;     /* pages the next harvest reports */
    uint8_t *age;            /* epochs a writable page has been writable */
    uint8_t *hold;           /* epochs it stays writable after a fault (1..UFFD_HOLD_MAX) */
    uint64_t *cooled_bm;     /* protected again since the last harvest */
    uint64_t *summary_bm;    /* one bit per word of the three bitmaps: that word may be non-zero */
    uint64_t *cool_queue;    /* pages to protect again (indexes), event thread drains */
    uint64_t cool_len, cool_done;
    bool broken;             /* a fault could not be resolved: the range was unprotected */
    uint64_t faults;         /* write faults resolved */
    uint64_t reprotected;    /* pages protected again */
    uint64_t hot;            /* pages writable at the last harvest */
};

/* Take ownership of `uffd` (closed on error too), open /proc/PID/pagemap,
 * negotiate features, start the event thread. Harvests split the walk over
 * `nwalkers` threads (1 = none). Returns 0 or -errno; on -EPROTONOSUPPORT,
 * *missing holds the required features the kernel lacks. */
int uffd_tracker_open(struct uffd_tracker *t, int uffd, int pid, uint64_t start,
                      uint64_t length, int nwalkers, enum uffd_mode mode, uint64_t *missing);

/* Register the range for WP and write-protect all of it. The next harvest
 * reports pages written after this call. Returns 0 or -errno. */
int uffd_tracker_arm(struct uffd_tracker *t);

/* Write the indexes (ascending, unique, relative to the region) of pages written
 * or removed since the previous harvest/arm into out[0..cap). Returns the count,
 * or -errno. *resync is set when the result must not be trusted (lost event,
 * overflow of out, error): the caller must then copy the whole region. */
int64_t uffd_tracker_harvest(struct uffd_tracker *t, uint64_t *out, uint64_t cap, bool *resync);

/* Sync mode, VM still stopped after a harvest: drop from the next report the pages
 * the event thread protected again since the harvest (no-op in async mode). Never
 * waits: what is not protected yet is reported once more. */
void uffd_tracker_settle(struct uffd_tracker *t);

void uffd_tracker_close(struct uffd_tracker *t);

#endif
