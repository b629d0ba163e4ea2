/* nbdkit plugin "cujudisk": serve one disk image and journal every change
 * per epoch (c_ext/diskjournal.h).
 *
 *   nbdkit -U /run/cuju-libvirt/nbd/<uuid>/vda.sock -P vda.pid \
 *       nbdkit-cujudisk-plugin.so file=IMAGE journal=vda.journal [export=vda] \
 *       [size=BYTES] [capacity=BYTES] [block=BYTES]
 *
 * Writes, write-zeroes and trims go to the image at once and are replied at
 * once (holding a reply until the epoch commits would deadlock QMP `stop`,
 * which drains every request); each is also appended to the journal under
 * the same mutex, so the journal's order is the image's order. Reads go to
 * the image. FLUSH and FUA are fdatasync. `size` exports more than the file
 * holds (a qcow2 image that must be able to grow); beyond the file's end
 * reads return zeros and writes extend it.
 *
 * Every change marks the journal's dirty bitmap BEFORE the image is touched
 * (cuju_dj_begin), so the bitmaps a resync trusts never miss a block.
 *
 * The process is nbdkit's own daemon (not a child of cujud): the VM's disk
 * keeps working while cujud restarts; the journal lives in a file, so a
 * restarted server appends to the same journal.
 */
#define _GNU_SOURCE
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "diskjournal.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static char *file_path, *journal_path, *export_name;
static int64_t export_size = -1;
static uint64_t capacity, block_size;
static int image_fd = -1;
static uint64_t disk_size;
static struct cuju_dj *dj;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static void cujudisk_unload(void)
{
    if (dj != NULL && image_fd >= 0 && fdatasync(image_fd) == 0)
        cuju_dj_stop(dj, image_fd);     /* the image's mtime, for the next start to compare */
    cuju_dj_close(dj);
    if (image_fd >= 0)
        close(image_fd);
    free(file_path);
    free(journal_path);
    free(export_name);
}

static int cujudisk_config(const char *key, const char *value)
{
    if (strcmp(key, "file") == 0) {
        free(file_path);
        file_path = nbdkit_realpath(value);
        return file_path ? 0 : -1;
    }
    if (strcmp(key, "journal") == 0) {
        free(journal_path);
        journal_path = strdup(value);
        return journal_path ? 0 : -1;
    }
    if (strcmp(key, "export") == 0) {
        free(export_name);
        export_name = strdup(value);
        return export_name ? 0 : -1;
    }
    if (strcmp(key, "size") == 0) {
        export_size = nbdkit_parse_size(value);
        return export_size < 0 ? -1 : 0;
    }
    if (strcmp(key, "capacity") == 0 || strcmp(key, "block") == 0) {
        int64_t v = nbdkit_parse_size(value);
        if (v < 0)
            return -1;
        if (key[0] == 'c')
            capacity = (uint64_t)v;
        else
            block_size = (uint64_t)v;
        return 0;
    }
    nbdkit_error("unknown parameter '%s'", key);
    return -1;
}

static int cujudisk_config_complete(void)
{
    char msg[256];
    if (file_path == NULL || journal_path == NULL) {
        nbdkit_error("file= and journal= are required");
        return -1;
    }
    image_fd = open(file_path, O_RDWR | O_CLOEXEC);
    if (image_fd < 0) {
        nbdkit_error("open %s: %m", file_path);
        return -1;
    }
    struct stat sb;
    if (fstat(image_fd, &sb) < 0) {
        nbdkit_error("stat %s: %m", file_path);
        return -1;
    }
    disk_size = export_size > (int64_t)sb.st_size ? (uint64_t)export_size : (uint64_t)sb.st_size;
    disk_size &= ~UINT64_C(511);
    if (disk_size == 0) {
        nbdkit_error("%s: an empty image cannot be served", file_path);
        return -1;
    }
    if (cuju_dj_create(journal_path, disk_size, capacity, block_size, &dj, msg, sizeof(msg)) != 0) {
        nbdkit_error("%s", msg);
        return -1;
    }
    if (cuju_dj_bind_image(dj, image_fd) != 0) {
        nbdkit_error("stat %s: %m", file_path);
        return -1;
    }
    nbdkit_debug("cujudisk: %s, %" PRIu64 " bytes, journal %s generation %" PRIu64, file_path, disk_size,
                 journal_path, dj->h->generation);
    return 0;
}

