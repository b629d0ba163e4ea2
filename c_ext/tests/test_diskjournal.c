/* Brute-force test of the epoch disk journal (diskjournal.h), no Python.
 *
 *   test_diskjournal SCRATCH_DIR [ROUNDS]
 *
 * 1. Model check: random writes, write-zeroes and trims (any offset, any
 *    length, some across the disk's odd-sized end) go to an image file, the
 *    journal and a model disk in memory, as the block server does. At random
 *    epoch boundaries the journal is sealed; the sealed records (or, when the
 *    buffer overflowed, records built from its bitmap and the image) are
 *    checked and applied to a replica file, which must then equal the model
 *    byte for byte. Two disks share each section. Every section is applied a
 *    second time (journal replay) and must change nothing.
 * 2. Seal race: a writer thread appends numbered records while the main
 *    thread seals at random (no pause at all); the sealed buffers, in seal
 *    order, must hold every record exactly once, in order.
 *    The dirty bitmaps are checked against a brute-force model too: each
 *    sealed buffer's bitmap is exactly the set of blocks any byte of which
 *    was written, zeroed or trimmed in that epoch; and after an outage (an
 *    epoch sealed but never applied, then epochs with no seal at all) the
 *    union of the two bitmaps, read back from the image, brings a replica
 *    left at the last applied epoch to the model (what a resync sends).
 * 2. Seal race: a writer thread appends numbered records while the main
 *    thread seals at random (no pause at all); the sealed buffers, in seal
 *    order, must hold every record exactly once, in order.
 * 3. Hostile sections: truncations and flipped fields are refused.
 * 4. Identity: a block is marked before the image write (a server killed in
 *    between leaves it marked); the lineage survives only a clean stop of the
 *    same, unchanged image.
 * 5. Failover: the old primary's image (its journal's bitmaps since the last
 *    ACK it saw) and the new primary's (its replica at a committed epoch, then
 *    its own journal since the takeover): the union of both journals' bitmaps,
 *    read from the new primary's image, brings the old one to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "diskjournal.h"
#include "wire.h"

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

struct disk {
    uint64_t size;
    uint8_t *model;
    int image, replica;
    struct cuju_dj *dj;
    uint64_t ops;
    /* Brute-force model of the bitmaps: one byte per block, set for every
     * byte an operation touched (NULL: not checked). */
    uint8_t *dirty_epoch;       /* since the last seal */
    uint8_t *dirty_unapplied;   /* since the last epoch the replica holds */
};

static void model_touch(struct disk *d, uint64_t off, uint64_t len)
{
    if (d->dirty_epoch == NULL)
        return;
    for (uint64_t i = off; i < off + len; i++) {
        d->dirty_epoch[i / d->dj->h->block_size] = 1;
        d->dirty_unapplied[i / d->dj->h->block_size] = 1;
    }
}

/* The journal's bitmap(s) `bm` (OR of n) hold exactly the model's blocks. */
static void check_bitmap(struct disk *d, uint8_t *const *bm, int n, const uint8_t *model, const char *what,
                         uint64_t epoch)
{
    for (uint64_t b = 0; b < cuju_dj_nblocks(d->dj); b++) {
        int got = 0;
        for (int k = 0; k < n; k++)
            got |= (bm[k][b >> 3] >> (b & 7)) & 1;
        CHECK(got == model[b], "epoch %llu: %s bit of block %llu is %d, the model says %d", (unsigned long long)epoch,
              what, (unsigned long long)b, got, model[b]);
    }
}

static void pwrite_full(int fd, const void *b, size_t n, uint64_t off)
{
    CHECK(pwrite(fd, b, n, (off_t)off) == (ssize_t)n, "pwrite: %s", strerror(errno));
}

