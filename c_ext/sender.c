/* Epoch sender (primary side of wire.h). Plain C, POSIX threads.
 *
 * Threads: the caller (stage/ship/wait_ack/stats/close), the send thread
 * (checksums and writes queued epochs) and the ack thread (reads ACK and
 * ERROR frames). Two staging buffers alternate: the caller gathers epoch N+1
 * into one while the send thread writes epoch N from the other. A buffer is
 * free again once written to the socket; a broken connection ends the session
 * (the engine resynchronises on a new one), so nothing is kept for resend.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "aead.h"
#include "checksum.h"
#include "diskjournal.h"
#include "replicator.h"
#include "streamcopy.h"

#define SEND_CHUNK (1u << 20)
#define ACK_RING 64
#define STREAM_GATHER_BYTES (16u << 20)

enum buf_state { BUF_FREE, BUF_FILLED, BUF_QUEUED, BUF_SENDING };

/* A frame is sent as segments: the staging buffer's bytes, with each
 * borrowed disk part's records in between (sent from where they lie). */
#define MAX_SEGS (2 * CUJU_DJ_MAX_DISKS + 1)
struct seg {
    const uint8_t *p;
    size_t len;
};

struct stagebuf {
    uint8_t *mem;           /* immutable after new */
    size_t cap;             /* immutable after new */
    size_t len;             /* writer: the thread that owns the buffer by state; whole frame */
    uint64_t epoch;         /* idem */
    struct seg seg[MAX_SEGS];   /* idem: the frame, in order; the last one is in mem */
    unsigned nseg;          /* idem */
    uint8_t *csum_at;       /* idem: the trailer's checksum field (last 8 bytes of the last segment) */
    enum buf_state state;   /* lock */
};

struct cuju_sender {
    pthread_mutex_t lock;
    pthread_cond_t cond;            /* any state change below; broadcast */
    pthread_mutex_t caller_lock;    /* serialises stage/ship among caller threads */

    /* Immutable after cuju_sender_new (link keys: set before the handshake). */
    int fd;
    struct cuju_link link;
    const uint8_t *region;
    uint64_t region_size;
    uint64_t region_pages;
    uint32_t page_size;
    uint64_t session_id;
    uint64_t disks;                 /* the HELLO's disks field */
    int io_timeout_ms;

    struct stagebuf buf[2];
    int stage_idx;                  /* caller_lock: buffer the next stage fills */
    int ship_idx;                   /* lock: buffer the send thread writes next */

    int handshaken;                 /* lock */
    int threads_started;            /* caller (handshake/close) */
    int send_running;               /* lock */
    int ack_running;                /* lock */
    int stopping;                   /* lock: threads must exit */
    int close_requested;            /* lock: send CLOSE once the queue is empty */
    int close_sent;                 /* lock */
    uint64_t peer_last_applied;     /* lock */
    uint64_t next_ack;              /* ack thread: epoch the next ACK must name (0: not yet known) */
    uint64_t first_epoch;           /* lock: first epoch staged in this session, 0 before */

    struct { uint64_t epoch, t_ns; } ring[ACK_RING]; /* lock: write end time per shipped epoch */

    int err;                        /* lock: first failure, CUJU_OK if none */
    int err_errno;                  /* lock */
    int peer_code;                  /* lock: code from the peer's ERROR frame */
    char err_msg[CUJU_ERRMSG_LEN];  /* lock */

    struct cuju_sender_stats st;    /* lock (each field names its writer thread) */

    pthread_t send_thr;
    pthread_t ack_thr;
};

static void fail(struct cuju_sender *s, int code, int eno, int peer_code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void fail(struct cuju_sender *s, int code, int eno, int peer_code, const char *fmt, ...)
{
    pthread_mutex_lock(&s->lock);
    if (s->err == CUJU_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->err_msg, sizeof(s->err_msg), fmt, ap);
        va_end(ap);
        s->err = code;
        s->err_errno = eno;
        s->peer_code = peer_code;
        s->st.errors++;
    }
    s->stopping = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    /* Wake the other thread out of poll(). */
    shutdown(s->fd, SHUT_RDWR);
}

