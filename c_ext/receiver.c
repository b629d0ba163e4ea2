/* Epoch receiver (backup side of wire.h). Plain C, POSIX threads.
 *
 * Threads: the caller (open/start/wait/stats/close), the receive thread
 * (handshake, then: receive an EPOCH frame into a journal slot, verify it,
 * commit it, ACK it) and the apply thread (copy committed slots into the
 * region, replace the device-state file, record applied_epoch).
 *
 * Journal file (local to the backup, host byte order, never on the wire):
 *     page 0 (meta):
 *         u64 magic "CUJU-JNL"   u32 version (1)   u32 page_size
 *         u64 region_size        u64 applied_epoch (offset 24)
 *         at 64 + 32*i, slot i = 0, 1:
 *             u64 epoch   u64 frame_len   u64 checksum   u64 seed
 *     slot i at 4096 + i * slot_cap: one EPOCH frame, byte for byte (with its
 *     disk section: replaying a slot replays the epoch's disk writes too).
 * The meta page is updated with aligned 8-byte release stores, each field
 * once its predecessors are in place: a slot's epoch field last (commit),
 * applied_epoch after the apply (see wire.h). A slot whose epoch is greater
 * than applied_epoch is committed and not yet applied; open replays it.
 */
#define _GNU_SOURCE     /* fallocate */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <libgen.h>

#include "aead.h"
#include "checksum.h"
#include "diskjournal.h"
#include "replicator.h"
#include "streamcopy.h"

#define RECV_CHUNK (1u << 20)
#define JNL_MAGIC UINT64_C(0x4c4e4a2d554a5543)   /* "CUJU-JNL" */
#define JNL_VERSION 1u
#define META_LEN 4096u
#define OFF_APPLIED 24u
#define OFF_SLOT(i) (64u + 32u * (unsigned)(i))

enum slot_state { SLOT_FREE, SLOT_COMMITTED, SLOT_APPLYING };

struct cuju_receiver {
    pthread_mutex_t lock;
    pthread_cond_t cond;            /* any state change below; broadcast */

    /* Immutable after open. */
    uint8_t *region;
    uint64_t region_size;
    uint64_t region_pages;
    uint32_t page_size;
    char *devstate_path;
    char *devstate_tmp;
    int durable;
    uint64_t crash_epoch;           /* fault injection, see open: 0 = off */
    uint64_t crash_pages;
    uint64_t crash_disk_epoch;      /* fault injection: CUJU_TEST_CRASH_IN_DISK_APPLY */
    uint64_t crash_disk_records;
    unsigned ndisks;                /* replica images, owned */
    int *disk_fds;
    uint64_t *disk_sizes;
    uint64_t disk_geom;             /* cuju_disk_geometry of them */
    int jfd;
    uint8_t *jmem;                  /* the whole journal, MAP_SHARED */
    size_t jlen;
    size_t slot_cap;

    /* Set by start, then immutable. */
    int fd;                         /* owned socket; -1 before start */
    struct cuju_link link;          /* fd and record-layer keys (set_keys before start) */
    int io_timeout_ms;
    int hs_timeout_ms;

    enum slot_state slot_state[2];  /* lock */
    int recv_idx;                   /* receive thread */
    uint64_t slot_alloc[2];         /* receive thread: bytes known allocated at each slot's start */
    int apply_idx;                  /* apply thread */
    uint64_t session_id;            /* receive thread, after HELLO */
    uint64_t last_committed;        /* receive thread (written under lock) */

    int started;                    /* caller */
    int recv_running;               /* lock */
    int apply_running;              /* lock */
    int recv_done;                  /* lock: the receive thread has ended */
    int stopping;                   /* lock */

    int err;                        /* lock: first failure, CUJU_OK if none */
    int err_errno;                  /* lock */
    int peer_code;                  /* lock */
    char err_msg[CUJU_ERRMSG_LEN];  /* lock */

    struct cuju_receiver_stats st;  /* lock (each field names its writer thread) */

    pthread_t recv_thr;
    pthread_t apply_thr;
};

static uint64_t *meta64(struct cuju_receiver *r, size_t off)
{
    return (uint64_t *)(void *)(r->jmem + off);
}

static uint8_t *slot_mem(struct cuju_receiver *r, int i)
{
    return r->jmem + META_LEN + (size_t)i * r->slot_cap;
}

