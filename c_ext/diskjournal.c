/* Epoch disk journal (see diskjournal.h for the format and the protocol). */
#define _GNU_SOURCE     /* fallocate, SEEK_DATA */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "diskjournal.h"
#include "wire.h"

#define DJ_DEFAULT_CAPACITY (UINT64_C(64) << 20)
#define DJ_MAX_CAPACITY (UINT64_C(1) << 30)
#define SEAL_SPIN_LIMIT_NS (UINT64_C(2) * 1000000000)

_Static_assert(sizeof(struct cuju_dj_header) <= CUJU_DJ_HEADER_LEN, "the header is one page");

static void dj_msg(char *msg, size_t msglen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void dj_msg(char *msg, size_t msglen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (msg && msglen)
        vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
}

static uint64_t round_page(uint64_t v)
{
    return (v + 4095) & ~UINT64_C(4095);
}

static size_t layout_len(uint64_t bitmap_bytes, uint64_t capacity)
{
    return (size_t)(CUJU_DJ_HEADER_LEN + 2 * bitmap_bytes + 2 * capacity);
}

static int map_file(int fd, size_t len, struct cuju_dj **out)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (m == MAP_FAILED)
        return CUJU_E_IO;
    struct cuju_dj *dj = calloc(1, sizeof(*dj));
    if (dj == NULL) {
        munmap(m, len);
        return CUJU_E_NOMEM;
    }
    dj->mem = m;
    dj->h = m;
    dj->len = len;
    dj->fd = fd;
    *out = dj;
    return CUJU_OK;
}

static int geometry_ok(const struct cuju_dj_header *h, uint64_t file_len)
{
    if (h->magic != CUJU_DJ_MAGIC || h->version != CUJU_DJ_VERSION || h->header_len != CUJU_DJ_HEADER_LEN)
        return 0;
    if (h->block_size < 4096 || (h->block_size & (h->block_size - 1)) || h->capacity > DJ_MAX_CAPACITY ||
        h->capacity % 4096 || h->disk_size == 0)
        return 0;
    uint64_t nblocks = (h->disk_size + h->block_size - 1) / h->block_size;
    if (h->bitmap_bytes != round_page((nblocks + 7) / 8))
        return 0;
    return file_len == layout_len(h->bitmap_bytes, h->capacity) && h->active < 2;
}

int cuju_dj_create(const char *path, uint64_t disk_size, uint64_t capacity, uint64_t block_size,
                   struct cuju_dj **out, char *msg, size_t msglen)
{
    if (capacity == 0)
        capacity = DJ_DEFAULT_CAPACITY;
    if (block_size == 0)
        block_size = CUJU_DJ_DEFAULT_BLOCK;
    capacity = round_page(capacity);
    if (disk_size == 0 || capacity > DJ_MAX_CAPACITY || capacity < 2 * CUJU_DJ_REC_LEN || block_size < 4096 ||
        (block_size & (block_size - 1))) {
        dj_msg(msg, msglen, "journal geometry not supported: disk %llu bytes, capacity %llu, block %llu",
               (unsigned long long)disk_size, (unsigned long long)capacity, (unsigned long long)block_size);
        return CUJU_E_ARG;
    }
    uint64_t nblocks = (disk_size + block_size - 1) / block_size;
    uint64_t bitmap_bytes = round_page((nblocks + 7) / 8);
    size_t len = layout_len(bitmap_bytes, capacity);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        dj_msg(msg, msglen, "cannot open disk journal %s: %s", path, strerror(errno));
        return CUJU_E_JOURNAL;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0)
        goto io_error;
    if ((uint64_t)sb.st_size >= CUJU_DJ_HEADER_LEN) {
        /* An existing journal of this disk is kept with its own geometry
         * (capacity, block size): recreating it would drop records of epochs
         * not yet acknowledged, and the replica would silently diverge. */
        struct cuju_dj_header hb;
        if (pread(fd, &hb, sizeof(hb), 0) == (ssize_t)sizeof(hb) && geometry_ok(&hb, (uint64_t)sb.st_size) &&
            hb.disk_size == disk_size)
            len = (size_t)sb.st_size;
    }
    if ((uint64_t)sb.st_size == len) {
        struct cuju_dj *dj;
        if (map_file(fd, len, &dj) != CUJU_OK)
            goto io_error;
        struct cuju_dj_header *h = dj->h;
        if (geometry_ok(h, len) && h->disk_size == disk_size) {
            /* A restarted server: keep every record, including those of a
             * buffer sealed but not yet acknowledged. */
            h->server_pid = (uint64_t)getpid();
            __atomic_store_n(&h->busy, 0, __ATOMIC_SEQ_CST);
            h->generation++;
            *out = dj;
            return CUJU_OK;
        }
        cuju_dj_close(dj);      /* closes fd */
        fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            dj_msg(msg, msglen, "cannot reopen disk journal %s: %s", path, strerror(errno));
            return CUJU_E_JOURNAL;
        }
    }
    /* Fresh (or another geometry): start over; every bitmap bit and record
     * of an old journal is meaningless for this disk. */
    if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t)len) < 0)
        goto io_error;
    struct cuju_dj *dj;
    if (map_file(fd, len, &dj) != CUJU_OK)
        goto io_error;
    struct cuju_dj_header *h = dj->h;
    h->version = CUJU_DJ_VERSION;
    h->header_len = CUJU_DJ_HEADER_LEN;
    h->disk_size = disk_size;
    h->capacity = capacity;
    h->block_size = block_size;
    h->bitmap_bytes = bitmap_bytes;
    h->server_pid = (uint64_t)getpid();
    h->generation = 1;
    __atomic_store_n(&h->magic, CUJU_DJ_MAGIC, __ATOMIC_RELEASE);
    *out = dj;
    return CUJU_OK;