/* One server operation: image first, then the journal (as cujudisk.c). */
static void server_op(struct disk *d, uint8_t *scratch)
{
    uint64_t kind = rnd() % 10;
    uint64_t len = 1 + rnd() % (kind < 7 ? 20000 : 300000);
    if (rnd() % 4 == 0)
        len = (len + 511) & ~UINT64_C(511);
    if (len > d->size)
        len = d->size;
    uint64_t off = rnd() % (d->size - len + 1);
    if (rnd() % 8 == 0)
        off = d->size - len;    /* the odd-sized end */
    model_touch(d, off, len);
    if (kind < 7) {
        for (uint64_t i = 0; i < len; i++)
            scratch[i] = (uint8_t)(rnd() | 1);
        pwrite_full(d->image, scratch, len, off);
        cuju_dj_record_write(d->dj, off, len, scratch);
        memcpy(d->model + off, scratch, len);
    } else if (kind < 9) {
        /* tmpfs has no ZERO_RANGE: write zeros, as the server falls back to */
        if (fallocate(d->image, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) != 0) {
            memset(scratch, 0, len);
            pwrite_full(d->image, scratch, len, off);
        }
        cuju_dj_record_zero(d->dj, off, len, 0);
        memset(d->model + off, 0, len);
    } else {
        CHECK(fallocate(d->image, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0,
              "punch: %s", strerror(errno));
        cuju_dj_record_zero(d->dj, off, len, 1);
        memset(d->model + off, 0, len);
    }
    d->ops++;
}

static void compare(struct disk *d, int which, uint64_t epoch)
{
    uint8_t *got = malloc(d->size);
    CHECK(got != NULL, "malloc");
    CHECK(pread(d->replica, got, d->size, 0) == (ssize_t)d->size, "pread replica");
    if (memcmp(got, d->model, d->size) == 0) {
        free(got);
        return;
    }
    for (uint64_t i = 0; i < d->size; i++)
        CHECK(got[i] == d->model[i], "disk %d epoch %llu: replica differs from the model at byte %llu "
              "(%02x vs %02x)", which, (unsigned long long)epoch, (unsigned long long)i, got[i], d->model[i]);
    free(got);
}

/* Append disk `which`'s part for the sealed buffer to section at *len. */
static void add_part(struct disk *d, unsigned which, int idx, uint8_t *section, uint64_t cap, uint64_t *len,
                     uint64_t *overflowed)
{
    uint8_t *p = section + *len;
    uint64_t n = 0;
    if (d->dj->h->buf[idx].overflow) {
        uint64_t cursor = 0;
        int eno = 0;
        (*overflowed)++;
        CHECK(cuju_dj_build_from_bitmap(cuju_dj_bitmap(d->dj, idx), cuju_dj_nblocks(d->dj), d->dj->h->block_size,
                                        d->size, d->image, &cursor, p + CUJU_DJ_PART_LEN,
                                        cap - *len - CUJU_DJ_PART_LEN, &n, &eno) == CUJU_OK,
              "build from bitmap: %s", strerror(eno));
        CHECK(cursor == cuju_dj_nblocks(d->dj), "section buffer too small for the bitmap");
    } else {
        n = d->dj->h->buf[idx].used;
        CHECK(*len + CUJU_DJ_PART_LEN + n <= cap, "section buffer too small");
        memcpy(p + CUJU_DJ_PART_LEN, cuju_dj_records(d->dj, idx), n);
    }
    cuju_put_le32(p, which);
    cuju_put_le32(p + 4, 0);
    cuju_put_le64(p + 8, n);
    *len += CUJU_DJ_PART_LEN + n;
}

/* A backup outage: epoch e is sealed and shipped but never applied (lost
 * with the backup), then more epochs' writes arrive with nobody sealing. On
 * re-pair the resync sends the union of both bitmaps, read from the image
 * (cuju_dj_build_from_bitmap, in small chunks), exactly as the bitmaps hold
 * it: the replica, left at the last applied epoch, must equal the model. The
 * union must be exactly the model's blocks changed since that epoch. */
static void outage(struct disk *d, int e, uint8_t *section, uint64_t cap, uint8_t *scratch)
{
    const uint64_t sizes[2] = {d[0].size, d[1].size};
    for (int i = 0; i < 2; i++) {
        int idx = cuju_dj_seal(d[i].dj, (uint64_t)e);
        CHECK(idx >= 0, "outage seal %d", e);
        memset(d[i].dirty_epoch, 0, cuju_dj_nblocks(d[i].dj));
    }
    int nops = (int)(rnd() % 300);
    for (int k = 0; k < nops; k++)
        server_op(&d[rnd() % 2], scratch);
    for (int i = 0; i < 2; i++) {
        struct cuju_dj *dj = d[i].dj;
        uint8_t *bm[2] = {cuju_dj_bitmap(dj, 0), cuju_dj_bitmap(dj, 1)};
        check_bitmap(&d[i], bm, 2, d[i].dirty_unapplied, "resync (union)", (uint64_t)e);
        uint64_t nb = cuju_dj_nblocks(dj);
        uint8_t *u = calloc(1, dj->h->bitmap_bytes);
        CHECK(u != NULL, "malloc");
        for (uint64_t k = 0; k < dj->h->bitmap_bytes; k++)
            u[k] = bm[0][k] | bm[1][k];
        /* As begin_sync: the unacknowledged buffer is dropped and the active
         * one sealed away; from here on writes are journaled as usual. */
        int other = (int)dj->h->active ^ 1;
        CHECK(cuju_dj_reset(dj, other) == CUJU_OK, "outage reset");
        int idx = cuju_dj_seal(dj, 0);
        CHECK(idx >= 0 && cuju_dj_reset(dj, idx) == CUJU_OK, "outage reseal");
        memset(d[i].dirty_epoch, 0, nb);
        uint64_t cursor = 0;
        while (cursor < nb) {
            uint64_t n = 0;
            int eno = 0;
            CHECK(cuju_dj_build_from_bitmap(u, nb, dj->h->block_size, d[i].size, d[i].image, &cursor,
                                            section + CUJU_DJ_PART_LEN, 150000, &n, &eno) == CUJU_OK,
                  "resync build: %s", strerror(eno));
            cuju_put_le32(section, (uint32_t)i);
            cuju_put_le32(section + 4, 0);
            cuju_put_le64(section + 8, n);
            char msg[256];
            CHECK(cuju_dj_check_section(section, CUJU_DJ_PART_LEN + n, 2, sizes, msg, sizeof(msg)) == CUJU_OK,
                  "resync check: %s", msg);
            int fds[2] = {d[0].replica, d[1].replica};
            uint64_t nrec;
            CHECK(cuju_dj_apply_section(section, CUJU_DJ_PART_LEN + n, fds, 0, &nrec, &eno) == CUJU_OK,
                  "resync apply");
        }
        compare(&d[i], i, (uint64_t)e);
        memset(d[i].dirty_unapplied, 0, nb);
        free(u);
    }
    (void)cap;
}

static void model_check(const char *dir, int rounds)
{
    char path[512];
    struct disk d[2];
    const uint64_t sizes[2] = {(UINT64_C(3) << 20) + 512 * 7, UINT64_C(1) << 20};
    uint8_t *scratch = malloc(300000 + 512);   /* lengths are rounded up to 512 at times */
    uint64_t cap = UINT64_C(64) << 20;
    uint8_t *section = aligned_alloc(8, cap);
    CHECK(scratch && section, "malloc");
    for (int i = 0; i < 2; i++) {
        char msg[256];
        d[i].size = sizes[i];
        d[i].model = calloc(1, sizes[i]);
        d[i].ops = 0;
        snprintf(path, sizeof(path), "%s/image%d", dir, i);
        d[i].image = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        snprintf(path, sizeof(path), "%s/replica%d", dir, i);
        d[i].replica = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(d[i].model && d[i].image >= 0 && d[i].replica >= 0, "open");
        CHECK(ftruncate(d[i].image, (off_t)sizes[i]) == 0 && ftruncate(d[i].replica, (off_t)sizes[i]) == 0,
              "truncate");
        snprintf(path, sizeof(path), "%s/journal%d", dir, i);
        /* Disk 1 gets a tiny journal: it overflows often and takes the
         * bitmap path. */
        CHECK(cuju_dj_create(path, sizes[i], i ? 256 << 10 : 0, i ? 4096 : 0, &d[i].dj, msg, sizeof(msg)) == 0,
              "create: %s", msg);
        d[i].dirty_epoch = calloc(1, cuju_dj_nblocks(d[i].dj));
        d[i].dirty_unapplied = calloc(1, cuju_dj_nblocks(d[i].dj));
        CHECK(d[i].dirty_epoch && d[i].dirty_unapplied, "malloc");
    }
    uint64_t overflowed = 0, records = 0, outages = 0;
    for (int e = 1; e <= rounds; e++) {
        int nops = (int)(rnd() % (e % 7 ? 30 : 200));
        for (int k = 0; k < nops; k++)
            server_op(&d[rnd() % 2], scratch);
        if (e % 23 == 0) {
            outage(d, e, section, cap, scratch);
            outages++;
        }
        /* A restarted server keeps the journal (same geometry). */
        if (rnd() % 50 == 0) {
            char msg[256];
            uint64_t gen = d[0].dj->h->generation;
            cuju_dj_close(d[0].dj);
            snprintf(path, sizeof(path), "%s/journal0", dir);
            CHECK(cuju_dj_create(path, sizes[0], 0, 0, &d[0].dj, msg, sizeof(msg)) == 0, "reopen: %s", msg);
            CHECK(d[0].dj->h->generation == gen + 1, "generation after reopen");
        }
        uint64_t len = 0;
        int idx[2];
        for (unsigned i = 0; i < 2; i++) {
            idx[i] = cuju_dj_seal(d[i].dj, (uint64_t)e);
            CHECK(idx[i] >= 0, "seal %d", e);
            uint8_t *bm[1] = {cuju_dj_bitmap(d[i].dj, idx[i])};
            check_bitmap(&d[i], bm, 1, d[i].dirty_epoch, "sealed", (uint64_t)e);
            memset(d[i].dirty_epoch, 0, cuju_dj_nblocks(d[i].dj));
            add_part(&d[i], i, idx[i], section, cap, &len, &overflowed);
        }
        char msg[256];
        CHECK(cuju_dj_check_section(section, len, 2, sizes, msg, sizeof(msg)) == CUJU_OK, "check: %s", msg);
        int fds[2] = {d[0].replica, d[1].replica}, eno = 0;
        uint64_t nrec = 0;
        for (int twice = 0; twice < 2; twice++) {
            CHECK(cuju_dj_apply_section(section, len, fds, 0, &nrec, &eno) == CUJU_OK, "apply: %s", strerror(eno));
            for (int i = 0; i < 2; i++)
                compare(&d[i], i, (uint64_t)e);
        }
        for (int i = 0; i < 2; i++)
            memset(d[i].dirty_unapplied, 0, cuju_dj_nblocks(d[i].dj));
        records += nrec;
        /* The epoch is acknowledged: its buffers may be reused. */
        for (int i = 0; i < 2; i++) {
            CHECK(cuju_dj_reset(d[i].dj, idx[i]) == CUJU_OK, "reset");
            CHECK(cuju_dj_reset(d[i].dj, idx[i] ^ 1) == CUJU_E_ARG, "reset of the active buffer must fail");
        }
        /* Sealing into a buffer that was not reset is refused. */
        if (e == 1) {
            int a = cuju_dj_seal(d[0].dj, 1000);
            CHECK(a >= 0, "seal");
            CHECK(cuju_dj_seal(d[0].dj, 1001) == -1, "a second seal without reset must be refused");
            CHECK(d[0].dj->h->buf[a].used == 0, "nothing written between");
            CHECK(cuju_dj_reset(d[0].dj, a) == CUJU_OK, "reset");
        }
    }
    CHECK(overflowed > 0, "the overflow path was never taken");
    CHECK(outages > 0, "no outage was simulated");
    printf("model: %d epochs, %llu + %llu ops, %llu records, %llu overflowed epochs, %llu outages resynced from "
           "the bitmaps: replica == model, bitmaps == model\n", rounds,
           (unsigned long long)d[0].ops, (unsigned long long)d[1].ops, (unsigned long long)records,
           (unsigned long long)overflowed, (unsigned long long)outages);

    /* Sparse-aware initial sync: a fresh replica from the allocated map. */
    uint8_t *bm = calloc(1, d[0].dj->h->bitmap_bytes);
    uint64_t nset = 0, cursor = 0, n = 0;
    int eno = 0;
    CHECK(cuju_dj_mark_allocated(d[0].image, d[0].size, d[0].dj->h->block_size, bm, &nset, &eno) == CUJU_OK,
          "mark allocated");
    snprintf(path, sizeof(path), "%s/fresh", dir);
    int fresh = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fresh >= 0 && ftruncate(fresh, (off_t)d[0].size) == 0, "fresh replica");
    int fds[1] = {fresh};
    uint64_t chunks = 0;
    while (cursor < cuju_dj_nblocks(d[0].dj)) {
        /* Small chunks, as the running sync sends them. */
        CHECK(cuju_dj_build_from_bitmap(bm, cuju_dj_nblocks(d[0].dj), d[0].dj->h->block_size, d[0].size, d[0].image,
                                        &cursor, section + CUJU_DJ_PART_LEN, 200000, &n, &eno) == CUJU_OK,
              "build");
        cuju_put_le32(section, 0);
        cuju_put_le32(section + 4, 0);
        cuju_put_le64(section + 8, n);
        char msg[256];
        CHECK(cuju_dj_check_section(section, CUJU_DJ_PART_LEN + n, 1, sizes, msg, sizeof(msg)) == CUJU_OK,
              "check: %s", msg);
        uint64_t nrec;
        CHECK(cuju_dj_apply_section(section, CUJU_DJ_PART_LEN + n, fds, 0, &nrec, &eno) == CUJU_OK, "apply");
        chunks++;
    }
    d[0].replica = fresh;
    compare(&d[0], 0, 0);
    printf("initial sync: %llu of %llu blocks allocated, %llu chunks: replica == model\n", (unsigned long long)nset,
           (unsigned long long)cuju_dj_nblocks(d[0].dj), (unsigned long long)chunks);
    free(bm);
    close(fresh);
    for (int i = 0; i < 2; i++) {
        cuju_dj_close(d[i].dj);
        close(d[i].image);
        free(d[i].model);
        free(d[i].dirty_epoch);
        free(d[i].dirty_unapplied);
    }
    free(scratch);
    free(section);
}