static void abs_deadline(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Wait on s->cond; timeout_ms < 0 waits forever. Returns ETIMEDOUT or 0. */
static int cond_wait_ms(struct cuju_sender *s, const struct timespec *deadline)
{
    if (deadline == NULL)
        return pthread_cond_wait(&s->cond, &s->lock);
    return pthread_cond_timedwait(&s->cond, &s->lock, deadline);
}

int cuju_sender_new(int fd, const uint8_t *region, uint64_t region_size, uint32_t page_size,
                    uint64_t session_id, uint64_t disks, int io_timeout_ms, struct cuju_sender **out)
{
    if (page_size < CUJU_WIRE_MIN_PAGE || page_size > CUJU_WIRE_MAX_PAGE || (page_size & (page_size - 1)) ||
        region_size == 0 || region_size % page_size || region_size > CUJU_WIRE_MAX_REGION)
        return CUJU_E_ARG;
    struct cuju_sender *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return CUJU_E_NOMEM;
    s->fd = fd;
    s->link.fd = fd;
    s->region = region;
    s->region_size = region_size;
    s->page_size = page_size;
    s->region_pages = region_size / page_size;
    s->session_id = session_id;
    s->disks = disks;
    s->io_timeout_ms = io_timeout_ms;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->caller_lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    size_t cap = CUJU_FRAME_HDR_LEN + cuju_epoch_payload_len(s->region_pages, s->region_pages, page_size,
                                                             CUJU_WIRE_MAX_DEVSTATE, disks ? CUJU_WIRE_MAX_DISK : 0);
    for (int i = 0; i < 2; i++) {
        /* Reserved, not committed: only the pages an epoch touches use memory. */
        void *m = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            s->fd = -1;
            cuju_sender_free(s);
            return CUJU_E_NOMEM;
        }
        s->buf[i].mem = m;
        s->buf[i].cap = cap;
        s->buf[i].state = BUF_FREE;
    }
    cuju_tune_socket(fd);
    *out = s;
    return CUJU_OK;
}

static void *send_main(void *arg);
static void *ack_main(void *arg);

int cuju_sender_set_keys(struct cuju_sender *s, const uint8_t *keys)
{
    if (s->threads_started)
        return CUJU_E_ARG;
    return cuju_link_set_keys(&s->link, keys);
}

