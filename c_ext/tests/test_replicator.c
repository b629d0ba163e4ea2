/* Plain-C test and benchmark of the replication data plane (no Python).
 *
 *   test_replicator test DIR       replica equality over loopback TCP, hostile
 *                                  frames, mutation fuzz, the FT link's record
 *                                  layer against tampering; exit 0 when all pass
 *   test_replicator bench DIR [N]  N epochs of 10,000 random 4 KiB pages against
 *                                  a raw push of the same bytes; prints JSON
 *
 * DIR holds the device-state file and the journal (use tmpfs). Built with
 * -fsanitize=address,undefined by tests/integration/test_c_dataplane.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "aead.h"
#include "checksum.h"
#include "replicator.h"

#define PS 4096u

static int failures;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                         \
            fprintf(stderr, __VA_ARGS__);                                                \
            fputc('\n', stderr);                                                         \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, 8);
    }
}

static uint8_t *region_new(size_t pages)
{
    void *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return m;
}

static void tcp_pair(int *a, int *b)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(l, 1) < 0 ||
        getsockname(l, (struct sockaddr *)&sa, &sl) < 0) {
        perror("listen");
        exit(2);
    }
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*a, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("connect");
        exit(2);
    }
    *b = accept(l, NULL, NULL);
    close(l);
}

static int file_equals(const char *path, const uint8_t *want, size_t len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    uint8_t *buf = malloc(len + 1);
    size_t n = fread(buf, 1, len + 1, f);
    fclose(f);
    int eq = n == len && memcmp(buf, want, len) == 0;
    free(buf);
    return eq;
}

/* ---- replica equality ---- */

static void test_equality(const char *dir)
{
    const size_t pages = 1024;
    uint8_t *prim = region_new(pages), *stby = region_new(pages);
    char state[512], jnl[512];
    snprintf(state, sizeof(state), "%s/eq-state", dir);
    snprintf(jnl, sizeof(jnl), "%s/eq-journal", dir);
    unlink(jnl);
    fill_random(prim, pages * PS);
    for (size_t p = 0; p < pages; p += 3)
        memset(prim + p * PS, 0, PS);

    int a, b;
    tcp_pair(&a, &b);
    struct cuju_receiver *r;
    char msg[CUJU_ERRMSG_LEN];
    CHECK(cuju_receiver_open(stby, pages * PS, PS, state, jnl, 0, NULL, &r, msg, sizeof(msg)) == CUJU_OK, "open: %s",
          msg);
    CHECK(cuju_receiver_start(r, b, 5000, 5000) == CUJU_OK, "receiver start");
    struct cuju_sender *s;
    CHECK(cuju_sender_new(a, prim, pages * PS, PS, 42, 0, 5000, &s) == CUJU_OK, "sender new");
    uint64_t held = 99;
    CHECK(cuju_sender_handshake(s, 5000, &held) == CUJU_OK && held == 0, "handshake");

    uint64_t *idx = malloc(pages * 2 * sizeof(uint64_t));
    uint8_t dev[3000];
    size_t devlen = 0;
    for (uint64_t e = 1; e <= 60; e++) {
        size_t n = 0;
        if (e == 1) {
            for (size_t p = 0; p < pages; p++)
                idx[n++] = p;
        } else {
            size_t k = 1 + rnd() % 200;
            for (size_t i = 0; i < k; i++) {
                uint64_t p = rnd() % pages;
                uint8_t *pg = prim + p * PS;
                switch (rnd() % 4) {
                case 0: memset(pg, 0, PS); break;                         /* zeroed */
                case 1: fill_random(pg + (rnd() % 500) * 8, 64); break;   /* sub-page */
                case 2: fill_random(pg, PS); break;                      /* rewritten */
                default: break;                                          /* false positive */
                }
                idx[n++] = p;
                if (rnd() % 20 == 0)
                    idx[n++] = p;                                        /* listed twice */
            }
        }
        devlen = rnd() % sizeof(dev);
        fill_random(dev, devlen & ~(size_t)7);
        CHECK(cuju_sender_stage(s, e, idx, n, dev, devlen, NULL, 0, 5000, NULL) == CUJU_OK, "stage %llu", (unsigned long long)e);
        CHECK(cuju_sender_ship(s) == CUJU_OK, "ship");
        if (e > 1)
            CHECK(cuju_sender_wait_ack(s, e - 1, 5000) == CUJU_OK, "ack %llu", (unsigned long long)e - 1);
    }
    CHECK(cuju_sender_wait_ack(s, 60, 5000) == CUJU_OK, "last ack");
    CHECK(cuju_sender_close(s, 1, 5000) == CUJU_OK, "orderly close");
    CHECK(cuju_receiver_wait(r, 5000) == CUJU_OK, "receiver ends cleanly");
    CHECK(cuju_receiver_last_applied(r) == 60, "last applied %llu", (unsigned long long)cuju_receiver_last_applied(r));
    CHECK(memcmp(prim, stby, pages * PS) == 0, "replica equals the primary's last epoch");
    CHECK(file_equals(state, dev, devlen), "device state equals the last blob");
    struct cuju_sender_stats ss;
    struct cuju_receiver_stats rs;
    cuju_sender_stats(s, &ss);
    cuju_receiver_stats(r, &rs);
    CHECK(ss.wire_bytes == rs.wire_bytes && ss.zero_pages == rs.zero_pages && ss.zero_pages > 0, "counters agree");
    cuju_sender_free(s);
    cuju_receiver_free(r);
    free(idx);
    munmap(prim, pages * PS);
    munmap(stby, pages * PS);
}