/* ---- 5. failover: the two journals' bitmaps bring the old primary's image to the new one's ---- */

static uint8_t *bitmap_union(struct cuju_dj *dj, uint8_t *u)
{
    uint8_t *b0 = cuju_dj_bitmap(dj, 0), *b1 = cuju_dj_bitmap(dj, 1);
    for (uint64_t k = 0; k < dj->h->bitmap_bytes; k++)
        u[k] |= b0[k] | b1[k];
    return u;
}

/* Host a is the primary (image A, journal JA), host b's replica B receives its
 * epochs. The last epoch is sealed and shipped; b applies it (its ACK is lost)
 * or not; a writes on (nobody seals), and a server killed between marking and
 * writing leaves a marked block. b takes over: its server journals B in JB,
 * and b writes on without a backup. The re-protection onto a sends B's blocks
 * marked in either journal (union of the four bitmaps) into A: A must equal
 * B's model byte for byte, each journal's union must be exactly its model's
 * blocks (JA: since the last ACK a saw; JB: since the takeover), and every
 * block where A and B differ must be in the union. */
static void failover_check(const char *dir, int rounds)
{
    char path[512], msg[256];
    const uint64_t size = (UINT64_C(2) << 20) + 512 * 5;
    const uint64_t sizes[1] = {size};
    uint64_t cap = UINT64_C(16) << 20, sent_blocks = 0, total_blocks = 0, lost_acks = 0;
    uint8_t *section = aligned_alloc(8, cap), *scratch = malloc(300000 + 512);
    CHECK(section && scratch, "malloc");
    for (int r = 0; r < rounds; r++) {
        struct disk a = {0}, b = {0};
        /* Odd rounds: a tiny journal that overflows (the bitmap path), 4 KiB blocks. */
        uint64_t jcap = r & 1 ? 256 << 10 : 0, jblock = r & 1 ? 4096 : 0;
        a.size = b.size = size;
        a.model = calloc(1, size);
        b.model = malloc(size);
        snprintf(path, sizeof(path), "%s/fo-a", dir);
        a.image = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        snprintf(path, sizeof(path), "%s/fo-b", dir);
        a.replica = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(a.model && b.model && a.image >= 0 && a.replica >= 0, "open");
        CHECK(ftruncate(a.image, (off_t)size) == 0 && ftruncate(a.replica, (off_t)size) == 0, "truncate");
        snprintf(path, sizeof(path), "%s/fo-ja", dir);
        unlink(path);
        CHECK(cuju_dj_create(path, size, jcap, jblock, &a.dj, msg, sizeof(msg)) == 0, "create JA: %s", msg);
        uint64_t nb = cuju_dj_nblocks(a.dj);
        a.dirty_epoch = calloc(1, nb);
        a.dirty_unapplied = calloc(1, nb);   /* here: since the last ACK a saw */
        CHECK(a.dirty_epoch && a.dirty_unapplied, "malloc");
        int fds[1] = {a.replica}, eno = 0;
        uint64_t nrec, overflowed = 0;
        int epochs = 2 + (int)(rnd() % 12), idx = -1;
        for (int e = 1; e <= epochs; e++) {
            int nops = (int)(rnd() % 40);
            for (int k = 0; k < nops; k++)
                server_op(&a, scratch);
            idx = cuju_dj_seal(a.dj, (uint64_t)e);
            CHECK(idx >= 0, "seal %d", e);
            uint8_t *bm[1] = {cuju_dj_bitmap(a.dj, idx)};
            check_bitmap(&a, bm, 1, a.dirty_epoch, "sealed", (uint64_t)e);
            memset(a.dirty_epoch, 0, nb);
            uint64_t len = 0;
            add_part(&a, 0, idx, section, cap, &len, &overflowed);
            CHECK(cuju_dj_check_section(section, len, 1, sizes, msg, sizeof(msg)) == CUJU_OK, "check: %s", msg);
            if (e < epochs || rnd() % 2) {
                CHECK(cuju_dj_apply_section(section, len, fds, 0, &nrec, &eno) == CUJU_OK, "apply");
                compare(&a, 0, (uint64_t)e);
            }
            if (e < epochs) {   /* acknowledged */
                CHECK(cuju_dj_reset(a.dj, idx) == CUJU_OK, "reset");
                memset(a.dirty_unapplied, 0, nb);
            } else {
                lost_acks++;
            }
        }
        /* a writes on after the last seal; then a server killed between marking and writing. */
        int nops = (int)(rnd() % 60);
        for (int k = 0; k < nops; k++)
            server_op(&a, scratch);
        uint64_t koff = rnd() % (size - 4096), klen = 1 + rnd() % 4096;
        cuju_dj_begin(a.dj, koff, klen);
        cuju_dj_end(a.dj);
        model_touch(&a, koff, klen);
        {
            uint8_t *bm[2] = {cuju_dj_bitmap(a.dj, 0), cuju_dj_bitmap(a.dj, 1)};
            check_bitmap(&a, bm, 2, a.dirty_unapplied, "JA since the last ACK", (uint64_t)epochs);
        }

        /* b takes over its replica: its server journals it (same geometry), b writes on. */
        b.image = a.replica;
        CHECK(pread(b.image, b.model, size, 0) == (ssize_t)size, "pread B");
        snprintf(path, sizeof(path), "%s/fo-jb", dir);
        unlink(path);
        CHECK(cuju_dj_create(path, size, jcap, jblock, &b.dj, msg, sizeof(msg)) == 0, "create JB: %s", msg);
        b.dirty_epoch = calloc(1, nb);
        b.dirty_unapplied = calloc(1, nb);
        CHECK(b.dirty_epoch && b.dirty_unapplied, "malloc");
        nops = (int)(rnd() % 200);
        for (int k = 0; k < nops; k++)
            server_op(&b, scratch);
        {
            uint8_t *bm[2] = {cuju_dj_bitmap(b.dj, 0), cuju_dj_bitmap(b.dj, 1)};
            check_bitmap(&b, bm, 2, b.dirty_unapplied, "JB since the takeover", 0);
        }

        /* The re-protection onto a: B's blocks of the union into A. */
        uint8_t *u = calloc(1, a.dj->h->bitmap_bytes);
        CHECK(u != NULL, "malloc");
        bitmap_union(b.dj, bitmap_union(a.dj, u));
        uint8_t *ba = malloc(size), *bb = malloc(size);
        CHECK(ba && bb, "malloc");
        CHECK(pread(a.image, ba, size, 0) == (ssize_t)size && pread(b.image, bb, size, 0) == (ssize_t)size, "pread");
        uint64_t bs = a.dj->h->block_size;
        for (uint64_t blk = 0; blk < nb; blk++) {
            uint64_t off = blk * bs, n = off + bs <= size ? bs : size - off;
            if (memcmp(ba + off, bb + off, n) != 0)
                CHECK((u[blk >> 3] >> (blk & 7)) & 1, "round %d: block %llu differs but is in no bitmap", r,
                      (unsigned long long)blk);
            sent_blocks += (u[blk >> 3] >> (blk & 7)) & 1;
        }
        total_blocks += nb;
        uint64_t cursor = 0;
        int to_a[1] = {a.image};
        while (cursor < nb) {
            uint64_t n = 0;
            CHECK(cuju_dj_build_from_bitmap(u, nb, bs, size, b.image, &cursor, section + CUJU_DJ_PART_LEN, 150000,
                                            &n, &eno) == CUJU_OK, "resync build: %s", strerror(eno));
            cuju_put_le32(section, 0);
            cuju_put_le32(section + 4, 0);
            cuju_put_le64(section + 8, n);
            CHECK(cuju_dj_check_section(section, CUJU_DJ_PART_LEN + n, 1, sizes, msg, sizeof(msg)) == CUJU_OK,
                  "resync check: %s", msg);
            CHECK(cuju_dj_apply_section(section, CUJU_DJ_PART_LEN + n, to_a, 0, &nrec, &eno) == CUJU_OK,
                  "resync apply");
        }
        struct disk judge = b;
        judge.replica = a.image;   /* A against B's model */
        compare(&judge, 0, (uint64_t)r);
        free(u);
        free(ba);
        free(bb);
        cuju_dj_close(a.dj);
        cuju_dj_close(b.dj);
        close(a.image);
        close(a.replica);
        free(a.model);
        free(b.model);
        free(a.dirty_epoch);
        free(a.dirty_unapplied);
        free(b.dirty_epoch);
        free(b.dirty_unapplied);
    }
    CHECK(lost_acks == (uint64_t)rounds, "every round ends with an unacknowledged epoch");
    printf("failover: %d rounds, %llu of %llu blocks resent from the two journals' bitmaps: old primary == new "
           "primary, bitmaps == model\n", rounds, (unsigned long long)sent_blocks, (unsigned long long)total_blocks);
    free(section);
    free(scratch);
}