int cuju_sender_handshake(struct cuju_sender *s, int timeout_ms, uint64_t *last_applied)
{
    uint8_t f[CUJU_FRAME_HDR_LEN + CUJU_HELLO_LEN];
    int eno = 0, rc;

    if (s->threads_started)
        return CUJU_E_ARG;
    cuju_frame_header(f, CUJU_FRAME_HELLO, CUJU_HELLO_LEN);
    cuju_put_le64(f + 16, CUJU_WIRE_MAGIC);
    cuju_put_le32(f + 24, CUJU_WIRE_VERSION);
    cuju_put_le32(f + 28, s->page_size);
    cuju_put_le64(f + 32, s->region_size);
    cuju_put_le64(f + 40, s->session_id);
    cuju_put_le64(f + 48, s->disks);
    rc = cuju_link_send(&s->link, f, sizeof(f), timeout_ms, &eno);
    if (rc != CUJU_OK) {
        fail(s, rc, eno, 0, "sending HELLO: %s", cuju_strerror(rc));
        return rc;
    }
    rc = cuju_link_recv(&s->link, f, CUJU_FRAME_HDR_LEN, timeout_ms, &eno);
    if (rc != CUJU_OK) {
        fail(s, rc, eno, 0, "waiting for the backup's HELLO reply: %s", cuju_strerror(rc));
        return rc;
    }
    uint32_t type = cuju_get_le32(f), flags = cuju_get_le32(f + 4);
    uint64_t len = cuju_get_le64(f + 8);
    if (type == CUJU_FRAME_ERROR && flags == 0 && len >= 8 && len <= 8 + CUJU_WIRE_MAX_ERRMSG) {
        uint8_t e[8 + CUJU_WIRE_MAX_ERRMSG + 1];
        rc = cuju_link_recv(&s->link, e, len, timeout_ms, &eno);
        if (rc != CUJU_OK) {
            fail(s, rc, eno, 0, "reading the backup's ERROR frame: %s", cuju_strerror(rc));
            return rc;
        }
        uint32_t n = cuju_get_le32(e + 4);
        if (n > len - 8)
            n = (uint32_t)(len - 8);
        e[8 + n] = 0;
        fail(s, CUJU_E_PEER, 0, (int)cuju_get_le32(e), "backup refused the handshake: %s", (char *)e + 8);
        return CUJU_E_PEER;
    }
    if (type != CUJU_FRAME_HELLO_REPLY || flags != 0 || len != CUJU_HELLO_LEN) {
        fail(s, CUJU_E_FRAME, 0, 0, "expected HELLO reply, got frame type 0x%08x length %llu", type,
             (unsigned long long)len);
        return CUJU_E_FRAME;
    }
    rc = cuju_link_recv(&s->link, f + 16, CUJU_HELLO_LEN, timeout_ms, &eno);
    if (rc != CUJU_OK) {
        fail(s, rc, eno, 0, "reading the HELLO reply: %s", cuju_strerror(rc));
        return rc;
    }
    if (cuju_get_le64(f + 16) != CUJU_WIRE_MAGIC) {
        fail(s, CUJU_E_MAGIC, 0, 0, "backup's HELLO reply has the wrong magic");
        return CUJU_E_MAGIC;
    }
    if (cuju_get_le32(f + 24) != CUJU_WIRE_VERSION) {
        fail(s, CUJU_E_VERSION, 0, 0, "backup speaks wire version %u, this side %u", cuju_get_le32(f + 24),
             CUJU_WIRE_VERSION);
        return CUJU_E_VERSION;
    }
    if (cuju_get_le32(f + 28) != s->page_size || cuju_get_le64(f + 32) != s->region_size) {
        fail(s, CUJU_E_GEOMETRY, 0, 0, "backup has page size %u / region %llu bytes, this side %u / %llu",
             cuju_get_le32(f + 28), (unsigned long long)cuju_get_le64(f + 32), s->page_size,
             (unsigned long long)s->region_size);
        return CUJU_E_GEOMETRY;
    }
    if (cuju_get_le64(f + 40) != s->session_id) {
        fail(s, CUJU_E_FRAME, 0, 0, "backup echoed another session id");
        return CUJU_E_FRAME;
    }
    pthread_mutex_lock(&s->lock);
    s->peer_last_applied = cuju_get_le64(f + 48);
    s->handshaken = 1;
    s->send_running = s->ack_running = 1;
    pthread_mutex_unlock(&s->lock);
    *last_applied = s->peer_last_applied;
    if (pthread_create(&s->send_thr, NULL, send_main, s) != 0) {
        fail(s, CUJU_E_NOMEM, errno, 0, "cannot start the send thread");
        return CUJU_E_NOMEM;
    }
    if (pthread_create(&s->ack_thr, NULL, ack_main, s) != 0) {
        fail(s, CUJU_E_NOMEM, errno, 0, "cannot start the ack thread");
        pthread_join(s->send_thr, NULL);
        return CUJU_E_NOMEM;
    }
    s->threads_started = 1;
    return CUJU_OK;
}

