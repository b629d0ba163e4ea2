/* The epoch replicator: sender (primary) and receiver (backup) of wire.h.
 *
 * Plain C with POSIX threads; no Python. Every function returns a CUJU_E_*
 * code (wire.h). Threads started here never call back into the caller; they
 * record failures in the object's state (err, err_errno, err_msg) and wake
 * every waiter.
 *
 * Sender (primary)
 *   cuju_sender_new(fd, region, region_size, page_size, session_id, disks,
 *       io_timeout_ms) takes ownership of fd (the caller passes a dup); disks
 *       is cuju_disk_geometry() of the replicated disks (0: none).
 *   cuju_sender_set_keys(s, keys) optional, before the handshake: encrypt the
 *       link (aead.h; CUJU_LINK_KEYS_LEN bytes, this side's tx first).
 *   cuju_sender_handshake(s, timeout_ms, &last_applied) sends HELLO, checks
 *       the reply, starts the send and ack threads.
 *   cuju_sender_stage(s, epoch, idx, n, dev, devlen, parts, nparts, timeout_ms,
 *       &slot) gathers the pages, the device state and the disk records
 *       (parts, sealed journals of diskjournal.h; borrowed ones are only
 *       referenced) into a free staging buffer (waits while both are busy).
 *   cuju_sender_ship(s) queues the staged epoch for the send thread.
 *   cuju_sender_wait_ack(s, epoch, timeout_ms) waits until `epoch` is acked.
 *   cuju_sender_close(s, orderly) (CLOSE frame when orderly), joins threads.
 *   cuju_sender_free(s).
 *
 * Receiver (backup)
 *   cuju_receiver_open(region, region_size, page_size, devstate_path,
 *       journal_path, durable, disks, &r) opens or creates the journal and
 *       replays committed but unapplied epochs (wire.h explains why); disks
 *       lists the replica images (fds owned by the receiver from then on).
 *   cuju_receiver_set_keys(r, keys) optional, before start (as for the sender).
 *   cuju_receiver_start(r, fd, io_timeout_ms, handshake_timeout_ms) takes fd,
 *       starts the receive thread (handshake, then epochs) and the apply
 *       thread.
 *   cuju_receiver_wait(r, timeout_ms) waits for the session to end.
 *   cuju_receiver_close(r), cuju_receiver_free(r).
 */
#ifndef CUJU_REPLICATOR_H
#define CUJU_REPLICATOR_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

#define CUJU_ERRMSG_LEN 160

/* Operator counters of a sender. Copied out under the sender's lock. */
struct cuju_sender_stats {
    uint64_t epochs_staged;     /* caller thread, under lock */
    uint64_t epochs_shipped;    /* send thread, under lock: fully written to the socket */
    uint64_t epochs_acked;      /* ack thread, under lock */
    uint64_t pages;             /* caller thread: page records staged */
    uint64_t zero_pages;        /* caller thread: ZERO records staged */
    uint64_t devstate_bytes;    /* caller thread */
    uint64_t disk_bytes;        /* caller thread: bytes of disk sections staged */
    uint64_t wire_bytes;        /* send thread: bytes written to the socket */
    uint64_t saved_bytes;       /* caller thread: page bytes the encoder did not send */
    uint64_t stage_ns;          /* caller thread: total gather time */
    uint64_t last_stage_ns;
    uint64_t send_ns;           /* send thread: checksum + write time */
    uint64_t last_send_ns;
    uint64_t ack_wait_ns;       /* ack thread: end of write to ACK, summed */
    uint64_t last_ack_wait_ns;
    uint64_t last_staged_epoch; /* caller thread */
    uint64_t last_shipped_epoch;/* send thread */
    uint64_t last_acked_epoch;  /* ack thread */
    uint64_t errors;            /* any thread: failures recorded */
};

struct cuju_sender;

/* One disk's records for an epoch (diskjournal.h). Copied by stage, unless
 * `borrowed`: then the send thread writes them from where they lie (a sealed
 * journal buffer), so the pause does not copy the epoch's disk writes; the
 * caller keeps them unchanged until the epoch is acknowledged, or until the
 * staging buffer's next stage (cuju_sender_stage's *slot), or close. */
struct cuju_disk_part {
    uint32_t disk;              /* index in the receiver's replica list */
    uint32_t borrowed;
    const uint8_t *records;
    uint64_t len;               /* bytes, a multiple of 8 */
};

/* The replica images of a receiver: fds are owned by the receiver. */
struct cuju_disk_set {
    unsigned n;                 /* <= CUJU_DJ_MAX_DISKS */
    int *fds;
    uint64_t *sizes;
};

/* The HELLO's disks field (wire.h) for n disks of these sizes. */
uint64_t cuju_disk_geometry(unsigned n, const uint64_t *sizes);