/* ---- a reset keeps CUJU_DJ_KEEP_BYTES of a buffer's memory ---- */

static uint64_t allocated(int fd)
{
    struct stat sb;
    CHECK(fstat(fd, &sb) == 0, "fstat");
    return (uint64_t)sb.st_blocks * 512;
}

/* Epochs larger than the kept part: the reset gives the rest back, the kept
 * pages stay (no fault per write in the next epoch), and the next epochs,
 * which write over kept and given-back memory alike, still equal the model. */
static void keep_pages(const char *dir)
{
    char path[512], msg[256];
    struct disk d = {.size = UINT64_C(3) << 20};
    const uint64_t big = CUJU_DJ_KEEP_BYTES + (UINT64_C(8) << 20), chunk = 256 << 10;
    uint8_t *scratch = malloc(chunk), *section = aligned_alloc(8, big + (UINT64_C(1) << 20));
    d.model = calloc(1, d.size);
    CHECK(scratch && section && d.model, "malloc");
    snprintf(path, sizeof(path), "%s/keep-image", dir);
    d.image = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    snprintf(path, sizeof(path), "%s/keep-replica", dir);
    d.replica = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(d.image >= 0 && d.replica >= 0 && ftruncate(d.image, (off_t)d.size) == 0 &&
          ftruncate(d.replica, (off_t)d.size) == 0, "open");
    snprintf(path, sizeof(path), "%s/keep-journal", dir);
    CHECK(cuju_dj_create(path, d.size, 0, 0, &d.dj, msg, sizeof(msg)) == 0, "create: %s", msg);
    const uint64_t sizes[1] = {d.size};
    for (int e = 1; e <= 4; e++) {
        /* Epochs 1 and 3 outgrow the kept part; 2 and 4 reuse the buffers. */
        uint64_t want = e % 2 ? big : CUJU_DJ_KEEP_BYTES / 2, wrote = 0;
        while (wrote < want) {
            uint64_t off = rnd() % (d.size - chunk + 1);
            for (uint64_t i = 0; i < chunk; i++)
                scratch[i] = (uint8_t)(rnd() | 1);
            pwrite_full(d.image, scratch, chunk, off);
            cuju_dj_record_write(d.dj, off, chunk, scratch);
            memcpy(d.model + off, scratch, chunk);
            wrote += chunk;
        }
        int idx = cuju_dj_seal(d.dj, (uint64_t)e);
        CHECK(idx >= 0 && !d.dj->h->buf[idx].overflow, "seal %d", e);
        uint64_t len = 0, overflowed = 0, nrec = 0;
        add_part(&d, 0, idx, section, big + (UINT64_C(1) << 20), &len, &overflowed);
        CHECK(cuju_dj_check_section(section, len, 1, sizes, msg, sizeof(msg)) == CUJU_OK, "check: %s", msg);
        int fds[1] = {d.replica}, eno = 0;
        CHECK(cuju_dj_apply_section(section, len, fds, 0, &nrec, &eno) == CUJU_OK, "apply");
        compare(&d, 0, (uint64_t)e);
        uint64_t before = allocated(d.dj->fd);
        CHECK(cuju_dj_reset(d.dj, idx) == CUJU_OK, "reset");
        uint64_t after = allocated(d.dj->fd);
        if (e % 2) {
            CHECK(before - after >= big - CUJU_DJ_KEEP_BYTES - (UINT64_C(1) << 20),
                  "epoch %d: a reset gave back %llu bytes, expected about %llu", e,
                  (unsigned long long)(before - after), (unsigned long long)(big - CUJU_DJ_KEEP_BYTES));
            CHECK(before - after <= big - CUJU_DJ_KEEP_BYTES + (UINT64_C(1) << 20),
                  "epoch %d: a reset gave back %llu bytes: the kept part went too", e,
                  (unsigned long long)(before - after));
        } else {
            CHECK(before == after, "epoch %d: a reset of a small epoch gave memory back", e);
        }
    }
    printf("keep: epochs over %llu bytes give the rest back, replica == model\n",
           (unsigned long long)CUJU_DJ_KEEP_BYTES);
    cuju_dj_close(d.dj);
    close(d.image);
    close(d.replica);
    free(d.model);
    free(scratch);
    free(section);
}