#define cujudisk_config_help \
    "file=<IMAGE>      (required) the disk image.\n" \
    "journal=<PATH>    (required) the epoch journal (tmpfs).\n" \
    "export=<NAME>     refuse clients asking for another export name.\n" \
    "size=<BYTES>      export at least this size (a qcow2 file that grows).\n" \
    "capacity=<BYTES>  journal bytes per epoch buffer (default 64M).\n" \
    "block=<BYTES>     bytes per dirty-bitmap bit (default 64K)."

static void *cujudisk_open(int readonly)
{
    (void)readonly;
    if (export_name != NULL && strcmp(nbdkit_export_name(), export_name) != 0) {
        nbdkit_error("export '%s' unknown: this server serves '%s'", nbdkit_export_name(), export_name);
        return NULL;
    }
    return dj;
}

static int64_t cujudisk_get_size(void *h)
{
    (void)h;
    return (int64_t)disk_size;
}

static int cujudisk_can(void *h)
{
    (void)h;
    return 1;
}

static int cujudisk_can_fua(void *h)
{
    (void)h;
    return NBDKIT_FUA_NATIVE;
}

static int cujudisk_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    (void)flags;
    uint8_t *p = buf;
    while (count > 0) {
        ssize_t n = pread(image_fd, p, count, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            nbdkit_error("pread: %m");
            return -1;
        }
        if (n == 0) {           /* past the end of a growing file */
            memset(p, 0, count);
            return 0;
        }
        p += n;
        offset += (uint64_t)n;
        count -= (uint32_t)n;
    }
    return 0;
}

static int sync_if_fua(uint32_t flags)
{
    if ((flags & NBDKIT_FLAG_FUA) && fdatasync(image_fd) < 0) {
        nbdkit_error("fdatasync: %m");
        return -1;
    }
    return 0;
}

static int cujudisk_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    const uint8_t *p = buf;
    uint64_t off = offset;
    uint32_t left = count;
    pthread_mutex_lock(&write_lock);
    /* Marked before the image is touched: a server killed in between leaves a
     * block marked that did not change, never a changed block unmarked. */
    int idx = cuju_dj_begin(dj, offset, count);
    while (left > 0) {
        ssize_t n = pwrite(image_fd, p, left, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int e = n < 0 ? errno : EIO;
            /* What reached the image is journaled: the replica must hold it too. */
            cuju_dj_append_write(dj, idx, offset, count - left, buf);
            cuju_dj_end(dj);
            pthread_mutex_unlock(&write_lock);
            errno = e;
            nbdkit_error("pwrite: %m");
            return -1;
        }
        p += n;
        off += (uint64_t)n;
        left -= (uint32_t)n;
    }
    cuju_dj_append_write(dj, idx, offset, count, buf);
    cuju_dj_end(dj);
    pthread_mutex_unlock(&write_lock);
    return sync_if_fua(flags);
}