/* ---- hostile frames and mutation fuzz ---- */

static size_t build_epoch(uint8_t *f, uint64_t epoch, const uint64_t *recs, size_t n, const uint8_t *data,
                          size_t ndata, uint64_t seed)
{
    size_t len = CUJU_FRAME_HDR_LEN + cuju_epoch_payload_len(n, ndata, PS, 0, 0);
    cuju_frame_header(f, CUJU_FRAME_EPOCH, len - CUJU_FRAME_HDR_LEN);
    cuju_put_le64(f + 16, epoch);
    cuju_put_le64(f + 24, n);
    cuju_put_le64(f + 32, ndata);
    cuju_put_le64(f + 40, 0);
    cuju_put_le64(f + 48, 0);
    for (size_t i = 0; i < n; i++)
        cuju_put_le64(f + 56 + 8 * i, recs[i]);
    memcpy(f + 56 + 8 * n, data, ndata * PS);
    uint8_t *t = f + len - CUJU_TRAILER_LEN;
    cuju_put_le64(t, CUJU_WIRE_END_MAGIC);
    cuju_put_le64(t + 8, epoch);
    cuju_put_le64(t + 16, cuju_csum(f, len - 8, seed));
    return len;
}

/* Feed `frame` to a fresh receiver after a valid HELLO; return its final code. */
static int serve_frame(const char *dir, uint8_t *guarded, size_t pages, const uint8_t *frame, size_t len,
                       uint64_t seed, int *got_error_frame, uint64_t *applied)
{
    char state[512], jnl[512], msg[CUJU_ERRMSG_LEN];
    snprintf(state, sizeof(state), "%s/h-state", dir);
    snprintf(jnl, sizeof(jnl), "%s/h-journal", dir);
    unlink(jnl);
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    struct cuju_receiver *r;
    if (cuju_receiver_open(guarded, pages * PS, PS, state, jnl, 0, NULL, &r, msg, sizeof(msg)) != CUJU_OK) {
        fprintf(stderr, "open: %s\n", msg);
        exit(2);
    }
    cuju_receiver_start(r, sv[1], 2000, 2000);
    uint8_t h[56];
    cuju_frame_header(h, CUJU_FRAME_HELLO, 40);
    cuju_put_le64(h + 16, CUJU_WIRE_MAGIC);
    cuju_put_le32(h + 24, CUJU_WIRE_VERSION);
    cuju_put_le32(h + 28, PS);
    cuju_put_le64(h + 32, pages * PS);
    cuju_put_le64(h + 40, seed);
    cuju_put_le64(h + 48, 0);
    int eno;
    cuju_send_all(sv[0], h, sizeof(h), 2000, &eno);
    cuju_recv_all(sv[0], h, sizeof(h), 2000, &eno);
    cuju_send_all(sv[0], frame, len, 2000, &eno);
    shutdown(sv[0], SHUT_WR);
    uint8_t back[4096];
    size_t got = 0;
    ssize_t k;
    while (got < sizeof(back) && (k = recv(sv[0], back + got, sizeof(back) - got, 0)) > 0)
        got += (size_t)k;
    *got_error_frame = 0;
    for (size_t off = 0; off + 16 <= got;) {
        uint32_t type = cuju_get_le32(back + off);
        if (type == CUJU_FRAME_ERROR)
            *got_error_frame = 1;
        off += 16 + cuju_get_le64(back + off + 8);
    }
    int rc = cuju_receiver_wait(r, 5000);
    *applied = cuju_receiver_last_applied(r);
    cuju_receiver_free(r);
    close(sv[0]);
    return rc;
}