/* ---- seal race ---- */

struct race {
    struct cuju_dj *dj;
    uint64_t n;
    volatile int done;
};

static void *writer(void *arg)
{
    struct race *r = arg;
    for (uint64_t i = 0; i < r->n; i++) {
        uint64_t v = i;
        /* offset = sequence number * 8: the record names itself */
        cuju_dj_record_write(r->dj, (i * 8) % (r->dj->h->disk_size - 8), 8, &v);
    }
    r->done = 1;
    return NULL;
}

static void seal_race(const char *dir)
{
    char path[512], msg[256];
    struct race r = {.n = 2000000};
    snprintf(path, sizeof(path), "%s/race", dir);
    CHECK(cuju_dj_create(path, UINT64_C(1) << 30, UINT64_C(64) << 20, 0, &r.dj, msg, sizeof(msg)) == 0, "%s", msg);
    pthread_t t;
    pthread_create(&t, NULL, writer, &r);
    uint64_t next = 0, seals = 0;
    for (;;) {
        int done = r.done;
        int idx = cuju_dj_seal(r.dj, seals + 1);
        CHECK(idx >= 0, "seal");
        seals++;
        const uint8_t *p = cuju_dj_records(r.dj, idx);
        uint64_t used = r.dj->h->buf[idx].used;
        CHECK(!r.dj->h->buf[idx].overflow, "race buffer overflowed");
        for (uint64_t at = 0; at < used; at += cuju_dj_write_len(8)) {
            uint64_t v;
            memcpy(&v, p + at + CUJU_DJ_REC_LEN, 8);
            CHECK(v == next, "seal race: record %llu where %llu was due (lost or duplicated)",
                  (unsigned long long)v, (unsigned long long)next);
            next++;
        }
        CHECK(cuju_dj_reset(r.dj, idx) == CUJU_OK, "reset");
        if (done)
            break;
        if (rnd() % 4 == 0)
            usleep((useconds_t)(rnd() % 50));
    }
    pthread_join(t, NULL);
    int idx = cuju_dj_seal(r.dj, seals + 1);
    CHECK(idx >= 0 && r.dj->h->buf[idx].used == 0, "records after the writer ended");
    CHECK(next == r.n, "seal race: %llu of %llu records seen", (unsigned long long)next, (unsigned long long)r.n);
    printf("seal race: %llu records over %llu seals, none lost or duplicated\n", (unsigned long long)next,
           (unsigned long long)seals);
    cuju_dj_close(r.dj);
}

