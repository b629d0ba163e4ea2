/* Epoch disk journal: what the block server records, and the disk section of
 * an EPOCH frame (wire.h). Plain C; no Python, no nbdkit.
 *
 * Who uses it
 * -----------
 * - The block server (c_ext/nbdkit/cujudisk.c, an nbdkit plugin run outside
 *   cujud's process tree) serves one disk image. Every write, write-zeroes
 *   and trim goes to the image at once and is replied at once; the same call
 *   appends a record to the journal's ACTIVE buffer and marks the blocks it
 *   touched in that buffer's bitmap (cuju_dj_record_*).
 * - cujud (through the extension) maps the same file. While the VM is
 *   stopped -- QMP `stop` drains and flushes every block request, so no write
 *   is in flight -- it SEALS the journal (cuju_dj_seal): the other buffer
 *   becomes active and the sealed one holds exactly the epoch's writes, in
 *   the order the server applied them to the image. The sealed records go
 *   into the EPOCH frame's disk section; the buffer is reset
 *   (cuju_dj_reset) only once that epoch is acknowledged.
 * - The receiver checks (cuju_dj_check_section) and applies
 *   (cuju_dj_apply_section) disk sections to the replica images.
 *
 * Journal file (host byte order; a tmpfs file both processes map shared)
 * ----------------------------------------------------------------------
 *     0     header (struct cuju_dj_header, one 4096-byte page)
 *     4096  bitmap 0, bitmap 1: bitmap_bytes each (rounded up to 4096); bit
 *           b set = block b (block_size bytes) was written, zeroed or trimmed
 *           while that buffer was active
 *     ...   buffer 0, buffer 1: capacity bytes each, records as below
 * A buffer that has no room for a record sets `overflow` and keeps only
 * marking its bitmap: that epoch is then shipped from the bitmap, reading the
 * blocks from the image while the VM is stopped (cuju_dj_build_from_bitmap).
 * Bitmaps of buffers whose epoch was never acknowledged are also what a
 * resynchronisation after a backup outage sends (only what changed).
 *
 * Seal protocol (Dekker, sequentially consistent atomics): the server sets
 * `busy` = 1, reads `active`, marks the bitmap, writes the image, appends,
 * sets `busy` = 0; the sealer stores
 * the new `active`, then waits while `busy` is 1. An append that read the
 * old `active` is complete when the sealer reads `busy` = 0; every later
 * append sees the new one. The server serialises its own appenders (one
 * mutex around image write + append, so record order == image order).
 *
 * Record (LITTLE-ENDIAN, 8-byte aligned; also the wire format)
 * -------------------------------------------------------------
 *     u32 kind     CUJU_DJ_WRITE, CUJU_DJ_ZERO, CUJU_DJ_TRIM
 *     u32 flags    0
 *     u64 offset   byte offset in the disk
 *     u64 length   bytes, 1 .. CUJU_DJ_MAX_RECORD; offset + length <= disk size
 *     WRITE only:  length bytes of data, then zero padding to a multiple of 8
 * ZERO and TRIM both mean "the range reads as zeros afterwards" (the server
 * records a TRIM only when it really punched the hole); the replica punches
 * a hole for TRIM and zeroes for ZERO. Every record is absolute content, so
 * applying a section twice (journal replay) gives the same disk.
 *
 * Disk section of an EPOCH frame (wire version 2): disk_len bytes made of
 * parts, each
 *     u32 disk     index into the receiver's replica list (< its count)
 *     u32 flags    0
 *     u64 nbytes   bytes of records that follow (multiple of 8)
 *     records
 * Parts and records are applied in order.
 */
#ifndef CUJU_DISKJOURNAL_H
#define CUJU_DISKJOURNAL_H

#include <stddef.h>
#include <stdint.h>