io_error:
    dj_msg(msg, msglen, "disk journal %s: %s", path, strerror(errno));
    close(fd);
    return CUJU_E_JOURNAL;
}

int cuju_dj_open(const char *path, struct cuju_dj **out, char *msg, size_t msglen)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        dj_msg(msg, msglen, "cannot open disk journal %s: %s (is the disk's block server running?)", path,
               strerror(errno));
        return CUJU_E_JOURNAL;
    }
    struct stat sb;
    struct cuju_dj_header hb;
    if (fstat(fd, &sb) < 0 || (uint64_t)sb.st_size < CUJU_DJ_HEADER_LEN ||
        pread(fd, &hb, sizeof(hb), 0) != (ssize_t)sizeof(hb) || !geometry_ok(&hb, (uint64_t)sb.st_size)) {
        dj_msg(msg, msglen, "%s is not a cuju-libvirt disk journal of this version", path);
        close(fd);
        return CUJU_E_JOURNAL;
    }
    struct cuju_dj *dj;
    if (map_file(fd, (size_t)sb.st_size, &dj) != CUJU_OK) {
        dj_msg(msg, msglen, "cannot map disk journal %s: %s", path, strerror(errno));
        close(fd);
        return CUJU_E_JOURNAL;
    }
    *out = dj;
    return CUJU_OK;
}

void cuju_dj_close(struct cuju_dj *dj)
{
    if (dj == NULL)
        return;
    if (dj->mem)
        munmap(dj->mem, dj->len);
    if (dj->fd >= 0)
        close(dj->fd);
    free(dj);
}

uint64_t cuju_dj_nblocks(const struct cuju_dj *dj)
{
    return (dj->h->disk_size + dj->h->block_size - 1) / dj->h->block_size;
}

uint8_t *cuju_dj_bitmap(struct cuju_dj *dj, int idx)
{
    return dj->mem + CUJU_DJ_HEADER_LEN + (size_t)idx * dj->h->bitmap_bytes;
}

uint8_t *cuju_dj_records(struct cuju_dj *dj, int idx)
{
    return dj->mem + CUJU_DJ_HEADER_LEN + 2 * dj->h->bitmap_bytes + (size_t)idx * dj->h->capacity;
}

/* ---- server side ---- */

static void mark(struct cuju_dj *dj, int idx, uint64_t offset, uint64_t length)
{
    uint8_t *bm = cuju_dj_bitmap(dj, idx);
    uint64_t bs = dj->h->block_size;
    uint64_t b = offset / bs, last = (offset + length - 1) / bs;
    for (; b <= last && (b & 7); b++)
        bm[b >> 3] |= (uint8_t)(1u << (b & 7));
    for (; b + 8 <= last + 1; b += 8)
        bm[b >> 3] = 0xff;
    for (; b <= last; b++)
        bm[b >> 3] |= (uint8_t)(1u << (b & 7));
}