static void rfail(struct cuju_receiver *r, int code, int eno, int peer_code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void rfail(struct cuju_receiver *r, int code, int eno, int peer_code, const char *fmt, ...)
{
    pthread_mutex_lock(&r->lock);
    if (r->err == CUJU_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err_msg, sizeof(r->err_msg), fmt, ap);
        va_end(ap);
        r->err = code;
        r->err_errno = eno;
        r->peer_code = peer_code;
        r->st.errors++;
    }
    r->stopping = 1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

static void set_msg(char *msg, size_t msglen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_msg(char *msg, size_t msglen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (msg && msglen)
        vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
}

/* ---- checks shared by the live path and replay ---- */

/* Validate the 56-byte frame + epoch header; on success *total is the frame
 * length and the counts are returned. */
static int check_epoch_header(struct cuju_receiver *r, const uint8_t *f, uint64_t *total, uint64_t *epoch,
                              uint64_t *npages, uint64_t *ndata, uint64_t *devlen, uint64_t *disklen, char *msg,
                              size_t msglen)
{
    uint64_t len = cuju_get_le64(f + 8);
    *epoch = cuju_get_le64(f + 16);
    *npages = cuju_get_le64(f + 24);
    *ndata = cuju_get_le64(f + 32);
    *devlen = cuju_get_le64(f + 40);
    *disklen = cuju_get_le64(f + 48);
    if (cuju_get_le32(f + 4) != 0) {
        set_msg(msg, msglen, "EPOCH frame with non-zero flags");
        return CUJU_E_FRAME;
    }
    if (*disklen > (r->ndisks ? CUJU_WIRE_MAX_DISK : 0) || *disklen % 8) {
        set_msg(msg, msglen, "EPOCH disk section of %llu bytes (this backup replicates %u disk(s))",
                (unsigned long long)*disklen, r->ndisks);
        return CUJU_E_FRAME;
    }
    if (*npages > r->region_pages || *ndata > *npages || *devlen > CUJU_WIRE_MAX_DEVSTATE) {
        set_msg(msg, msglen, "EPOCH counts out of limits: %llu pages (region %llu), %llu full, %llu bytes state",
                (unsigned long long)*npages, (unsigned long long)r->region_pages, (unsigned long long)*ndata,
                (unsigned long long)*devlen);
        return CUJU_E_FRAME;
    }
    uint64_t want = cuju_epoch_payload_len(*npages, *ndata, r->page_size, *devlen, *disklen);
    if (len != want || CUJU_FRAME_HDR_LEN + want > r->slot_cap) {
        set_msg(msg, msglen, "EPOCH frame length %llu, its counts give %llu", (unsigned long long)len,
                (unsigned long long)want);
        return CUJU_E_FRAME;
    }
    if (*epoch == 0) {
        set_msg(msg, msglen, "epoch number 0 is reserved");
        return CUJU_E_SEQUENCE;
    }
    *total = CUJU_FRAME_HDR_LEN + want;
    return CUJU_OK;
}

static int check_table(struct cuju_receiver *r, const uint8_t *table, uint64_t npages, uint64_t ndata, char *msg,
                       size_t msglen)
{
    uint64_t full = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t rec = cuju_get_le64(table + 8 * i);
        uint64_t idx = rec & CUJU_WIRE_INDEX_MASK;
        uint64_t enc = rec >> 56;
        if (rec & CUJU_WIRE_RESERVED_MASK) {
            set_msg(msg, msglen, "page record %llu has reserved bits set", (unsigned long long)i);
            return CUJU_E_FRAME;
        }
        if (idx >= r->region_pages) {
            set_msg(msg, msglen, "page record %llu names page %llu outside the region (%llu pages)",
                    (unsigned long long)i, (unsigned long long)idx, (unsigned long long)r->region_pages);
            return CUJU_E_INDEX;
        }
        if (enc == CUJU_ENC_FULL)
            full++;
        else if (enc != CUJU_ENC_ZERO) {
            set_msg(msg, msglen, "page record %llu has unknown encoding %llu", (unsigned long long)i,
                    (unsigned long long)enc);
            return CUJU_E_FRAME;
        }
    }
    if (full != ndata) {
        set_msg(msg, msglen, "page table has %llu full pages, header says %llu", (unsigned long long)full,
                (unsigned long long)ndata);
        return CUJU_E_FRAME;
    }
    return CUJU_OK;
}

static int check_trailer(const uint8_t *t, uint64_t epoch, uint64_t hash, char *msg, size_t msglen)
{
    if (cuju_get_le64(t) != CUJU_WIRE_END_MAGIC || cuju_get_le64(t + 8) != epoch) {
        set_msg(msg, msglen, "epoch %llu: bad end-of-epoch marker", (unsigned long long)epoch);
        return CUJU_E_FRAME;
    }
    if (cuju_get_le64(t + 16) != hash) {
        set_msg(msg, msglen, "epoch %llu: checksum mismatch (corrupted in transit)", (unsigned long long)epoch);
        return CUJU_E_CHECKSUM;
    }
    return CUJU_OK;
}

/* ---- apply ---- */

static int write_devstate(struct cuju_receiver *r, const uint8_t *dev, uint64_t len, int *eno)
{
    int fd = open(r->devstate_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        goto error;
    while (len > 0) {
        ssize_t n = write(fd, dev, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            goto error;
        dev += n;
        len -= (uint64_t)n;
    }
    if (r->durable && fsync(fd) < 0)
        goto error;
    if (close(fd) < 0) {
        fd = -1;
        goto error;
    }
    fd = -1;
    if (rename(r->devstate_tmp, r->devstate_path) < 0)
        goto error;
    if (r->durable) {
        char *d = strdup(r->devstate_path);
        if (d) {
            int dfd = open(dirname(d), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd >= 0) {
                fsync(dfd);
                close(dfd);
            }
            free(d);
        }
    }
    return CUJU_OK;

error:
    *eno = errno;
    if (fd >= 0)
        close(fd);
    return CUJU_E_APPLY;
}

/* Copy one verified frame into the region and the device-state file, then
 * record it as applied. */
static int apply_frame(struct cuju_receiver *r, const uint8_t *f, uint64_t *npz, uint64_t *ndisk, int *eno)
{
    uint64_t epoch = cuju_get_le64(f + 16), npages = cuju_get_le64(f + 24), ndata = cuju_get_le64(f + 32);
    uint64_t devlen = cuju_get_le64(f + 40), disklen = cuju_get_le64(f + 48);
    const uint8_t *table = f + CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN;
    const uint8_t *data = table + 8 * npages;
    const uint32_t ps = r->page_size;
    uint64_t d = 0, z = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t rec = cuju_get_le64(table + 8 * i);
        uint64_t idx = rec & CUJU_WIRE_INDEX_MASK;
        if (idx >= r->region_pages)     /* verified before; never write outside */
            return CUJU_E_INDEX;
        if (epoch == r->crash_epoch && i == r->crash_pages)
            _exit(86);      /* test hook: die mid-apply, as a killed backup would */
        uint8_t *dst = r->region + idx * ps;
        if ((rec >> 56) == CUJU_ENC_ZERO) {
            cuju_stream_zero(dst, ps);
            z++;
        } else {
            if (d >= ndata)
                return CUJU_E_FRAME;
            cuju_stream_copy(dst, data + d * ps, ps);
            d++;
        }
    }
    cuju_stream_fence();    /* the pages are in place before anything says so */
    /* The disks of the same epoch: checked before the commit (receive) or
     * the replay; an epoch's records are absolute, so re-applying is safe. */
    uint64_t nrec = 0;
    int rc = cuju_dj_apply_section(data + ndata * ps + devlen, disklen, r->disk_fds,
                                   epoch == r->crash_disk_epoch ? r->crash_disk_records : 0, &nrec, eno);
    if (rc != CUJU_OK)
        return rc;
    if (r->durable) {
        for (unsigned i = 0; i < r->ndisks; i++)
            if (fdatasync(r->disk_fds[i]) < 0) {
                *eno = errno;
                return CUJU_E_APPLY;
            }
    }
    *ndisk = nrec;
    rc = write_devstate(r, data + ndata * ps, devlen, eno);
    if (rc != CUJU_OK)
        return rc;
    if (r->durable)
        msync(r->jmem, META_LEN, MS_SYNC);
    __atomic_store_n(meta64(r, OFF_APPLIED), epoch, __ATOMIC_RELEASE);
    if (r->durable)
        msync(r->jmem, META_LEN, MS_SYNC);
    *npz = z;
    return CUJU_OK;
}

/* ---- open and replay ---- */

static int journal_open(struct cuju_receiver *r, const char *path, char *msg, size_t msglen)
{
    uint64_t cap = CUJU_FRAME_HDR_LEN + cuju_epoch_payload_len(r->region_pages, r->region_pages, r->page_size,
                                                               CUJU_WIRE_MAX_DEVSTATE,
                                                               r->ndisks ? CUJU_WIRE_MAX_DISK : 0);
    r->slot_cap = (size_t)((cap + 4095) & ~(uint64_t)4095);
    r->jlen = META_LEN + 2 * r->slot_cap;
    r->jfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (r->jfd < 0) {
        set_msg(msg, msglen, "cannot open journal %s: %s", path, strerror(errno));
        return CUJU_E_JOURNAL;
    }
    struct stat sb;
    if (fstat(r->jfd, &sb) < 0) {
        set_msg(msg, msglen, "cannot stat journal %s: %s", path, strerror(errno));
        return CUJU_E_JOURNAL;
    }
    int fresh = sb.st_size == 0;
    if (!fresh && (uint64_t)sb.st_size != r->jlen) {
        set_msg(msg, msglen, "journal %s belongs to another region geometry (size %lld); remove it to start over",
                path, (long long)sb.st_size);
        return CUJU_E_JOURNAL;
    }
    if (fresh && ftruncate(r->jfd, (off_t)r->jlen) < 0) {
        set_msg(msg, msglen, "cannot size journal %s: %s", path, strerror(errno));
        return CUJU_E_JOURNAL;
    }
    void *m = mmap(NULL, r->jlen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, r->jfd, 0);
    if (m == MAP_FAILED) {
        set_msg(msg, msglen, "cannot map journal %s: %s", path, strerror(errno));
        return CUJU_E_JOURNAL;
    }
    r->jmem = m;
    if (fresh) {
        *meta64(r, 8) = (uint64_t)JNL_VERSION | ((uint64_t)r->page_size << 32);
        *meta64(r, 16) = r->region_size;
        *meta64(r, OFF_APPLIED) = 0;
        __atomic_store_n(meta64(r, 0), JNL_MAGIC, __ATOMIC_RELEASE);
        if (r->durable)
            msync(r->jmem, META_LEN, MS_SYNC);
        return CUJU_OK;
    }
    if (*meta64(r, 0) != JNL_MAGIC || (uint32_t)*meta64(r, 8) != JNL_VERSION ||
        (uint32_t)(*meta64(r, 8) >> 32) != r->page_size || *meta64(r, 16) != r->region_size) {
        set_msg(msg, msglen, "journal %s is not a cuju-libvirt journal for this region; remove it to start over",
                path);
        return CUJU_E_JOURNAL;
    }
    return CUJU_OK;
}

static int replay(struct cuju_receiver *r, char *msg, size_t msglen)
{
    uint64_t applied = *meta64(r, OFF_APPLIED);
    for (;;) {
        int pick = -1;
        uint64_t best = 0;
        for (int i = 0; i < 2; i++) {
            uint64_t e = __atomic_load_n(meta64(r, OFF_SLOT(i)), __ATOMIC_ACQUIRE);
            if (e > applied && (pick < 0 || e < best)) {
                pick = i;
                best = e;
            }
        }
        if (pick < 0)
            break;
        const uint8_t *f = slot_mem(r, pick);
        uint64_t flen = *meta64(r, OFF_SLOT(pick) + 8), sum = *meta64(r, OFF_SLOT(pick) + 16);
        uint64_t seed = *meta64(r, OFF_SLOT(pick) + 24);
        uint64_t total, epoch, npages, ndata, devlen, disklen;
        int rc = check_epoch_header(r, f, &total, &epoch, &npages, &ndata, &devlen, &disklen, msg, msglen);
        if (rc == CUJU_OK && (total != flen || epoch != best))
            rc = CUJU_E_JOURNAL;
        if (rc == CUJU_OK)
            rc = check_table(r, f + CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN, npages, ndata, msg, msglen);
        if (rc == CUJU_OK && cuju_csum(f, total - 8, seed) != sum)
            rc = CUJU_E_JOURNAL;
        if (rc == CUJU_OK)
            rc = check_trailer(f + total - CUJU_TRAILER_LEN, epoch, sum, msg, msglen);
        if (rc == CUJU_OK)
            rc = cuju_dj_check_section(f + total - CUJU_TRAILER_LEN - disklen, disklen, r->ndisks, r->disk_sizes,
                                       msg, msglen);
        if (rc != CUJU_OK) {
            set_msg(msg, msglen, "journal slot %d (epoch %llu) is corrupt; the replica needs a full resync", pick,
                    (unsigned long long)best);
            return CUJU_E_JOURNAL;
        }
        uint64_t nz = 0, nrec = 0;
        int eno = 0;
        uint64_t t0 = cuju_now_ns();
        rc = apply_frame(r, f, &nz, &nrec, &eno);
        if (rc != CUJU_OK) {
            set_msg(msg, msglen, "replaying epoch %llu from the journal: %s (%s)", (unsigned long long)epoch,
                    cuju_strerror(rc), strerror(eno));
            return rc;
        }
        r->st.apply_ns += cuju_now_ns() - t0;
        r->st.epochs_replayed++;
        r->st.epochs_applied++;
        r->st.pages += npages;
        r->st.zero_pages += nz;
        r->st.disk_records += nrec;
        r->st.disk_bytes += disklen;
        applied = epoch;
    }
    r->st.last_applied_epoch = applied;
    r->st.last_acked_epoch = applied;
    r->last_committed = applied;
    return CUJU_OK;
}

int cuju_receiver_open(uint8_t *region, uint64_t region_size, uint32_t page_size, const char *devstate_path,
                       const char *journal_path, int durable, const struct cuju_disk_set *disks,
                       struct cuju_receiver **out, char *msg, size_t msglen)
{
    int rc;
    unsigned nd = disks ? disks->n : 0;
    if (nd > CUJU_DJ_MAX_DISKS) {
        set_msg(msg, msglen, "%u disks: at most %u can be replicated", nd, CUJU_DJ_MAX_DISKS);
        return CUJU_E_ARG;
    }
    if (page_size < CUJU_WIRE_MIN_PAGE || page_size > CUJU_WIRE_MAX_PAGE || (page_size & (page_size - 1)) ||
        region_size == 0 || region_size % page_size || region_size > CUJU_WIRE_MAX_REGION) {
        set_msg(msg, msglen, "page size %u / region size %llu not supported", page_size,
                (unsigned long long)region_size);
        return CUJU_E_ARG;
    }
    struct cuju_receiver *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return CUJU_E_NOMEM;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->fd = -1;
    r->jfd = -1;
    r->region = region;
    r->region_size = region_size;
    r->page_size = page_size;
    r->region_pages = region_size / page_size;
    r->durable = durable;
    if (nd) {
        r->disk_fds = calloc(nd, sizeof(int));
        r->disk_sizes = calloc(nd, sizeof(uint64_t));
        if (r->disk_fds == NULL || r->disk_sizes == NULL) {
            free(r->disk_fds);
            free(r->disk_sizes);
            r->disk_fds = NULL;
            free(r);
            return CUJU_E_NOMEM;
        }
        for (unsigned i = 0; i < nd; i++) {
            r->disk_fds[i] = disks->fds[i];
            r->disk_sizes[i] = disks->sizes[i];
        }
        r->ndisks = nd;
        r->disk_geom = cuju_disk_geometry(nd, r->disk_sizes);
    }
    size_t pl = strlen(devstate_path);
    r->devstate_path = strdup(devstate_path);
    r->devstate_tmp = malloc(pl + 5);
    if (r->devstate_path == NULL || r->devstate_tmp == NULL) {
        rc = CUJU_E_NOMEM;
        goto error;
    }
    memcpy(r->devstate_tmp, devstate_path, pl);
    memcpy(r->devstate_tmp + pl, ".tmp", 5);
    /* Fault injection for the test suite: CUJU_TEST_CRASH_IN_APPLY=E:P makes
     * the process exit after applying P page records of epoch E (live apply
     * or replay), leaving a half-applied region behind. */
    const char *crash = getenv("CUJU_TEST_CRASH_IN_APPLY");
    if (crash != NULL) {
        unsigned long long ce = 0, cp = 0;
        if (sscanf(crash, "%llu:%llu", &ce, &cp) == 2) {
            r->crash_epoch = ce;
            r->crash_pages = cp;
        }
    }
    /* CUJU_TEST_CRASH_IN_DISK_APPLY=E:R: exit after R disk records of epoch E. */
    crash = getenv("CUJU_TEST_CRASH_IN_DISK_APPLY");
    if (crash != NULL) {
        unsigned long long ce = 0, cr = 0;
        if (sscanf(crash, "%llu:%llu", &ce, &cr) == 2 && cr > 0) {
            r->crash_disk_epoch = ce;
            r->crash_disk_records = cr;
        }
    }
    rc = journal_open(r, journal_path, msg, msglen);
    if (rc != CUJU_OK)
        goto error;
    rc = replay(r, msg, msglen);
    if (rc != CUJU_OK)
        goto error;
    *out = r;
    return CUJU_OK;

error:
    r->ndisks = 0;      /* on failure the caller keeps its fds */
    cuju_receiver_free(r);
    return rc;
}

/* ---- the receive thread ---- */

static int send_ack(struct cuju_receiver *r, uint64_t epoch, int *eno)
{
    uint8_t f[CUJU_FRAME_HDR_LEN + CUJU_ACK_LEN];
    cuju_frame_header(f, CUJU_FRAME_ACK, CUJU_ACK_LEN);
    cuju_put_le64(f + 16, epoch);
    return cuju_link_send(&r->link, f, sizeof(f), r->io_timeout_ms, eno);
}

/* Refuse the peer: ERROR frame, record the failure. */
static void refuse(struct cuju_receiver *r, int code, const char *msg)
{
    cuju_link_send_error(&r->link, code, msg);
    rfail(r, code, 0, 0, "%s", msg);
}

static int handshake(struct cuju_receiver *r)
{
    uint8_t f[CUJU_FRAME_HDR_LEN + CUJU_HELLO_LEN];
    char msg[CUJU_ERRMSG_LEN];
    int eno = 0;
    int rc = cuju_link_recv(&r->link, f, CUJU_FRAME_HDR_LEN, r->hs_timeout_ms, &eno);
    if (rc != CUJU_OK) {
        rfail(r, rc, eno, 0, "waiting for the primary's HELLO: %s", cuju_strerror(rc));
        return rc;
    }
    if (cuju_get_le32(f) != CUJU_FRAME_HELLO) {
        refuse(r, CUJU_E_MAGIC, "first frame is not HELLO: not a cuju-libvirt FT link peer");
        return CUJU_E_MAGIC;
    }
    if (cuju_get_le32(f + 4) != 0 || cuju_get_le64(f + 8) != CUJU_HELLO_LEN) {
        refuse(r, CUJU_E_FRAME, "HELLO frame with bad flags or length");
        return CUJU_E_FRAME;
    }
    rc = cuju_link_recv(&r->link, f + 16, CUJU_HELLO_LEN, r->hs_timeout_ms, &eno);
    if (rc != CUJU_OK) {
        rfail(r, rc, eno, 0, "reading HELLO: %s", cuju_strerror(rc));
        return rc;
    }
    if (cuju_get_le64(f + 16) != CUJU_WIRE_MAGIC) {
        refuse(r, CUJU_E_MAGIC, "HELLO has the wrong magic: not a cuju-libvirt FT link peer");
        return CUJU_E_MAGIC;
    }
    if (cuju_get_le32(f + 24) != CUJU_WIRE_VERSION) {
        snprintf(msg, sizeof(msg), "primary speaks wire version %u, this backup %u", cuju_get_le32(f + 24),
                 CUJU_WIRE_VERSION);
        refuse(r, CUJU_E_VERSION, msg);
        return CUJU_E_VERSION;
    }
    if (cuju_get_le32(f + 28) != r->page_size || cuju_get_le64(f + 32) != r->region_size) {
        snprintf(msg, sizeof(msg), "primary has page size %u / region %llu bytes, this backup %u / %llu",
                 cuju_get_le32(f + 28), (unsigned long long)cuju_get_le64(f + 32), r->page_size,
                 (unsigned long long)r->region_size);
        refuse(r, CUJU_E_GEOMETRY, msg);
        return CUJU_E_GEOMETRY;
    }
    if (cuju_get_le64(f + 48) != r->disk_geom) {
        snprintf(msg, sizeof(msg), "primary replicates %u disk(s) (geometry %016llx), this backup %u (%016llx): "
                 "the disk lists or sizes differ", (unsigned)(cuju_get_le64(f + 48) >> 32),
                 (unsigned long long)cuju_get_le64(f + 48), r->ndisks, (unsigned long long)r->disk_geom);
        refuse(r, CUJU_E_GEOMETRY, msg);
        return CUJU_E_GEOMETRY;
    }
    r->session_id = cuju_get_le64(f + 40);
    cuju_frame_header(f, CUJU_FRAME_HELLO_REPLY, CUJU_HELLO_LEN);
    cuju_put_le64(f + 48, r->last_committed);    /* == applied: open replayed everything */
    rc = cuju_link_send(&r->link, f, sizeof(f), r->io_timeout_ms, &eno);
    if (rc != CUJU_OK)
        rfail(r, rc, eno, 0, "sending HELLO reply: %s", cuju_strerror(rc));
    return rc;
}

/* Receive, verify, commit and acknowledge one EPOCH frame whose 16-byte
 * header is already in `hdr`. */
static int receive_epoch(struct cuju_receiver *r, const uint8_t *hdr)
{
    char msg[CUJU_ERRMSG_LEN];
    int eno = 0, rc;
    int slot = r->recv_idx;

    pthread_mutex_lock(&r->lock);
    while (r->slot_state[slot] != SLOT_FREE && !r->stopping)
        pthread_cond_wait(&r->cond, &r->lock);
    int stop = r->stopping;
    pthread_mutex_unlock(&r->lock);
    if (stop)
        return CUJU_E_CLOSED;

    uint8_t *f = slot_mem(r, slot);
    uint64_t t0 = cuju_now_ns(), hash_ns = 0, th;
    uint8_t head[CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN];
    memcpy(head, hdr, CUJU_FRAME_HDR_LEN);
    rc = cuju_link_recv(&r->link, head + CUJU_FRAME_HDR_LEN, CUJU_EPOCH_HDR_LEN, r->io_timeout_ms, &eno);
    if (rc != CUJU_OK)
        goto io_error;
    uint64_t total, epoch, npages, ndata, devlen, disklen;
    rc = check_epoch_header(r, head, &total, &epoch, &npages, &ndata, &devlen, &disklen, msg, sizeof(msg));
    if (rc != CUJU_OK)
        goto refuse;
    /* The journal is sparse: allocate the slot's blocks before touching them
     * through the mapping, so a full file system is an error, not SIGBUS. */
    if (total > r->slot_alloc[slot]) {
        off_t at = (off_t)(META_LEN + (size_t)slot * r->slot_cap + r->slot_alloc[slot]);
        if (fallocate(r->jfd, 0, at, (off_t)(total - r->slot_alloc[slot])) < 0) {
            eno = errno;
            snprintf(msg, sizeof(msg), "backup journal cannot grow to %llu bytes: %s",
                     (unsigned long long)total, strerror(eno));
            cuju_link_send_error(&r->link, CUJU_E_JOURNAL, msg);
            rfail(r, CUJU_E_JOURNAL, eno, 0, "%s", msg);
            return CUJU_E_JOURNAL;
        }
        r->slot_alloc[slot] = total;
    }
    memcpy(f, head, sizeof(head));
    uint64_t want = r->last_committed + 1;
    if (r->st.epochs_received ? epoch != want : epoch < want) {
        snprintf(msg, sizeof(msg), "epoch %llu out of sequence (backup holds %llu)", (unsigned long long)epoch,
                 (unsigned long long)r->last_committed);
        rc = CUJU_E_SEQUENCE;
        goto refuse;
    }
    /* Page table first: reject bad indexes before taking the data. */
    uint8_t *table = f + CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN;
    rc = cuju_link_recv(&r->link, table, 8 * npages, r->io_timeout_ms, &eno);
    if (rc != CUJU_OK)
        goto io_error;
    th = cuju_now_ns();
    rc = check_table(r, table, npages, ndata, msg, sizeof(msg));
    if (rc != CUJU_OK)
        goto refuse;
    struct cuju_csum h;
    cuju_csum_init(&h, r->session_id);
    cuju_csum_update(&h, f, CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN + 8 * npages);
    hash_ns += cuju_now_ns() - th;
    size_t off = CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN + 8 * npages, body = total - 8;
    while (off < total) {
        size_t end = off + RECV_CHUNK < total ? off + RECV_CHUNK : total;
        rc = cuju_link_recv(&r->link, f + off, end - off, r->io_timeout_ms, &eno);
        if (rc != CUJU_OK)
            goto io_error;
        th = cuju_now_ns();
        size_t hend = end < body ? end : body;
        if (hend > off)
            cuju_csum_update(&h, f + off, hend - off);
        hash_ns += cuju_now_ns() - th;
        off = end;
    }
    uint64_t t1 = cuju_now_ns();
    uint64_t sum = cuju_csum_final(&h);
    rc = check_trailer(f + total - CUJU_TRAILER_LEN, epoch, sum, msg, sizeof(msg));
    if (rc != CUJU_OK)
        goto refuse;
    rc = cuju_dj_check_section(f + total - CUJU_TRAILER_LEN - disklen, disklen, r->ndisks, r->disk_sizes, msg,
                               sizeof(msg));
    if (rc != CUJU_OK)
        goto refuse;
    uint64_t t2 = cuju_now_ns();

    /* Commit: the slot record's epoch field last. */
    *meta64(r, OFF_SLOT(slot) + 8) = total;
    *meta64(r, OFF_SLOT(slot) + 16) = sum;
    *meta64(r, OFF_SLOT(slot) + 24) = r->session_id;
    if (r->durable)
        msync(r->jmem, r->jlen, MS_SYNC);
    __atomic_store_n(meta64(r, OFF_SLOT(slot)), epoch, __ATOMIC_RELEASE);
    if (r->durable)
        msync(r->jmem, META_LEN, MS_SYNC);
    pthread_mutex_lock(&r->lock);
    r->st.epochs_received++;
    r->st.wire_bytes += total;
    r->st.receive_ns += t1 - t0 - hash_ns;
    r->st.last_receive_ns = t1 - t0 - hash_ns;
    r->st.verify_ns += hash_ns + (t2 - t1);
    r->st.last_verify_ns = hash_ns + (t2 - t1);
    pthread_mutex_unlock(&r->lock);
    /* ACK as soon as the epoch is committed, before the apply thread even
     * sees it: the primary's ack latency never includes the apply. */
    rc = send_ack(r, epoch, &eno);
    pthread_mutex_lock(&r->lock);
    r->last_committed = epoch;
    r->slot_state[slot] = SLOT_COMMITTED;
    if (rc == CUJU_OK)
        r->st.last_acked_epoch = epoch;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    r->recv_idx ^= 1;
    if (rc != CUJU_OK) {
        rfail(r, rc, eno, 0, "sending ACK %llu: %s", (unsigned long long)epoch, cuju_strerror(rc));
        return rc;
    }
    return CUJU_OK;

io_error:
    rfail(r, rc, eno, 0, "receiving an epoch: %s", cuju_strerror(rc));
    return rc;
refuse:
    refuse(r, rc, msg);
    return rc;
}

static void *recv_main(void *arg)
{
    struct cuju_receiver *r = arg;
    uint8_t f[CUJU_FRAME_HDR_LEN + 8 + CUJU_WIRE_MAX_ERRMSG + 1];
    int eno = 0;

    if (handshake(r) != CUJU_OK)
        goto out;
    for (;;) {
        int rc = cuju_link_recv(&r->link, f, CUJU_FRAME_HDR_LEN, -1, &eno);
        if (rc != CUJU_OK) {
            pthread_mutex_lock(&r->lock);
            int quiet = r->stopping;
            pthread_mutex_unlock(&r->lock);
            if (!quiet)
                rfail(r, rc, eno, 0, "waiting for the next epoch: %s", cuju_strerror(rc));
            break;
        }
        uint32_t type = cuju_get_le32(f);
        uint64_t len = cuju_get_le64(f + 8);
        if (type == CUJU_FRAME_EPOCH) {
            if (receive_epoch(r, f) != CUJU_OK)
                break;
            continue;
        }
        if (cuju_get_le32(f + 4) != 0) {
            refuse(r, CUJU_E_FRAME, "frame with non-zero flags");
            break;
        }
        if (type == CUJU_FRAME_CLOSE && len == 0)
            break;      /* orderly end: the apply thread drains, wait() reports OK */
        if (type == CUJU_FRAME_ERROR && len >= 8 && len <= 8 + CUJU_WIRE_MAX_ERRMSG) {
            rc = cuju_link_recv(&r->link, f + 16, len, r->io_timeout_ms, &eno);
            uint32_t n = rc == CUJU_OK ? cuju_get_le32(f + 20) : 0;
            if (n > len - 8)
                n = (uint32_t)(len - 8);
            f[24 + n] = 0;
            rfail(r, CUJU_E_PEER, 0, rc == CUJU_OK ? (int)cuju_get_le32(f + 16) : 0, "primary reported: %s",
                  (char *)f + 24);
            break;
        }
        char msg[96];
        snprintf(msg, sizeof(msg), "unexpected frame type 0x%08x length %llu", type, (unsigned long long)len);
        refuse(r, CUJU_E_FRAME, msg);
        break;
    }
out:
    /* Every end of a session closes the connection (after an orderly CLOSE
     * too: the primary's ack thread sees EOF once all ACKs are out). */
    shutdown(r->fd, SHUT_RDWR);
    pthread_mutex_lock(&r->lock);
    r->recv_running = 0;
    r->recv_done = 1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* ---- the apply thread ---- */

static void *apply_main(void *arg)
{
    struct cuju_receiver *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->lock);
        int i = r->apply_idx;
        /* Only the end of the receive thread ends this one, never `stopping`
         * alone: an epoch committed (and ACKed) just before a close must be
         * applied before close() returns, or the replica read for failover
         * would lag the primary's last ACK. */
        while (r->slot_state[i] != SLOT_COMMITTED && !r->recv_done)
            pthread_cond_wait(&r->cond, &r->lock);
        if (r->slot_state[i] != SLOT_COMMITTED) {
            pthread_mutex_unlock(&r->lock);
            break;      /* nothing left to apply and the session is over */
        }
        r->slot_state[i] = SLOT_APPLYING;
        pthread_mutex_unlock(&r->lock);

        uint64_t t0 = cuju_now_ns(), nz = 0, nrec = 0;
        int eno = 0;
        const uint8_t *f = slot_mem(r, i);
        int rc = apply_frame(r, f, &nz, &nrec, &eno);
        uint64_t dt = cuju_now_ns() - t0;
        if (rc != CUJU_OK) {
            rfail(r, rc, eno, 0, "applying epoch %llu: %s (%s)", (unsigned long long)cuju_get_le64(f + 16),
                  cuju_strerror(rc), strerror(eno));
            if (r->fd >= 0)
                shutdown(r->fd, SHUT_RDWR);
            break;
        }
        pthread_mutex_lock(&r->lock);
        r->slot_state[i] = SLOT_FREE;
        r->apply_idx ^= 1;
        r->st.epochs_applied++;
        r->st.pages += cuju_get_le64(f + 24);
        r->st.zero_pages += nz;
        r->st.devstate_bytes += cuju_get_le64(f + 40);
        r->st.disk_records += nrec;
        r->st.disk_bytes += cuju_get_le64(f + 48);
        r->st.apply_ns += dt;
        r->st.last_apply_ns = dt;
        r->st.last_applied_epoch = cuju_get_le64(f + 16);
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
    }
    pthread_mutex_lock(&r->lock);
    r->apply_running = 0;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

int cuju_receiver_set_keys(struct cuju_receiver *r, const uint8_t *keys)
{
    if (r->started)
        return CUJU_E_ARG;
    return cuju_link_set_keys(&r->link, keys);
}

int cuju_receiver_start(struct cuju_receiver *r, int fd, int io_timeout_ms, int handshake_timeout_ms)
{
    if (r->started)
        return CUJU_E_ARG;
    r->fd = fd;
    r->link.fd = fd;
    r->io_timeout_ms = io_timeout_ms;
    r->hs_timeout_ms = handshake_timeout_ms;
    cuju_tune_socket(fd);
    pthread_mutex_lock(&r->lock);
    r->recv_running = r->apply_running = 1;
    pthread_mutex_unlock(&r->lock);
    if (pthread_create(&r->apply_thr, NULL, apply_main, r) != 0) {
        rfail(r, CUJU_E_NOMEM, errno, 0, "cannot start the apply thread");
        return CUJU_E_NOMEM;
    }
    if (pthread_create(&r->recv_thr, NULL, recv_main, r) != 0) {
        rfail(r, CUJU_E_NOMEM, errno, 0, "cannot start the receive thread");
        pthread_mutex_lock(&r->lock);
        r->recv_done = 1;
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
        pthread_join(r->apply_thr, NULL);
        return CUJU_E_NOMEM;
    }
    r->started = 1;
    return CUJU_OK;
}

int cuju_receiver_wait(struct cuju_receiver *r, int timeout_ms)
{
    struct timespec dl;
    int rc = CUJU_OK;
    if (!r->started)
        return CUJU_E_ARG;
    clock_gettime(CLOCK_REALTIME, &dl);
    if (timeout_ms >= 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&r->lock);
    while (r->recv_running || r->apply_running) {
        int w = timeout_ms < 0 ? pthread_cond_wait(&r->cond, &r->lock)
                               : pthread_cond_timedwait(&r->cond, &r->lock, &dl);
        if (w == ETIMEDOUT) {
            rc = CUJU_E_TIMEOUT;
            break;
        }
    }
    if (rc == CUJU_OK)
        rc = r->err;
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void cuju_receiver_stats(struct cuju_receiver *r, struct cuju_receiver_stats *out)
{
    pthread_mutex_lock(&r->lock);
    *out = r->st;
    pthread_mutex_unlock(&r->lock);
}

uint64_t cuju_receiver_last_applied(struct cuju_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t e = r->st.last_applied_epoch;
    pthread_mutex_unlock(&r->lock);
    return e;
}

int cuju_receiver_error(struct cuju_receiver *r, int *err_errno, int *peer_code, char *msg, size_t msglen)
{
    pthread_mutex_lock(&r->lock);
    int rc = r->err;
    *err_errno = r->err_errno;
    *peer_code = r->peer_code;
    snprintf(msg, msglen, "%s", r->err_msg);
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void cuju_receiver_close(struct cuju_receiver *r)
{
    if (r->started) {
        /* Let the apply thread finish what is committed (the journal would
         * replay it anyway), stop receiving now. */
        pthread_mutex_lock(&r->lock);
        r->stopping = 1;
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
        shutdown(r->fd, SHUT_RDWR);
        pthread_join(r->recv_thr, NULL);
        pthread_join(r->apply_thr, NULL);
        r->started = 0;
    }
    if (r->fd >= 0) {
        close(r->fd);
        r->fd = -1;
    }
}

void cuju_receiver_free(struct cuju_receiver *r)
{
    if (r == NULL)
        return;
    cuju_receiver_close(r);
    if (r->jmem)
        munmap(r->jmem, r->jlen);
    if (r->jfd >= 0)
        close(r->jfd);
    cuju_link_clear(&r->link);
    for (unsigned i = 0; i < r->ndisks; i++)
        if (r->disk_fds[i] >= 0)
            close(r->disk_fds[i]);
    free(r->disk_fds);
    free(r->disk_sizes);
    free(r->devstate_path);
    free(r->devstate_tmp);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cond);
    free(r);
}