#define CUJU_DJ_MAGIC UINT64_C(0x4c4a442d554a5543)   /* "CUJU-DJL" */
#define CUJU_DJ_VERSION 1u
#define CUJU_DJ_HEADER_LEN 4096u
#define CUJU_DJ_REC_LEN 24u
#define CUJU_DJ_PART_LEN 16u
/* Largest single record (nbdkit's largest request is 32 MiB). */
#define CUJU_DJ_MAX_RECORD (UINT64_C(64) << 20)
#define CUJU_DJ_DEFAULT_BLOCK (64u << 10)
#define CUJU_DJ_MAX_DISKS 64u
/* Bytes of each buffer whose memory a reset keeps (the rest of a larger
 * epoch is given back to tmpfs): so a steady writer never faults its journal. */
#define CUJU_DJ_KEEP_BYTES (UINT64_C(16) << 20)

enum cuju_dj_kind {
    CUJU_DJ_WRITE = 1,
    CUJU_DJ_ZERO = 2,
    CUJU_DJ_TRIM = 3,
};

struct cuju_dj_buf {
    uint64_t used;          /* server (appender): bytes of records; sealer resets */
    uint64_t records;       /* server */
    uint32_t overflow;      /* server: a record did not fit */
    uint32_t pad;
    uint64_t epoch;         /* sealer: the epoch it was sealed for (0 = none) */
};

/* One page at the start of the file. Geometry fields are written once by the
 * creating server; `active` and `busy` follow the seal protocol above. */
struct cuju_dj_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_len;
    uint64_t disk_size;     /* bytes of the disk (the export size) */
    uint64_t capacity;      /* bytes per buffer */
    uint64_t block_size;    /* bytes per bitmap bit */
    uint64_t bitmap_bytes;  /* bytes per bitmap (rounded up to 4096) */
    uint64_t server_pid;    /* server: the process serving the disk now */
    uint64_t generation;    /* server: starts of a server on this journal */
    uint32_t active;        /* sealer (server reads): buffer receiving records */
    uint32_t busy;          /* server: 1 while appending */
    struct cuju_dj_buf buf[2];
    uint64_t n_writes;      /* server: totals since the journal was created */
    uint64_t n_zeroes;
    uint64_t n_trims;
    uint64_t n_flushes;
    uint64_t bytes_written;
    uint64_t n_overflows;   /* server: epochs that overflowed */
    uint64_t seals;         /* sealer */
    /* Identity (server, at start and clean stop; cuju_dj_bind_image): */
    uint64_t lineage;       /* random; a new one whenever the bitmaps may have missed a change
                             * of the image (fresh journal, another image, an image changed
                             * while no server ran, a server that was killed) */
    uint64_t image_dev;     /* the image this journal records (st_dev, st_ino; 0: unknown) */
    uint64_t image_ino;
    int64_t image_mtime_ns; /* the image's mtime at the last clean stop */
    uint32_t clean_stop;    /* 1 from a clean stop (cuju_dj_stop) to the next start */
    uint32_t pad2;
};

struct cuju_dj {
    struct cuju_dj_header *h;   /* the mapping */
    uint8_t *mem;
    size_t len;
    int fd;
};

/* Open the journal at path, creating it with this geometry, or re-creating it
 * when it belongs to a disk of another size; an existing journal of a disk of
 * this size is kept as it is, with its own capacity and block size (a
 * restarted server goes on appending to it). Server side. capacity and
 * block_size 0: defaults. */
int cuju_dj_create(const char *path, uint64_t disk_size, uint64_t capacity, uint64_t block_size,
                   struct cuju_dj **out, char *msg, size_t msglen);
/* Map an existing journal (cujud side). */
int cuju_dj_open(const char *path, struct cuju_dj **out, char *msg, size_t msglen);
void cuju_dj_close(struct cuju_dj *dj);

/* Server side, right after cuju_dj_create: tie the journal to the image it
 * serves. Another image (device, inode) than the journal's starts the journal
 * over; the same image keeps every record, but gets a new lineage unless the
 * last server stopped cleanly (cuju_dj_stop) and the image's mtime is still
 * the one it left: a resync may trust the bitmaps only within one lineage. */