static int page_is_zero(const uint8_t *p, uint32_t len)
{
    const uint64_t *w = (const uint64_t *)p;
    if (w[0])
        return 0;
    for (uint32_t i = 0; i < len / 8; i += 8) {
        uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}

int cuju_sender_stage(struct cuju_sender *s, uint64_t epoch, const uint64_t *idx, size_t n,
                      const uint8_t *dev, size_t devlen, const struct cuju_disk_part *parts, size_t nparts,
                      int timeout_ms, int *slot)
{
    int rc = CUJU_OK;
    struct timespec dl, *dlp = NULL;

    if (timeout_ms >= 0) {
        abs_deadline(&dl, timeout_ms);
        dlp = &dl;
    }
    pthread_mutex_lock(&s->caller_lock);
    pthread_mutex_lock(&s->lock);
    if (!s->handshaken) {
        rc = CUJU_E_ARG;
        goto unlock;
    }
    struct stagebuf *b = &s->buf[s->stage_idx];
    if (s->buf[s->stage_idx ^ 1].state == BUF_FILLED || b->state == BUF_FILLED) {
        rc = CUJU_E_SEQUENCE;    /* staged twice without ship */
        goto unlock;
    }
    uint64_t expect = s->st.last_staged_epoch ? s->st.last_staged_epoch + 1 : 0;
    if ((expect && epoch != expect) || (!expect && epoch <= s->peer_last_applied)) {
        rc = CUJU_E_SEQUENCE;
        goto unlock;
    }
    while (b->state != BUF_FREE && s->err == CUJU_OK && !s->stopping) {
        if (cond_wait_ms(s, dlp) == ETIMEDOUT) {
            rc = CUJU_E_TIMEOUT;
            goto unlock;
        }
    }
    if (s->err != CUJU_OK) {
        rc = s->err;
        goto unlock;
    }
    if (s->stopping) {
        rc = CUJU_E_CLOSED;
        goto unlock;
    }
    pthread_mutex_unlock(&s->lock);

    /* The buffer is ours (FREE, and only this caller moves it out of FREE). */
    if (n > s->region_pages || devlen > CUJU_WIRE_MAX_DEVSTATE || (nparts && !s->disks)) {
        rc = CUJU_E_ARG;
        goto out;
    }
    uint64_t disklen = 0;
    for (size_t i = 0; i < nparts; i++) {
        if (parts[i].len % 8 || parts[i].len > CUJU_WIRE_MAX_DISK || parts[i].disk >= (s->disks >> 32)) {
            rc = CUJU_E_ARG;
            goto out;
        }
        if (parts[i].len)
            disklen += CUJU_DJ_PART_LEN + parts[i].len;
    }
    if (disklen > CUJU_WIRE_MAX_DISK) {
        rc = CUJU_E_ARG;
        goto out;
    }
    uint64_t t0 = cuju_now_ns();
    uint8_t *m = b->mem;
    uint8_t *table = m + CUJU_FRAME_HDR_LEN + CUJU_EPOCH_HDR_LEN;
    uint8_t *data = table + 8 * n;
    const uint32_t ps = s->page_size;
    uint64_t ndata = 0, nzero = 0;
    /* An epoch far larger than the caches is cold again by the time the send
     * thread checksums it: skip the read-for-ownership of its lines. */
    int stream = (uint64_t)n * ps >= STREAM_GATHER_BYTES;
    for (size_t i = 0; i < n; i++) {
        uint64_t pi = idx[i];
        if (pi >= s->region_pages) {
            rc = CUJU_E_INDEX;
            goto out;
        }
        const uint8_t *src = s->region + pi * ps;
        if (page_is_zero(src, ps)) {
            cuju_put_le64(table + 8 * i, pi | ((uint64_t)CUJU_ENC_ZERO << 56));
            nzero++;
        } else {
            cuju_put_le64(table + 8 * i, pi);
            if (stream)
                cuju_stream_copy(data + ndata * ps, src, ps);
            else
                memcpy(data + ndata * ps, src, ps);
            ndata++;
        }
    }
    if (stream)
        cuju_stream_fence();    /* before the send thread may read the pages */
    uint8_t *p = data + ndata * ps, *seg_start = m;
    unsigned nseg = 0;
    if (devlen)
        memcpy(p, dev, devlen);
    p += devlen;
    for (size_t i = 0; i < nparts; i++) {
        if (parts[i].len == 0)
            continue;
        cuju_put_le32(p, parts[i].disk);
        cuju_put_le32(p + 4, 0);
        cuju_put_le64(p + 8, parts[i].len);
        p += CUJU_DJ_PART_LEN;
        if (parts[i].borrowed) {
            b->seg[nseg++] = (struct seg){seg_start, (size_t)(p - seg_start)};
            b->seg[nseg++] = (struct seg){parts[i].records, parts[i].len};
            seg_start = p;
        } else {
            memcpy(p, parts[i].records, parts[i].len);
            p += parts[i].len;
        }
    }
    cuju_put_le64(p, CUJU_WIRE_END_MAGIC);
    cuju_put_le64(p + 8, epoch);
    cuju_put_le64(p + 16, 0);   /* checksum: the send thread fills it in */
    uint64_t plen = cuju_epoch_payload_len(n, ndata, ps, devlen, disklen);
    cuju_frame_header(m, CUJU_FRAME_EPOCH, plen);
    cuju_put_le64(m + 16, epoch);
    cuju_put_le64(m + 24, n);
    cuju_put_le64(m + 32, ndata);
    cuju_put_le64(m + 40, devlen);
    cuju_put_le64(m + 48, disklen);
    b->len = CUJU_FRAME_HDR_LEN + plen;
    b->seg[nseg++] = (struct seg){seg_start, (size_t)(p + CUJU_TRAILER_LEN - seg_start)};
    b->nseg = nseg;
    b->csum_at = p + 16;
    b->epoch = epoch;
    uint64_t dt = cuju_now_ns() - t0;

    pthread_mutex_lock(&s->lock);
    b->state = BUF_FILLED;
    if (slot)
        *slot = s->stage_idx;
    s->stage_idx ^= 1;
    if (s->first_epoch == 0)
        s->first_epoch = epoch;
    s->st.epochs_staged++;
    s->st.pages += n;
    s->st.zero_pages += nzero;
    s->st.saved_bytes += nzero * ps;
    s->st.devstate_bytes += devlen;
    s->st.disk_bytes += disklen;
    s->st.stage_ns += dt;
    s->st.last_stage_ns = dt;
    s->st.last_staged_epoch = epoch;
unlock:
    pthread_mutex_unlock(&s->lock);
out:
    pthread_mutex_unlock(&s->caller_lock);
    return rc;
}

int cuju_sender_ship(struct cuju_sender *s)
{
    int rc = CUJU_E_SEQUENCE;
    pthread_mutex_lock(&s->caller_lock);
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < 2; i++) {
        if (s->buf[i].state == BUF_FILLED) {
            s->buf[i].state = BUF_QUEUED;
            rc = CUJU_OK;
            pthread_cond_broadcast(&s->cond);
        }
    }
    if (rc == CUJU_OK && s->err != CUJU_OK)
        rc = s->err;
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->caller_lock);
    return rc;
}