static void test_hostile(const char *dir)
{
    const size_t pages = 4;
    long sys_ps = sysconf(_SC_PAGESIZE);
    /* Guard pages around the region: a stray write is a SIGSEGV. */
    uint8_t *m = mmap(NULL, (pages + 2) * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(m, (size_t)sys_ps, PROT_NONE);
    mprotect(m + (pages + 1) * PS, (size_t)sys_ps, PROT_NONE);
    uint8_t *region = m + PS;
    uint8_t data[2 * PS], frame[4 * PS], orig[4 * PS];
    fill_random(data, sizeof(data));
    uint64_t seed = 7, applied;
    int errf;

    /* A valid epoch applies. */
    uint64_t recs[3] = {1, 3 | ((uint64_t)CUJU_ENC_ZERO << 56), 2};
    size_t len = build_epoch(frame, 1, recs, 3, data, 2, seed);
    memset(region, 0xee, pages * PS);
    CHECK(serve_frame(dir, region, pages, frame, len, seed, &errf, &applied) == CUJU_E_EOF, "valid epoch then EOF");
    CHECK(memcmp(region + PS, data, PS) == 0 && memcmp(region + 2 * PS, data + PS, PS) == 0, "pages applied");

    /* An index just outside the region, sealed with a valid checksum. */
    uint64_t bad[2] = {1, pages};
    len = build_epoch(frame, 1, bad, 2, data, 2, seed);
    memset(region, 0xee, pages * PS);
    CHECK(serve_frame(dir, region, pages, frame, len, seed, &errf, &applied) == CUJU_E_INDEX && errf, "index refused");
    for (size_t i = 0; i < pages * PS; i++)
        if (region[i] != 0xee) {
            CHECK(0, "region changed by a refused epoch");
            break;
        }

    /* Mutation fuzz: flip random bytes of a valid frame, sometimes re-seal. */
    len = build_epoch(orig, 1, recs, 3, data, 2, seed);
    for (int it = 0; it < 400; it++) {
        memcpy(frame, orig, len);
        int flips = 1 + (int)(rnd() % 3);
        for (int j = 0; j < flips; j++)
            frame[rnd() % len] ^= (uint8_t)(1 + rnd() % 255);
        size_t flen = len - (rnd() % 4 == 0 ? rnd() % len : 0);
        if (rnd() % 2 && flen == len)
            cuju_put_le64(frame + len - 8, cuju_csum(frame, len - 8, seed));
        memset(region, 0xee, pages * PS);
        int rc = serve_frame(dir, region, pages, frame, flen, seed, &errf, &applied);
        CHECK(rc != CUJU_OK, "a stream without CLOSE ends in an error");
        CHECK((rc == CUJU_E_EOF) != errf, "ERROR frame exactly when the receiver refused (rc %d)", rc);
        if (applied == 0) {
            for (size_t i = 0; i < pages * PS; i++)
                if (region[i] != 0xee) {
                    CHECK(0, "region changed although no epoch was applied (rc %d)", rc);
                    break;
                }
        }
    }
    munmap(m, (pages + 2) * PS);
}

/* ---- benchmark ---- */

struct sink { int fd; size_t len; int n; };

static double cpu_s(const struct rusage *a, const struct rusage *b)
{
    return (double)(b->ru_utime.tv_sec - a->ru_utime.tv_sec + b->ru_stime.tv_sec - a->ru_stime.tv_sec) +
           (double)(b->ru_utime.tv_usec - a->ru_utime.tv_usec + b->ru_stime.tv_usec - a->ru_stime.tv_usec) / 1e6;
}

static void *raw_sink(void *arg)
{
    struct sink *k = arg;
    uint8_t *buf = malloc(k->len);
    int eno;
    for (int i = 0; i < k->n; i++)
        cuju_recv_all(k->fd, buf, k->len, 10000, &eno);
    free(buf);
    return NULL;
}

static int bench(const char *dir, int epochs)
{
    const size_t pages = 32768, n = 10000;
    uint8_t *prim = region_new(pages), *stby = region_new(pages);
    fill_random(prim, pages * PS);
    memset(stby, 1, pages * PS);
    char state[512], jnl[512], msg[CUJU_ERRMSG_LEN];
    snprintf(state, sizeof(state), "%s/b-state", dir);
    snprintf(jnl, sizeof(jnl), "%s/b-journal", dir);
    unlink(jnl);
    uint64_t *idx = malloc(n * sizeof(uint64_t) * (size_t)epochs);
    for (size_t i = 0; i < n * (size_t)epochs; i++)
        idx[i] = rnd() % pages;
    int a, b;
    tcp_pair(&a, &b);
    struct cuju_receiver *r;
    struct cuju_sender *s;
    uint64_t held;
    if (cuju_receiver_open(stby, pages * PS, PS, state, jnl, 0, NULL, &r, msg, sizeof(msg)) != CUJU_OK ||
        cuju_receiver_start(r, b, 10000, 10000) != CUJU_OK ||
        cuju_sender_new(a, prim, pages * PS, PS, 1, 0, 10000, &s) != CUJU_OK ||
        cuju_sender_handshake(s, 10000, &held) != CUJU_OK)
        return 2;
    struct rusage ru0, ru1, ru2;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t0 = cuju_now_ns();
    for (int e = 1; e <= epochs; e++) {
        if (cuju_sender_stage(s, (uint64_t)e, idx + n * (size_t)(e - 1), n, NULL, 0, NULL, 0, 10000, NULL) != CUJU_OK ||
            cuju_sender_ship(s) != CUJU_OK || (e > 1 && cuju_sender_wait_ack(s, (uint64_t)e - 1, 10000)))
            return 3;
    }
    if (cuju_sender_wait_ack(s, (uint64_t)epochs, 10000) != CUJU_OK)
        return 3;
    double dt = (double)(cuju_now_ns() - t0) / 1e9;
    getrusage(RUSAGE_SELF, &ru1);
    struct cuju_sender_stats ss;
    cuju_sender_stats(s, &ss);
    cuju_sender_close(s, 1, 10000);
    cuju_receiver_wait(r, 10000);
    cuju_sender_free(s);
    cuju_receiver_free(r);

    size_t flen = (size_t)(ss.wire_bytes / (uint64_t)epochs);
    tcp_pair(&a, &b);
    struct sink k = {b, flen, epochs};
    pthread_t th;
    int eno;
    t0 = cuju_now_ns();
    pthread_create(&th, NULL, raw_sink, &k);
    for (int e = 0; e < epochs; e++)
        cuju_send_all(a, prim, flen, 10000, &eno);
    pthread_join(th, NULL);
    double raw = (double)(cuju_now_ns() - t0) / 1e9;
    getrusage(RUSAGE_SELF, &ru2);
    close(a);
    close(b);
    double pps = (double)n * epochs / dt, raw_pps = (double)n * epochs / raw;
    printf("{\"pages_per_s\": %.0f, \"raw_pages_per_s\": %.0f, \"ratio_vs_raw\": %.3f, \"epochs\": %d, "
           "\"cpu_s\": %.3f, \"wall_s\": %.3f, \"raw_cpu_s\": %.3f, \"raw_wall_s\": %.3f}\n",
           pps, raw_pps, pps / raw_pps, epochs, cpu_s(&ru0, &ru1), dt, cpu_s(&ru1, &ru2), raw);
    return 0;
}

/* ---- The record layer (aead.h): what a tamperer on the FT link can do ---- */

struct pump {
    int fd;
    const uint8_t *data;
    size_t len;
    struct cuju_link *link;     /* NULL: write raw bytes */
};

static void *pump_main(void *arg)
{
    struct pump *p = arg;
    int e = 0;
    if (p->link != NULL)
        (void)cuju_link_send(p->link, p->data, p->len, 5000, &e);
    else
        (void)cuju_send_all(p->fd, p->data, p->len, 5000, &e);
    shutdown(p->fd, SHUT_WR);
    return NULL;
}

static uint8_t *read_to_eof(int fd, size_t *len)
{
    size_t cap = 1 << 20, n = 0;
    uint8_t *b = malloc(cap);
    for (;;) {
        if (n == cap)
            b = realloc(b, cap *= 2);
        ssize_t r = read(fd, b + n, cap - n);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    *len = n;
    return b;
}

static void link_keys(uint8_t *out, const uint8_t *tx, const uint8_t *rx)
{
    memcpy(out, tx, CUJU_LINK_KEYS_LEN / 2);
    memcpy(out + CUJU_LINK_KEYS_LEN / 2, rx, CUJU_LINK_KEYS_LEN / 2);
}

/* Seal msg (one call per piece in cuts) with keys; returns the wire bytes. */
static uint8_t *seal_capture(const uint8_t *keys, const uint8_t *msg, size_t len, size_t *wire_len)
{
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    cuju_tune_socket(sv[0]);
    struct cuju_link l = {.fd = sv[0]};
    CHECK(cuju_link_set_keys(&l, keys) == CUJU_OK, "set keys");
    struct pump p = {.fd = sv[0], .data = msg, .len = len, .link = &l};
    pthread_t t;
    pthread_create(&t, NULL, pump_main, &p);
    uint8_t *w = read_to_eof(sv[1], wire_len);
    pthread_join(t, NULL);
    cuju_link_clear(&l);
    close(sv[0]);
    close(sv[1]);
    return w;
}

/* Feed wire bytes to a receiving link; read len bytes in calls of `piece`
 * (0: one call). Returns the first failing code or CUJU_OK; out gets them. */
static int open_capture(const uint8_t *keys, const uint8_t *wire, size_t wire_len, uint8_t *out, size_t len,
                        size_t piece)
{
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    cuju_tune_socket(sv[1]);
    struct cuju_link l = {.fd = sv[1]};
    CHECK(cuju_link_set_keys(&l, keys) == CUJU_OK, "set keys");
    struct pump p = {.fd = sv[0], .data = wire, .len = wire_len};
    pthread_t t;
    pthread_create(&t, NULL, pump_main, &p);
    int rc = CUJU_OK, e = 0;
    for (size_t off = 0; off < len && rc == CUJU_OK;) {
        size_t n = piece == 0 || len - off < piece ? len - off : piece;
        rc = cuju_link_recv(&l, out + off, n, 5000, &e);
        off += n;
    }
    close(sv[1]);   /* a pump still writing gets EPIPE */
    pthread_join(t, NULL);
    cuju_link_clear(&l);
    close(sv[0]);
    return rc;
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Record boundaries of a capture: offsets of up to max records. */
static size_t records_of(const uint8_t *w, size_t len, size_t *at, size_t max)
{
    size_t k = 0;
    for (size_t off = 0; off + CUJU_AEAD_HDR_LEN <= len && k < max; k++) {
        at[k] = off;
        off += CUJU_AEAD_HDR_LEN + cuju_get_le32(w + off) + CUJU_AEAD_TAG_LEN;
    }
    return k;
}

static void test_aead(void)
{
    uint8_t k1[CUJU_LINK_KEYS_LEN / 2], k2[CUJU_LINK_KEYS_LEN / 2], k3[CUJU_LINK_KEYS_LEN / 2];
    fill_random(k1, sizeof(k1));
    fill_random(k2, sizeof(k2));
    fill_random(k3, sizeof(k3));
    uint8_t tx[CUJU_LINK_KEYS_LEN], rx[CUJU_LINK_KEYS_LEN], other[CUJU_LINK_KEYS_LEN];
    link_keys(tx, k1, k2);
    link_keys(rx, k2, k1);
    link_keys(other, k3, k2);
    /* 11 records and a bit: more than one batch of the pool. */
    size_t len = 11 * (size_t)CUJU_AEAD_MAX_RECORD + 12345;
    uint8_t *msg = malloc(len), *out = malloc(len);
    fill_random(msg, len);
    size_t wl = 0;
    uint8_t *wire = seal_capture(tx, msg, len, &wl);
    size_t at[16];
    size_t nrec = records_of(wire, wl, at, 16);
    CHECK(nrec == 12, "%zu records, not 12", nrec);
    CHECK(wl == len + nrec * (CUJU_AEAD_HDR_LEN + CUJU_AEAD_TAG_LEN), "wire length %zu", wl);
    CHECK(memmem(wire, wl, msg + 5 * CUJU_AEAD_MAX_RECORD, 64) == NULL, "plaintext on the wire");

    /* Intact: one call (parallel, in place), odd pieces (buffered), both equal. */
    size_t pieces[] = {0, 1000, CUJU_AEAD_MAX_RECORD + 7, 3 * (size_t)CUJU_AEAD_MAX_RECORD};
    for (size_t i = 0; i < sizeof(pieces) / sizeof(*pieces); i++) {
        memset(out, 0, len);
        CHECK(open_capture(rx, wire, wl, out, len, pieces[i]) == CUJU_OK, "intact capture, piece %zu", pieces[i]);
        CHECK(memcmp(out, msg, len) == 0, "intact capture differs, piece %zu", pieces[i]);
    }
    /* The wrong keys. */
    memset(out, 0xAA, len);
    CHECK(open_capture(other, wire, wl, out, len, 0) == CUJU_E_AUTH, "other keys accepted");
    CHECK(all_zero(out, len), "other keys: bytes left for the caller");

    uint8_t *bad = malloc(wl + 2 * (CUJU_AEAD_HDR_LEN + CUJU_AEAD_MAX_RECORD + CUJU_AEAD_TAG_LEN));
    for (int round = 0; round < 60; round++) {
        size_t bl = wl;
        memcpy(bad, wire, wl);
        int kind = round % 6;
        size_t r1 = 1 + rnd() % (nrec - 2), r2 = r1 + 1;
        size_t rec1 = at[r1 + 1] - at[r1], rec2 = (r2 + 1 < nrec ? at[r2 + 1] : wl) - at[r2];
        if (kind == 0) {            /* a flipped bit anywhere */
            size_t pos = rnd() % wl;
            bad[pos] ^= (uint8_t)(1u << (rnd() % 8));
        } else if (kind == 1) {     /* a record dropped */
            memmove(bad + at[r1], wire + at[r1] + rec1, wl - at[r1] - rec1);
            bl = wl - rec1;
        } else if (kind == 2) {     /* two records swapped */
            memcpy(bad + at[r1], wire + at[r2], rec2);
            memcpy(bad + at[r1] + rec2, wire + at[r1], rec1);
        } else if (kind == 3) {     /* a record replayed */
            memcpy(bad + at[r2], wire + at[r1], rec1);
            memcpy(bad + at[r2] + rec1, wire + at[r2], wl - at[r2]);
            bl = wl + rec1;
        } else if (kind == 4) {     /* a record sealed with other keys injected */
            size_t il = 0;
            uint8_t *inj = seal_capture(other, msg, 4000, &il);
            memcpy(bad + at[r1], inj, il);
            memcpy(bad + at[r1] + il, wire + at[r1], wl - at[r1]);
            bl = wl + il;
            free(inj);
        } else {                    /* truncated mid-record */
            bl = at[r1] + 1 + rnd() % (rec1 - 1);
        }
        memset(out, 0xAA, len);
        size_t piece = round % 2 ? 0 : 100000;
        int rc = open_capture(rx, bad, bl, out, len, piece);
        CHECK(rc == CUJU_E_AUTH || rc == CUJU_E_FRAME || rc == CUJU_E_EOF, "tamper kind %d accepted (rc %d)", kind,
              rc);
        if (piece == 0)
            CHECK(all_zero(out, len), "tamper kind %d: bytes left for the caller", kind);
    }
    free(bad);
    free(wire);
    free(msg);
    free(out);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s test|bench DIR [EPOCHS]\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "bench") == 0)
        return bench(argv[2], argc > 3 ? atoi(argv[3]) : 30);
    test_equality(argv[2]);
    test_hostile(argv[2]);
    /* The record layer both ways: sealed and opened inline, and by the pool. */
    cuju_aead_set_workers(0);
    test_aead();
    cuju_aead_set_workers(CUJU_AEAD_WORKERS);
    test_aead();
    cuju_aead_set_workers(-1);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