int cuju_dj_bind_image(struct cuju_dj *dj, int image_fd);
/* Server side, at a clean stop (after the last write): record the image's mtime. */
void cuju_dj_stop(struct cuju_dj *dj, int image_fd);

/* Server side, around every change of the image, the caller serialising calls:
 *     idx = cuju_dj_begin(dj, off, len);   marks the blocks BEFORE the image is
 *                                          touched (a server killed between the
 *                                          two leaves a bit too many, never one
 *                                          too few)
 *     pwrite / fallocate the image
 *     cuju_dj_append_write / _zero(dj, idx, ...)   what reached the image
 *     cuju_dj_end(dj);
 * The seal waits while a change is between begin and end (seal protocol). */
int cuju_dj_begin(struct cuju_dj *dj, uint64_t offset, uint64_t length);
void cuju_dj_append_write(struct cuju_dj *dj, int idx, uint64_t offset, uint64_t length, const void *data);
void cuju_dj_append_zero(struct cuju_dj *dj, int idx, uint64_t offset, uint64_t length, int trimmed);
void cuju_dj_end(struct cuju_dj *dj);
/* The three in one, for an operation already applied to the image (tests). */
void cuju_dj_record_write(struct cuju_dj *dj, uint64_t offset, uint64_t length, const void *data);
void cuju_dj_record_zero(struct cuju_dj *dj, uint64_t offset, uint64_t length, int trimmed);

/* Sealer side (VM stopped). Seal: the active buffer becomes sealed for
 * `epoch`, the other one active. The other one must have been reset. Returns
 * the sealed buffer's index, or -1 (CUJU_E_ARG) if the other was not reset. */
int cuju_dj_seal(struct cuju_dj *dj, uint64_t epoch);
/* Forget a buffer's content (its epoch is acknowledged). Not the active one. */
int cuju_dj_reset(struct cuju_dj *dj, int idx);
uint8_t *cuju_dj_bitmap(struct cuju_dj *dj, int idx);
uint8_t *cuju_dj_records(struct cuju_dj *dj, int idx);
uint64_t cuju_dj_nblocks(const struct cuju_dj *dj);

/* Records for every block set in `bitmap` (nblocks bits), read from the image
 * fd: a WRITE per run of non-zero blocks, a ZERO per run of zero blocks (the
 * disk end clips the last block). Blocks before `*cursor` are skipped; stops
 * before `cap` bytes of records would be exceeded and sets *cursor to the
 * first block not covered (nblocks when done). Writes *len. */
int cuju_dj_build_from_bitmap(const uint8_t *bitmap, uint64_t nblocks, uint64_t block_size, uint64_t disk_size,
                              int image_fd, uint64_t *cursor, uint8_t *out, uint64_t cap, uint64_t *len,
                              int *err_errno);
/* Set the bits of every block holding data (SEEK_DATA/SEEK_HOLE), for the
 * initial synchronisation of a sparse image. Returns bits set in *nset. */
int cuju_dj_mark_allocated(int image_fd, uint64_t disk_size, uint64_t block_size, uint8_t *bitmap,
                           uint64_t *nset, int *err_errno);

/* Receiver side. Check a whole disk section against the replica list; on
 * error a message in msg. */
int cuju_dj_check_section(const uint8_t *p, uint64_t len, unsigned ndisks, const uint64_t *sizes, char *msg,
                          size_t msglen);
/* Apply a checked section. crash_after (tests): _exit(87) after that many
 * records (0 = off). */
int cuju_dj_apply_section(const uint8_t *p, uint64_t len, const int *fds, uint64_t crash_after,
                          uint64_t *nrecords, int *err_errno);
/* Bytes a WRITE record of `length` takes. */
static inline uint64_t cuju_dj_write_len(uint64_t length)
{
    return CUJU_DJ_REC_LEN + ((length + 7) & ~UINT64_C(7));
}

#endif