static void *send_main(void *arg)
{
    struct cuju_sender *s = arg;
    int eno = 0;

    for (;;) {
        pthread_mutex_lock(&s->lock);
        struct stagebuf *b = &s->buf[s->ship_idx];
        while (!s->stopping && b->state != BUF_QUEUED && !s->close_requested)
            pthread_cond_wait(&s->cond, &s->lock);
        if (s->stopping || (b->state != BUF_QUEUED && s->close_requested)) {
            int send_close = !s->stopping && s->close_requested;
            pthread_mutex_unlock(&s->lock);
            if (send_close) {
                /* Marked before the write: the backup may answer CLOSE
                 * with EOF before this thread runs again. */
                pthread_mutex_lock(&s->lock);
                s->close_sent = 1;
                pthread_mutex_unlock(&s->lock);
                uint8_t f[CUJU_FRAME_HDR_LEN];
                cuju_frame_header(f, CUJU_FRAME_CLOSE, 0);
                int rc = cuju_link_send(&s->link, f, sizeof(f), s->io_timeout_ms, &eno);
                if (rc != CUJU_OK)
                    fail(s, rc, eno, 0, "sending CLOSE: %s", cuju_strerror(rc));
            }
            break;
        }
        b->state = BUF_SENDING;
        pthread_mutex_unlock(&s->lock);

        uint64_t t0 = cuju_now_ns();
        struct cuju_csum h;
        cuju_csum_init(&h, s->session_id);
        int rc = CUJU_OK;
        /* Checksum each chunk just before writing it (it is in cache); the
         * checksum covers the frame but its own last 8 bytes, which end the
         * last segment (in the staging buffer). */
        for (unsigned k = 0; k < b->nseg && rc == CUJU_OK; k++) {
            const uint8_t *sp = b->seg[k].p;
            size_t len = b->seg[k].len, off = 0, body = k + 1 == b->nseg ? len - 8 : len;
            while (off < len) {
                size_t end = off + SEND_CHUNK < body ? off + SEND_CHUNK : body;
                if (end > off)
                    cuju_csum_update(&h, sp + off, end - off);
                if (end == body && body < len) {
                    cuju_put_le64(b->csum_at, cuju_csum_final(&h));
                    end = len;
                }
                rc = cuju_link_send(&s->link, sp + off, end - off, s->io_timeout_ms, &eno);
                if (rc != CUJU_OK)
                    break;
                off = end;
            }
        }
        uint64_t t1 = cuju_now_ns();
        if (rc == CUJU_E_EOF) {
            /* A backup that refuses an epoch sends ERROR and closes while we
             * are still writing: give the ack thread a moment to read its
             * reason, which says more than "connection reset". */
            struct timespec dl;
            abs_deadline(&dl, 500);
            pthread_mutex_lock(&s->lock);
            while (s->ack_running && s->err == CUJU_OK)
                if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT)
                    break;
            pthread_mutex_unlock(&s->lock);
        }
        if (rc != CUJU_OK) {
            fail(s, rc, eno, 0, "sending epoch %llu: %s", (unsigned long long)b->epoch, cuju_strerror(rc));
            break;
        }
        pthread_mutex_lock(&s->lock);
        s->ring[b->epoch % ACK_RING].epoch = b->epoch;
        s->ring[b->epoch % ACK_RING].t_ns = t1;
        s->st.epochs_shipped++;
        s->st.wire_bytes += b->len;
        s->st.send_ns += t1 - t0;
        s->st.last_send_ns = t1 - t0;
        s->st.last_shipped_epoch = b->epoch;
        b->state = BUF_FREE;
        s->ship_idx ^= 1;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
    }
    pthread_mutex_lock(&s->lock);
    s->send_running = 0;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static void *ack_main(void *arg)
{
    struct cuju_sender *s = arg;
    uint8_t f[CUJU_FRAME_HDR_LEN + 8 + CUJU_WIRE_MAX_ERRMSG + 1];
    int eno = 0;

    for (;;) {
        int rc = cuju_link_recv(&s->link, f, CUJU_FRAME_HDR_LEN, -1, &eno);
        if (rc != CUJU_OK) {
            pthread_mutex_lock(&s->lock);
            int quiet = s->stopping || (rc == CUJU_E_EOF && s->close_sent &&
                                        s->st.last_acked_epoch == s->st.last_staged_epoch);
            pthread_mutex_unlock(&s->lock);
            if (!quiet)
                fail(s, rc, eno, 0, "reading from the backup: %s", cuju_strerror(rc));
            break;
        }
        uint32_t type = cuju_get_le32(f), flags = cuju_get_le32(f + 4);
        uint64_t len = cuju_get_le64(f + 8);
        if (flags != 0) {
            fail(s, CUJU_E_FRAME, 0, 0, "backup sent a frame with flags 0x%x", flags);
            break;
        }
        if (type == CUJU_FRAME_ACK && len == CUJU_ACK_LEN) {
            rc = cuju_link_recv(&s->link, f + 16, 8, s->io_timeout_ms, &eno);
            if (rc != CUJU_OK) {
                fail(s, rc, eno, 0, "reading an ACK: %s", cuju_strerror(rc));
                break;
            }
            uint64_t e = cuju_get_le64(f + 16);
            uint64_t now = cuju_now_ns();
            pthread_mutex_lock(&s->lock);
            uint64_t want = s->st.last_acked_epoch ? s->st.last_acked_epoch + 1 : s->first_epoch;
            if (want == 0 || e != want || e > s->st.last_staged_epoch) {
                pthread_mutex_unlock(&s->lock);
                fail(s, CUJU_E_SEQUENCE, 0, 0, "backup acknowledged epoch %llu, expected %llu",
                     (unsigned long long)e, (unsigned long long)want);
                break;
            }
            /* The ACK can overtake the send thread's bookkeeping of that
             * epoch; let it finish so that counters never show an epoch
             * acked before it is shipped. */
            while (s->st.last_shipped_epoch < e && !s->stopping && s->err == CUJU_OK)
                pthread_cond_wait(&s->cond, &s->lock);
            s->st.last_acked_epoch = e;
            s->st.epochs_acked++;
            if (s->ring[e % ACK_RING].epoch == e && s->ring[e % ACK_RING].t_ns) {
                uint64_t w = now > s->ring[e % ACK_RING].t_ns ? now - s->ring[e % ACK_RING].t_ns : 0;
                s->st.ack_wait_ns += w;
                s->st.last_ack_wait_ns = w;
            }
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        if (type == CUJU_FRAME_ERROR && len >= 8 && len <= 8 + CUJU_WIRE_MAX_ERRMSG) {
            rc = cuju_link_recv(&s->link, f + 16, len, s->io_timeout_ms, &eno);
            if (rc != CUJU_OK) {
                fail(s, rc, eno, 0, "reading the backup's ERROR frame: %s", cuju_strerror(rc));
                break;
            }
            uint32_t n = cuju_get_le32(f + 20);
            if (n > len - 8)
                n = (uint32_t)(len - 8);
            f[24 + n] = 0;
            fail(s, CUJU_E_PEER, 0, (int)cuju_get_le32(f + 16), "backup reported: %s", (char *)f + 24);
            break;
        }
        fail(s, CUJU_E_FRAME, 0, 0, "backup sent frame type 0x%08x length %llu", type,
             (unsigned long long)len);
        break;
    }
    pthread_mutex_lock(&s->lock);
    s->ack_running = 0;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int cuju_sender_wait_ack(struct cuju_sender *s, uint64_t epoch, int timeout_ms)
{
    struct timespec dl, *dlp = NULL;
    int rc;
    if (timeout_ms >= 0) {
        abs_deadline(&dl, timeout_ms);
        dlp = &dl;
    }
    pthread_mutex_lock(&s->lock);
    for (;;) {
        if (s->st.last_acked_epoch >= epoch) {
            rc = CUJU_OK;
            break;
        }
        if (s->err != CUJU_OK) {
            rc = s->err;
            break;
        }
        if (s->stopping || !s->ack_running) {
            rc = CUJU_E_CLOSED;
            break;
        }
        if (cond_wait_ms(s, dlp) == ETIMEDOUT) {
            rc = CUJU_E_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

void cuju_sender_stats(struct cuju_sender *s, struct cuju_sender_stats *out)
{
    pthread_mutex_lock(&s->lock);
    *out = s->st;
    pthread_mutex_unlock(&s->lock);
}

int cuju_sender_error(struct cuju_sender *s, int *err_errno, int *peer_code, char *msg, size_t msglen)
{
    pthread_mutex_lock(&s->lock);
    int rc = s->err;
    *err_errno = s->err_errno;
    *peer_code = s->peer_code;
    snprintf(msg, msglen, "%s", s->err_msg);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int cuju_sender_close(struct cuju_sender *s, int orderly, int timeout_ms)
{
    struct timespec dl;
    int rc = CUJU_OK;
    abs_deadline(&dl, timeout_ms < 0 ? 3600000 : timeout_ms);
    pthread_mutex_lock(&s->lock);
    if (orderly && s->threads_started && s->err == CUJU_OK) {
        s->close_requested = 1;
        pthread_cond_broadcast(&s->cond);
        /* Drain: the send thread writes what is queued, then CLOSE; the
         * backup acks the rest and closes, ending the ack thread. */
        while ((s->send_running || s->ack_running) && s->err == CUJU_OK)
            if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT) {
                rc = CUJU_E_TIMEOUT;
                break;
            }
        if (rc == CUJU_OK && s->err != CUJU_OK)
            rc = s->err;
    }
    s->stopping = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    if (s->fd >= 0)
        shutdown(s->fd, SHUT_RDWR);
    if (s->threads_started) {
        pthread_join(s->send_thr, NULL);
        pthread_join(s->ack_thr, NULL);
        s->threads_started = 0;
    }
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    return rc;
}

void cuju_sender_free(struct cuju_sender *s)
{
    if (s == NULL)
        return;
    cuju_sender_close(s, 0, 0);
    for (int i = 0; i < 2; i++)
        if (s->buf[i].mem)
            munmap(s->buf[i].mem, s->buf[i].cap);
    cuju_link_clear(&s->link);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->caller_lock);
    pthread_cond_destroy(&s->cond);
    free(s);
}