/* Room for `need` bytes in buffer idx, or NULL (overflow: bitmap only). */
static uint8_t *reserve(struct cuju_dj *dj, int idx, uint64_t need)
{
    struct cuju_dj_buf *b = &dj->h->buf[idx];
    if (b->overflow)
        return NULL;
    if (b->used + need > dj->h->capacity) {
        b->overflow = 1;
        dj->h->n_overflows++;
        return NULL;
    }
    return cuju_dj_records(dj, idx) + b->used;
}

static void put_rec(uint8_t *p, uint32_t kind, uint64_t offset, uint64_t length)
{
    cuju_put_le32(p, kind);
    cuju_put_le32(p + 4, 0);
    cuju_put_le64(p + 8, offset);
    cuju_put_le64(p + 16, length);
}

static void commit(struct cuju_dj *dj, int idx, uint64_t need)
{
    struct cuju_dj_buf *b = &dj->h->buf[idx];
    b->records++;
    __atomic_store_n(&b->used, b->used + need, __ATOMIC_RELEASE);
}

int cuju_dj_begin(struct cuju_dj *dj, uint64_t offset, uint64_t length)
{
    struct cuju_dj_header *h = dj->h;
    __atomic_store_n(&h->busy, 1, __ATOMIC_SEQ_CST);
    int idx = (int)__atomic_load_n(&h->active, __ATOMIC_SEQ_CST);
    if (length > 0)
        mark(dj, idx, offset, length);
    return idx;
}

void cuju_dj_end(struct cuju_dj *dj)
{
    __atomic_store_n(&dj->h->busy, 0, __ATOMIC_SEQ_CST);
}

void cuju_dj_append_write(struct cuju_dj *dj, int idx, uint64_t offset, uint64_t length, const void *data)
{
    struct cuju_dj_header *h = dj->h;
    if (length == 0)
        return;
    h->n_writes++;
    h->bytes_written += length;
    /* Records larger than CUJU_DJ_MAX_RECORD cannot occur from NBD (32 MiB
     * requests); split anyway so the receiver's limit always holds. */
    const uint8_t *src = data;
    while (length > 0) {
        uint64_t n = length < CUJU_DJ_MAX_RECORD ? length : CUJU_DJ_MAX_RECORD;
        uint64_t need = cuju_dj_write_len(n);
        uint8_t *p = reserve(dj, idx, need);
        if (p == NULL)
            break;
        put_rec(p, CUJU_DJ_WRITE, offset, n);
        memcpy(p + CUJU_DJ_REC_LEN, src, n);
        if (n & 7)
            memset(p + CUJU_DJ_REC_LEN + n, 0, 8 - (n & 7));
        commit(dj, idx, need);
        offset += n;
        src += n;
        length -= n;
    }
}

void cuju_dj_append_zero(struct cuju_dj *dj, int idx, uint64_t offset, uint64_t length, int trimmed)
{
    struct cuju_dj_header *h = dj->h;
    if (length == 0)
        return;
    while (length > 0) {
        uint64_t n = length < CUJU_DJ_MAX_RECORD ? length : CUJU_DJ_MAX_RECORD;
        uint8_t *p = reserve(dj, idx, CUJU_DJ_REC_LEN);
        if (p == NULL)
            break;
        put_rec(p, trimmed ? CUJU_DJ_TRIM : CUJU_DJ_ZERO, offset, n);
        commit(dj, idx, CUJU_DJ_REC_LEN);
        offset += n;
        length -= n;
    }
    if (trimmed)
        h->n_trims++;
    else
        h->n_zeroes++;
}

void cuju_dj_record_write(struct cuju_dj *dj, uint64_t offset, uint64_t length, const void *data)
{
    int idx = cuju_dj_begin(dj, offset, length);
    cuju_dj_append_write(dj, idx, offset, length, data);
    cuju_dj_end(dj);
}

void cuju_dj_record_zero(struct cuju_dj *dj, uint64_t offset, uint64_t length, int trimmed)
{
    int idx = cuju_dj_begin(dj, offset, length);
    cuju_dj_append_zero(dj, idx, offset, length, trimmed);
    cuju_dj_end(dj);
}

/* ---- identity ---- */

static uint64_t new_lineage(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v) || v == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 32) ^ 1;
    }
    return v;
}

static int64_t mtime_ns(const struct stat *sb)
{
    return (int64_t)sb->st_mtim.tv_sec * 1000000000 + (int64_t)sb->st_mtim.tv_nsec;
}