/* ---- hostile sections ---- */

static void hostile(void)
{
    const uint64_t sizes[1] = {1 << 20};
    uint8_t s[128] = {0};
    char msg[256];
    /* a valid part: WRITE 8 bytes at 0 */
    cuju_put_le32(s, 0);
    cuju_put_le64(s + 8, CUJU_DJ_REC_LEN + 8);
    cuju_put_le32(s + 16, CUJU_DJ_WRITE);
    cuju_put_le64(s + 24, 0);
    cuju_put_le64(s + 32, 8);
    uint64_t len = CUJU_DJ_PART_LEN + CUJU_DJ_REC_LEN + 8;
    CHECK(cuju_dj_check_section(s, len, 1, sizes, msg, sizeof(msg)) == CUJU_OK, "valid: %s", msg);
    for (uint64_t cut = 8; cut < len; cut += 8)
        CHECK(cuju_dj_check_section(s, cut, 1, sizes, msg, sizeof(msg)) != CUJU_OK, "truncated at %llu accepted",
              (unsigned long long)cut);
    uint8_t t[128];
    struct { size_t at; uint64_t v; int w; } bad[] = {
        {0, 1, 4},                      /* disk 1 of 1 */
        {4, 1, 4},                      /* part flags */
        {8, 4, 8},                      /* part length not a multiple of 8 */
        {8, 1000, 8},                   /* part longer than the section */
        {16, 9, 4},                     /* unknown kind */
        {20, 1, 4},                     /* record flags */
        {24, (1 << 20) - 4, 8},         /* runs past the disk end */
        {24, UINT64_MAX - 3, 8},        /* offset overflow */
        {32, 0, 8},                     /* empty record */
        {32, 16, 8},                    /* data runs past the part */
        {32, UINT64_MAX, 8},            /* huge length */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memcpy(t, s, sizeof(t));
        if (bad[i].w == 4)
            cuju_put_le32(t + bad[i].at, (uint32_t)bad[i].v);
        else
            cuju_put_le64(t + bad[i].at, bad[i].v);
        CHECK(cuju_dj_check_section(t, len, 1, sizes, msg, sizeof(msg)) != CUJU_OK, "hostile case %zu accepted",
              i);
    }
    CHECK(cuju_dj_check_section(s, len, 0, sizes, msg, sizeof(msg)) == CUJU_E_INDEX, "no disks configured");
    printf("hostile sections: %zu cases refused\n", sizeof(bad) / sizeof(bad[0]) + 2);
}