int cuju_sender_new(int fd, const uint8_t *region, uint64_t region_size, uint32_t page_size,
                    uint64_t session_id, uint64_t disks, int io_timeout_ms, struct cuju_sender **out);
int cuju_sender_set_keys(struct cuju_sender *s, const uint8_t *keys);
int cuju_sender_handshake(struct cuju_sender *s, int timeout_ms, uint64_t *last_applied);
/* *slot (may be NULL): the staging buffer (0 or 1) the epoch went into; its
 * borrowed parts are no longer read once a later stage into the same slot
 * returns. */
int cuju_sender_stage(struct cuju_sender *s, uint64_t epoch, const uint64_t *idx, size_t n,
                      const uint8_t *dev, size_t devlen, const struct cuju_disk_part *parts, size_t nparts,
                      int timeout_ms, int *slot);
int cuju_sender_ship(struct cuju_sender *s);
/* CUJU_OK when acked, CUJU_E_TIMEOUT when not yet, another code on failure. */
int cuju_sender_wait_ack(struct cuju_sender *s, uint64_t epoch, int timeout_ms);
void cuju_sender_stats(struct cuju_sender *s, struct cuju_sender_stats *out);
/* The first failure recorded (CUJU_OK if none), with errno and a message. */
int cuju_sender_error(struct cuju_sender *s, int *err_errno, int *peer_code, char *msg, size_t msglen);
int cuju_sender_close(struct cuju_sender *s, int orderly, int timeout_ms);
void cuju_sender_free(struct cuju_sender *s);

/* Operator counters of a receiver. Copied out under the receiver's lock. */
struct cuju_receiver_stats {
    uint64_t epochs_received;   /* receive thread: complete and verified */
    uint64_t epochs_applied;    /* apply thread (and open's replay) */
    uint64_t epochs_replayed;   /* cuju_receiver_open: replayed from the journal */
    uint64_t pages;             /* apply thread: page records applied */
    uint64_t zero_pages;        /* apply thread: ZERO records applied */
    uint64_t wire_bytes;        /* receive thread: bytes read from the socket */
    uint64_t devstate_bytes;    /* apply thread */
    uint64_t disk_records;      /* apply thread (and replay): disk records applied */
    uint64_t disk_bytes;        /* apply thread (and replay): bytes of disk sections applied */
    uint64_t receive_ns;        /* receive thread: first to last byte of EPOCH frames */
    uint64_t last_receive_ns;
    uint64_t verify_ns;         /* receive thread: checksum and table checks */
    uint64_t last_verify_ns;
    uint64_t apply_ns;          /* apply thread */
    uint64_t last_apply_ns;
    uint64_t last_acked_epoch;  /* receive thread: last ACK sent */
    uint64_t last_applied_epoch;/* apply thread: the region holds this epoch */
    uint64_t errors;            /* any thread */
};

struct cuju_receiver;

int cuju_receiver_open(uint8_t *region, uint64_t region_size, uint32_t page_size, const char *devstate_path,
                       const char *journal_path, int durable, const struct cuju_disk_set *disks,
                       struct cuju_receiver **out, char *msg, size_t msglen);
int cuju_receiver_set_keys(struct cuju_receiver *r, const uint8_t *keys);
int cuju_receiver_start(struct cuju_receiver *r, int fd, int io_timeout_ms, int handshake_timeout_ms);
/* CUJU_OK when the session ended cleanly (CLOSE), CUJU_E_TIMEOUT when still
 * running after timeout_ms (< 0: forever), the failure code otherwise. */
int cuju_receiver_wait(struct cuju_receiver *r, int timeout_ms);
void cuju_receiver_stats(struct cuju_receiver *r, struct cuju_receiver_stats *out);
uint64_t cuju_receiver_last_applied(struct cuju_receiver *r);
int cuju_receiver_error(struct cuju_receiver *r, int *err_errno, int *peer_code, char *msg, size_t msglen);
void cuju_receiver_close(struct cuju_receiver *r);
void cuju_receiver_free(struct cuju_receiver *r);

/* Shared helpers (netio.c). */
uint64_t cuju_now_ns(void);
/* Write/read exactly len bytes; poll with io_timeout_ms between progress
 * (<= 0: no timeout). CUJU_E_EOF when the peer closed before len bytes. */
int cuju_send_all(int fd, const void *buf, size_t len, int io_timeout_ms, int *err_errno);
int cuju_recv_all(int fd, void *buf, size_t len, int io_timeout_ms, int *err_errno);
void cuju_tune_socket(int fd);
/* An ERROR frame with code and text, best effort. */
/* An ERROR frame (wire.h) into f (CUJU_FRAME_HDR_LEN + 8 + CUJU_WIRE_MAX_ERRMSG
 * bytes); returns its length. */
size_t cuju_error_frame(uint8_t *f, int code, const char *msg);
void cuju_frame_header(uint8_t *p, uint32_t type, uint64_t length);

#endif