int cuju_dj_bind_image(struct cuju_dj *dj, int image_fd)
{
    struct cuju_dj_header *h = dj->h;
    struct stat sb;
    if (fstat(image_fd, &sb) < 0)
        return CUJU_E_IO;
    int same = h->image_dev == (uint64_t)sb.st_dev && h->image_ino == (uint64_t)sb.st_ino;
    if (h->image_dev != 0 && !same) {
        /* Another image at this journal's path: nothing in it is about this one. */
        memset(cuju_dj_bitmap(dj, 0), 0, 2 * h->bitmap_bytes);
        memset(h->buf, 0, sizeof(h->buf));
        __atomic_store_n(&h->active, 0, __ATOMIC_SEQ_CST);
    }
    if (!(same && h->clean_stop && h->image_mtime_ns == mtime_ns(&sb)) || h->lineage == 0)
        h->lineage = new_lineage();
    h->image_dev = (uint64_t)sb.st_dev;
    h->image_ino = (uint64_t)sb.st_ino;
    __atomic_store_n(&h->clean_stop, 0, __ATOMIC_SEQ_CST);
    return CUJU_OK;
}

void cuju_dj_stop(struct cuju_dj *dj, int image_fd)
{
    struct stat sb;
    if (image_fd < 0 || fstat(image_fd, &sb) < 0)
        return;
    dj->h->image_mtime_ns = mtime_ns(&sb);
    __atomic_store_n(&dj->h->clean_stop, 1, __ATOMIC_SEQ_CST);
}

/* ---- sealer side ---- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int cuju_dj_seal(struct cuju_dj *dj, uint64_t epoch)
{
    struct cuju_dj_header *h = dj->h;
    int idx = (int)__atomic_load_n(&h->active, __ATOMIC_SEQ_CST);
    struct cuju_dj_buf *other = &h->buf[idx ^ 1];
    if (other->used || other->overflow || other->epoch)
        return -1;
    __atomic_store_n(&h->active, (uint32_t)(idx ^ 1), __ATOMIC_SEQ_CST);
    uint64_t t0 = 0;
    while (__atomic_load_n(&h->busy, __ATOMIC_SEQ_CST)) {
        /* Only a server killed mid-append leaves busy set; a restarted
         * server clears it. Do not wait forever on a dead one. */
        if (t0 == 0)
            t0 = now_ns();
        else if (now_ns() - t0 > SEAL_SPIN_LIMIT_NS)
            return -2;
        sched_yield();
    }
    h->buf[idx].epoch = epoch ? epoch : UINT64_MAX;
    h->seals++;
    return idx;
}

int cuju_dj_reset(struct cuju_dj *dj, int idx)
{
    struct cuju_dj_header *h = dj->h;
    if (idx < 0 || idx > 1 || (uint32_t)idx == __atomic_load_n(&h->active, __ATOMIC_SEQ_CST))
        return CUJU_E_ARG;
    memset(cuju_dj_bitmap(dj, idx), 0, h->bitmap_bytes);
    struct cuju_dj_buf *b = &h->buf[idx];
    uint64_t used = b->used;
    b->used = 0;
    b->records = 0;
    b->overflow = 0;
    b->epoch = 0;
    /* Keep the first CUJU_DJ_KEEP_BYTES of the buffer's tmpfs pages: handing
     * them back every epoch made the server take a page fault (and zero a
     * page) under its write lock for every 4 KiB write of the next epoch.
     * Only what a large epoch used beyond that goes back. */
    if (used > CUJU_DJ_KEEP_BYTES) {
        off_t at = (off_t)(cuju_dj_records(dj, idx) - dj->mem + CUJU_DJ_KEEP_BYTES);
        fallocate(dj->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at,
                  (off_t)(round_page(used) - CUJU_DJ_KEEP_BYTES));
    }
    return CUJU_OK;
}

static int bit(const uint8_t *bm, uint64_t b)
{
    return (bm[b >> 3] >> (b & 7)) & 1;
}

static int all_zero(const uint8_t *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)(const void *)p;
    size_t i = 0;
    for (; i < n / 8; i++)
        if (w[i])
            return 0;
    for (i *= 8; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int pread_all(int fd, uint8_t *buf, uint64_t len, uint64_t off, int *eno)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            *eno = errno;
            return CUJU_E_IO;
        }
        if (n == 0) {           /* past the file's end: reads as zeros */
            memset(buf, 0, len);
            return CUJU_OK;
        }
        buf += n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return CUJU_OK;
}