/* ---- identity: mark before write, lineage ---- */

static int bit_set(struct cuju_dj *dj, uint64_t b)
{
    return (cuju_dj_bitmap(dj, 0)[b >> 3] | cuju_dj_bitmap(dj, 1)[b >> 3]) >> (b & 7) & 1;
}

static void identity(const char *dir)
{
    char path[512], jpath[512], msg[256];
    const uint64_t size = UINT64_C(1) << 20;
    snprintf(path, sizeof(path), "%s/id-image", dir);
    int image = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    snprintf(path, sizeof(path), "%s/id-other", dir);
    int other = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(image >= 0 && other >= 0 && ftruncate(image, (off_t)size) == 0 && ftruncate(other, (off_t)size) == 0,
          "open");
    snprintf(jpath, sizeof(jpath), "%s/id-journal", dir);
    struct cuju_dj *dj;
    CHECK(cuju_dj_create(jpath, size, 0, 0, &dj, msg, sizeof(msg)) == 0 && cuju_dj_bind_image(dj, image) == 0,
          "create: %s", msg);
    uint64_t l1 = dj->h->lineage;
    CHECK(l1 != 0, "a fresh journal has a lineage");
    /* A server killed after marking and before (or while) writing the image. */
    uint64_t bs = dj->h->block_size;
    (void)cuju_dj_begin(dj, 3 * bs + 100, 10);
    cuju_dj_close(dj);
    CHECK(cuju_dj_create(jpath, size, 0, 0, &dj, msg, sizeof(msg)) == 0 && cuju_dj_bind_image(dj, image) == 0,
          "restart: %s", msg);
    CHECK(bit_set(dj, 3) && !bit_set(dj, 2) && !bit_set(dj, 4), "the block marked before a killed write is lost");
    CHECK(dj->h->busy == 0, "a restarted server clears busy");
    uint64_t l2 = dj->h->lineage;
    CHECK(l2 != l1, "a killed server's journal must get a new lineage");
    /* Clean stop, same unchanged image: the lineage and the bitmaps stay. */
    cuju_dj_stop(dj, image);
    cuju_dj_close(dj);
    CHECK(cuju_dj_create(jpath, size, 0, 0, &dj, msg, sizeof(msg)) == 0 && cuju_dj_bind_image(dj, image) == 0,
          "reopen: %s", msg);
    CHECK(dj->h->lineage == l2 && bit_set(dj, 3), "a clean stop keeps the lineage and the bitmaps");
    /* Clean stop, then the image changes while no server runs. */
    cuju_dj_stop(dj, image);
    cuju_dj_close(dj);
    struct timespec later[2] = {{.tv_sec = 1, .tv_nsec = UTIME_OMIT}, {.tv_sec = 12345, .tv_nsec = 0}};
    pwrite_full(image, "x", 1, 7 * bs);
    CHECK(futimens(image, later) == 0, "futimens");
    CHECK(cuju_dj_create(jpath, size, 0, 0, &dj, msg, sizeof(msg)) == 0 && cuju_dj_bind_image(dj, image) == 0,
          "reopen: %s", msg);
    uint64_t l3 = dj->h->lineage;
    CHECK(l3 != l2, "an image changed behind the server's back must get a new lineage");
    CHECK(bit_set(dj, 3), "the same image keeps its records and bitmaps");
    /* Another image at the same journal path: nothing of the old one stays. */
    cuju_dj_stop(dj, image);
    cuju_dj_close(dj);
    CHECK(cuju_dj_create(jpath, size, 0, 0, &dj, msg, sizeof(msg)) == 0 && cuju_dj_bind_image(dj, other) == 0,
          "other: %s", msg);
    CHECK(dj->h->lineage != l3 && !bit_set(dj, 3) && dj->h->buf[0].used == 0 && dj->h->buf[1].used == 0,
          "another image must start the journal over");
    cuju_dj_close(dj);
    close(image);
    close(other);
    printf("identity: marked before the write; lineage kept only across a clean stop of the same image\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR [ROUNDS]\n", argv[0]);
        return 2;
    }
    int rounds = argc > 2 ? atoi(argv[2]) : 400;
    model_check(argv[1], rounds);
    keep_pages(argv[1]);
    seal_race(argv[1]);
    hostile();
    identity(argv[1]);
    failover_check(argv[1], rounds / 4 > 0 ? rounds / 4 : 1);
    printf("ok\n");
    return 0;
}
