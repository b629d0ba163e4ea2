/* The FT link's record layer: every byte of a connection, when keys are set,
 * travels in AES-256-GCM records (OpenSSL libcrypto). Plain C, no Python.
 *
 * Record (either direction), on the wire:
 *     u32 n          LITTLE-ENDIAN plaintext length, 1 .. CUJU_AEAD_MAX_RECORD
 *     n bytes        ciphertext
 *     16 bytes       GCM tag over the ciphertext, with the 4 length bytes as
 *                    additional authenticated data
 * Nonce of record i (counting from 0 in each direction of one connection):
 * the direction's 12-byte IV with i XORed, big-endian, into its last 8 bytes.
 * Sequence numbers are implicit: a record that was dropped, replayed,
 * reordered, truncated, injected or changed in any bit fails its tag, and the
 * connection ends with CUJU_E_AUTH; nothing of it reaches the frame layer
 * (wire.h), so such an epoch is never committed or applied.
 *
 * Keys: each direction has its own 32-byte key and 12-byte IV, derived by the
 * caller (cuju_libvirt.ft_engine.linkkeys) from a secret that is fresh for
 * every connection, so a (key, nonce) pair is never used twice, across
 * reconnects included. Without keys the layer is the identity (plaintext).
 *
 * Threads: sends of one link may come from several threads (records are
 * numbered, sealed and written under the direction's lock, so seq order is
 * wire order); receives come from one thread at a time. A call that spans
 * more than one record hands its records to the direction's pool of
 * CUJU_AEAD_WORKERS threads (started at the first such call, on hosts with
 * cores to spare: CUJU_AEAD_POOL_MIN_CPUS): each record is
 * sealed or opened on its own, with the nonce of the number it was given
 * when published, while the caller writes the sealed ones in order or reads
 * the next. A received record that fits the caller's buffer is read and
 * opened in place; a call returns only when every record it took is checked,
 * and on any failure it zeroes the caller's buffer.
 */
#ifndef CUJU_AEAD_H
#define CUJU_AEAD_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define CUJU_AEAD_KEY_LEN 32
#define CUJU_AEAD_IV_LEN 12
#define CUJU_AEAD_TAG_LEN 16
#define CUJU_AEAD_HDR_LEN 4
/* 256 KiB of plaintext per record: 20 bytes of overhead per 64 pages. */
#define CUJU_AEAD_MAX_RECORD (256u * 1024u)
/* Crypto threads per direction, and records in flight per call. */
#define CUJU_AEAD_WORKERS 2
#define CUJU_AEAD_BATCH 8
/* The pool starts only on hosts with at least this many online CPUs. With
 * fewer, its threads take their cycles from the send/receive threads on the
 * same cores and add a wake-up and a cross-core cache transfer per record:
 * on the 2-core development machine (both ends in one process) sealing and
 * opening inline in the I/O thread ran ~10 % faster than with the pool. */
#define CUJU_AEAD_POOL_MIN_CPUS 4
/* tx key, tx iv, rx key, rx iv: what cuju_link_set_keys takes. */
#define CUJU_LINK_KEYS_LEN (2 * (CUJU_AEAD_KEY_LEN + CUJU_AEAD_IV_LEN))

struct cuju_aead;   /* one direction's cipher state and record buffer */

/* A connection: its socket and, once keys are set, both directions' state. */
struct cuju_link {
    int fd;                 /* immutable after setup */
    struct cuju_aead *tx;   /* NULL: cleartext; immutable after setup */
    struct cuju_aead *rx;   /* idem */
};

/* Crypto threads per direction for pools started from now on: 0 (inline),
 * 1 .. CUJU_AEAD_WORKERS, or -1 (the default: CUJU_AEAD_WORKERS when the host
 * has CUJU_AEAD_POOL_MIN_CPUS online CPUs, else 0). For tests and benchmarks. */
void cuju_aead_set_workers(int n);

/* Set both directions' keys (CUJU_LINK_KEYS_LEN bytes: tx key, tx iv, rx key,
 * rx iv) before the first byte is sent or received. CUJU_E_NOMEM, or
 * CUJU_E_ARG when keys are already set. */
int cuju_link_set_keys(struct cuju_link *l, const uint8_t *keys);
/* Free the cipher states (the fd is the owner's). */
void cuju_link_clear(struct cuju_link *l);
int cuju_link_encrypted(const struct cuju_link *l);

/* Exact send / receive through the record layer (or straight to the socket
 * without keys); the same codes and timeout rules as cuju_send_all and
 * cuju_recv_all, plus CUJU_E_AUTH and CUJU_E_FRAME for bad records. */
int cuju_link_send(struct cuju_link *l, const void *buf, size_t len, int io_timeout_ms, int *err_errno);
int cuju_link_recv(struct cuju_link *l, void *buf, size_t len, int io_timeout_ms, int *err_errno);
/* An ERROR frame (wire.h), best effort. */
void cuju_link_send_error(struct cuju_link *l, int code, const char *msg);

#endif