int cuju_dj_build_from_bitmap(const uint8_t *bitmap, uint64_t nblocks, uint64_t block_size, uint64_t disk_size,
                              int image_fd, uint64_t *cursor, uint8_t *out, uint64_t cap, uint64_t *len,
                              int *err_errno)
{
    uint64_t b = *cursor, used = 0;
    uint8_t *open_rec = NULL;   /* the record a run extends */
    uint32_t open_kind = 0;
    uint64_t open_end = 0;
    while (b < nblocks) {
        if (!bit(bitmap, b)) {
            /* Skip clear bytes quickly. */
            if ((b & 7) == 0 && b + 8 <= nblocks && bitmap[b >> 3] == 0) {
                b += 8;
            } else {
                b++;
            }
            open_rec = NULL;
            continue;
        }
        uint64_t off = b * block_size;
        uint64_t n = off + block_size <= disk_size ? block_size : disk_size - off;
        /* Worst case for this block: a new WRITE record. */
        if (used + cuju_dj_write_len(n) > cap)
            break;
        uint8_t *tmp = out + used + CUJU_DJ_REC_LEN;
        int rc = pread_all(image_fd, tmp, n, off, err_errno);
        if (rc != CUJU_OK)
            return rc;
        uint32_t kind = all_zero(tmp, n) ? CUJU_DJ_ZERO : CUJU_DJ_WRITE;
        uint64_t open_len = open_rec ? cuju_get_le64(open_rec + 16) : 0;
        if (open_rec && open_kind == kind && open_end == off && open_len + n <= CUJU_DJ_MAX_RECORD &&
            (kind == CUJU_DJ_ZERO || (open_len & 7) == 0)) {
            if (kind == CUJU_DJ_WRITE) {
                /* Data was read right behind the open record's data. */
                memmove(open_rec + CUJU_DJ_REC_LEN + open_len, tmp, n);
                used = (uint64_t)(open_rec - out) + cuju_dj_write_len(open_len + n);
                if ((open_len + n) & 7)
                    memset(open_rec + CUJU_DJ_REC_LEN + open_len + n, 0, 8 - ((open_len + n) & 7));
            }
            cuju_put_le64(open_rec + 16, open_len + n);
        } else {
            uint8_t *p = out + used;
            put_rec(p, kind, off, n);
            if (kind == CUJU_DJ_WRITE) {
                /* tmp already sits at p + REC_LEN */
                if (n & 7)
                    memset(p + CUJU_DJ_REC_LEN + n, 0, 8 - (n & 7));
                used += cuju_dj_write_len(n);
            } else {
                used += CUJU_DJ_REC_LEN;
            }
            open_rec = p;
            open_kind = kind;
        }
        open_end = off + n;
        b++;
    }
    *cursor = b < nblocks ? b : nblocks;
    *len = used;
    return CUJU_OK;
}

int cuju_dj_mark_allocated(int image_fd, uint64_t disk_size, uint64_t block_size, uint8_t *bitmap,
                           uint64_t *nset, int *err_errno)
{
    uint64_t set = 0;
    off_t pos = 0;
    while ((uint64_t)pos < disk_size) {
        off_t data = lseek(image_fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;          /* no data after pos */
            if (errno == EINVAL) {
                data = pos;     /* no SEEK_DATA here: everything is data */
            } else {
                *err_errno = errno;
                return CUJU_E_IO;
            }
        }
        if ((uint64_t)data >= disk_size)
            break;
        off_t hole = lseek(image_fd, data, SEEK_HOLE);
        if (hole < 0 || (uint64_t)hole > disk_size)
            hole = (off_t)disk_size;
        for (uint64_t b = (uint64_t)data / block_size; b * block_size < (uint64_t)hole; b++) {
            if (!bit(bitmap, b)) {
                bitmap[b >> 3] |= (uint8_t)(1u << (b & 7));
                set++;
            }
        }
        pos = hole;
    }
    *nset = set;
    return CUJU_OK;
}

/* ---- receiver side ---- */