static int write_zeros(uint64_t off, uint64_t n)
{
    static const uint8_t zeros[65536];
    while (n > 0) {
        size_t k = n < sizeof(zeros) ? n : sizeof(zeros);
        ssize_t w = pwrite(image_fd, zeros, k, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        off += (uint64_t)w;
        n -= (uint64_t)w;
    }
    return 0;
}

static int cujudisk_zero(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    int trimmed = 0, rc = 0;
    pthread_mutex_lock(&write_lock);
    int idx = cuju_dj_begin(dj, offset, count);
    if ((flags & NBDKIT_FLAG_MAY_TRIM) &&
        fallocate(image_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, count) == 0)
        trimmed = 1;
    else if (fallocate(image_fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, count) == 0)
        ;
    else if (flags & NBDKIT_FLAG_FAST_ZERO) {
        cuju_dj_end(dj);
        pthread_mutex_unlock(&write_lock);
        errno = ENOTSUP;
        return -1;
    } else if (write_zeros(offset, count) < 0)
        rc = -1;
    /* Even a failed zeroing may have changed part of the range: record the
     * whole range as zero only when it succeeded, else as the image holds it. */
    if (rc == 0) {
        cuju_dj_append_zero(dj, idx, offset, count, trimmed);
    } else {
        int e = errno;
        uint8_t *tmp = malloc(count);
        if (tmp && cujudisk_pread(h, tmp, count, offset, 0) == 0)
            cuju_dj_append_write(dj, idx, offset, count, tmp);
        free(tmp);
        errno = e;
        nbdkit_error("write zeroes: %m");
    }
    cuju_dj_end(dj);
    pthread_mutex_unlock(&write_lock);
    return rc < 0 ? -1 : sync_if_fua(flags);
}

static int cujudisk_trim(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    pthread_mutex_lock(&write_lock);
    int idx = cuju_dj_begin(dj, offset, count);
    /* Trim is advisory: record it only when the hole really is there, so the
     * replica never reads zeros where the primary still reads data. */
    if (fallocate(image_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, count) == 0)
        cuju_dj_append_zero(dj, idx, offset, count, 1);
    cuju_dj_end(dj);
    pthread_mutex_unlock(&write_lock);
    return sync_if_fua(flags);
}

static int cujudisk_flush(void *h, uint32_t flags)
{
    (void)h;
    (void)flags;
    __atomic_add_fetch(&dj->h->n_flushes, 1, __ATOMIC_RELAXED);
    if (fdatasync(image_fd) < 0) {
        nbdkit_error("fdatasync: %m");
        return -1;
    }
    return 0;
}

static int cujudisk_can_extents(void *h)
{
    (void)h;
    return 1;
}

static int cujudisk_extents(void *h, uint32_t count, uint64_t offset, uint32_t flags,
                            struct nbdkit_extents *extents)
{
    (void)h;
    uint64_t end = offset + count;
    while (offset < end) {
        off_t d = lseek(image_fd, (off_t)offset, SEEK_DATA);
        if (d < 0 && errno == ENXIO)
            d = (off_t)disk_size;       /* only a hole follows */
        else if (d < 0)
            return nbdkit_add_extent(extents, offset, end - offset, 0);
        if ((uint64_t)d > offset) {
            uint64_t hole_end = (uint64_t)d < disk_size ? (uint64_t)d : disk_size;
            if (nbdkit_add_extent(extents, offset, hole_end - offset, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) < 0)
                return -1;
            offset = hole_end;
            if (flags & NBDKIT_FLAG_REQ_ONE)
                return 0;
            continue;
        }
        off_t hl = lseek(image_fd, (off_t)offset, SEEK_HOLE);
        uint64_t data_end = hl < 0 ? disk_size : (uint64_t)hl;
        if (data_end > disk_size || data_end <= offset)
            data_end = disk_size;
        if (nbdkit_add_extent(extents, offset, data_end - offset, 0) < 0)
            return -1;
        offset = data_end;
        if (flags & NBDKIT_FLAG_REQ_ONE)
            return 0;
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "cujudisk",
    .longname = "cuju-libvirt epoch-journaling disk",
    .version = "1",
    .description = "Serves a disk image and journals every change per FT epoch",
    .unload = cujudisk_unload,
    .config = cujudisk_config,
    .config_complete = cujudisk_config_complete,
    .config_help = cujudisk_config_help,
    .magic_config_key = "file",
    .open = cujudisk_open,
    .get_size = cujudisk_get_size,
    .can_write = cujudisk_can,
    .can_flush = cujudisk_can,
    .can_trim = cujudisk_can,
    .can_zero = cujudisk_can,
    .can_multi_conn = cujudisk_can,
    .can_fua = cujudisk_can_fua,
    .can_extents = cujudisk_can_extents,
    .pread = cujudisk_pread,
    .pwrite = cujudisk_pwrite,
    .zero = cujudisk_zero,
    .trim = cujudisk_trim,
    .flush = cujudisk_flush,
    .extents = cujudisk_extents,
    .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN(plugin)