int cuju_dj_check_section(const uint8_t *p, uint64_t len, unsigned ndisks, const uint64_t *sizes, char *msg,
                          size_t msglen)
{
    uint64_t at = 0;
    if (len % 8) {
        dj_msg(msg, msglen, "disk section length %llu is not a multiple of 8", (unsigned long long)len);
        return CUJU_E_FRAME;
    }
    while (at < len) {
        if (len - at < CUJU_DJ_PART_LEN) {
            dj_msg(msg, msglen, "disk section: truncated part header at %llu", (unsigned long long)at);
            return CUJU_E_FRAME;
        }
        uint32_t disk = cuju_get_le32(p + at), flags = cuju_get_le32(p + at + 4);
        uint64_t nbytes = cuju_get_le64(p + at + 8);
        at += CUJU_DJ_PART_LEN;
        if (disk >= ndisks) {
            dj_msg(msg, msglen, "disk section names disk %u; this backup replicates %u disk(s)", disk, ndisks);
            return CUJU_E_INDEX;
        }
        if (flags || nbytes % 8 || nbytes > len - at) {
            dj_msg(msg, msglen, "disk section: bad part header (disk %u, %llu bytes)", disk,
                   (unsigned long long)nbytes);
            return CUJU_E_FRAME;
        }
        uint64_t end = at + nbytes;
        while (at < end) {
            if (end - at < CUJU_DJ_REC_LEN) {
                dj_msg(msg, msglen, "disk %u: truncated record", disk);
                return CUJU_E_FRAME;
            }
            uint32_t kind = cuju_get_le32(p + at), rflags = cuju_get_le32(p + at + 4);
            uint64_t off = cuju_get_le64(p + at + 8), n = cuju_get_le64(p + at + 16);
            if (rflags || (kind != CUJU_DJ_WRITE && kind != CUJU_DJ_ZERO && kind != CUJU_DJ_TRIM) || n == 0 ||
                n > CUJU_DJ_MAX_RECORD) {
                dj_msg(msg, msglen, "disk %u: bad record (kind %u, %llu bytes)", disk, kind, (unsigned long long)n);
                return CUJU_E_FRAME;
            }
            if (off > sizes[disk] || n > sizes[disk] - off) {
                dj_msg(msg, msglen, "disk %u: record at %llu+%llu beyond the disk's %llu bytes", disk,
                       (unsigned long long)off, (unsigned long long)n, (unsigned long long)sizes[disk]);
                return CUJU_E_INDEX;
            }
            uint64_t rl = kind == CUJU_DJ_WRITE ? cuju_dj_write_len(n) : CUJU_DJ_REC_LEN;
            if (rl > end - at) {
                dj_msg(msg, msglen, "disk %u: record data runs past its part", disk);
                return CUJU_E_FRAME;
            }
            at += rl;
        }
    }
    return CUJU_OK;
}

static int pwrite_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off, int *eno)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *eno = n < 0 ? errno : EIO;
            return CUJU_E_APPLY;
        }
        buf += n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return CUJU_OK;
}

static int zero_range(int fd, uint64_t off, uint64_t n, int punch, int *eno)
{
    if (punch && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) == 0)
        return CUJU_OK;
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) == 0)
        return CUJU_OK;
    if (!punch && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) == 0)
        return CUJU_OK;
    static const uint8_t zeros[65536];
    while (n > 0) {
        uint64_t k = n < sizeof(zeros) ? n : sizeof(zeros);
        int rc = pwrite_all(fd, zeros, k, off, eno);
        if (rc != CUJU_OK)
            return rc;
        off += k;
        n -= k;
    }
    return CUJU_OK;
}

int cuju_dj_apply_section(const uint8_t *p, uint64_t len, const int *fds, uint64_t crash_after,
                          uint64_t *nrecords, int *err_errno)
{
    uint64_t at = 0, count = 0;
    while (at < len) {
        uint32_t disk = cuju_get_le32(p + at);
        uint64_t end = at + CUJU_DJ_PART_LEN + cuju_get_le64(p + at + 8);
        at += CUJU_DJ_PART_LEN;
        while (at < end) {
            uint32_t kind = cuju_get_le32(p + at);
            uint64_t off = cuju_get_le64(p + at + 8), n = cuju_get_le64(p + at + 16);
            if (crash_after && count == crash_after)
                _exit(87);      /* test hook: a backup killed in the middle of a disk apply */
            int rc;
            if (kind == CUJU_DJ_WRITE) {
                rc = pwrite_all(fds[disk], p + at + CUJU_DJ_REC_LEN, n, off, err_errno);
                at += cuju_dj_write_len(n);
            } else {
                rc = zero_range(fds[disk], off, n, kind == CUJU_DJ_TRIM, err_errno);
                at += CUJU_DJ_REC_LEN;
            }
            if (rc != CUJU_OK)
                return rc;
            count++;
        }
    }
    *nrecords = count;
    return CUJU_OK;
}
