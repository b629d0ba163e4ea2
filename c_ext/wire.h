/* cuju-libvirt FT-link wire format, version CUJU_WIRE_VERSION (version.h).
 *
 * One TCP connection per protected domain carries epochs from the primary
 * (sender) to the backup (receiver) and acknowledgements back.
 *
 * Byte order
 * ----------
 * Every integer on the wire is LITTLE-ENDIAN. Fields are naturally aligned
 * inside their frame; nothing is packed by the compiler: encoders and
 * decoders use cuju_put_le* / cuju_get_le* below.
 *
 * Frame
 * -----
 * Every frame starts with a 16-byte frame header:
 *
 *     u32 type     CUJU_FRAME_* below
 *     u32 flags    must be 0 in versions 1 and 2 (a non-zero value is CUJU_E_FRAME)
 *     u64 length   bytes of payload after this header; exact or bounded per
 *                  type (see "Limits"); anything else is CUJU_E_FRAME
 *
 * Connection setup (handshake)
 * ----------------------------
 * 1. sender -> HELLO, payload 40 bytes:
 *        u64 magic        CUJU_WIRE_MAGIC ("CUJU-FT" + NUL, as bytes in order)
 *        u32 version      CUJU_WIRE_VERSION
 *        u32 page_size    bytes per page (power of two, 4096 .. 2 MiB)
 *        u64 region_size  bytes of guest RAM replicated (multiple of page_size)
 *        u64 session_id   random, chosen by the sender; seeds every checksum
 *        u64 disks        0 without replicated disks, else the disk count in
 *                         bits 32..63 and, in bits 0..31, the CRC-32C (zlib
 *                         convention, from 0) of the count and every disk's
 *                         size in bytes, each as a little-endian u64, in
 *                         disk order (cuju_disk_geometry)
 * 2. receiver -> HELLO_REPLY (same 40-byte layout, session_id echoed) with the
 *    last field replaced by
 *        u64 last_applied the epoch the backup's region holds now (0 = none)
 *    or -> ERROR and close, when magic, version, page size, region size or
 *    disks do not match its own (CUJU_E_MAGIC / CUJU_E_VERSION /
 *    CUJU_E_GEOMETRY).
 *    The sender checks the reply the same way.
 *
 * Epoch (sender -> receiver), frame type EPOCH
 * --------------------------------------------
 * The payload is, in this order:
 *     epoch header, 40 bytes:
 *         u64 epoch         > last_applied for the first epoch of a session,
 *                           then exactly previous + 1 (CUJU_E_SEQUENCE)
 *         u64 npages        page records that follow (<= region pages)
 *         u64 ndata         records whose encoding is FULL (<= npages)
 *         u64 devstate_len  bytes of device state (<= CUJU_WIRE_MAX_DEVSTATE)
 *         u64 disk_len      bytes of the disk section (<= CUJU_WIRE_MAX_DISK,
 *                           a multiple of 8; 0 without disks)
 *     page table: npages x u64 records
 *         bits  0..47  page index (< region_size / page_size, CUJU_E_INDEX)
 *         bits 48..55  0
 *         bits 56..63  encoding: 0 = FULL (page_size bytes in page data,
 *                      in table order), 1 = ZERO (the page is all zero
 *                      bytes; no data). Anything else is CUJU_E_FRAME.
 *     page data: ndata x page_size bytes
 *     device state: devstate_len bytes (QEMU's migration stream of devices,
 *                   opaque here; the engine may append a user-pause mark
 *                   after it, devstate.py USER_PAUSE_MARK)
 *     disk section: disk_len bytes, the epoch's writes, write-zeroes and
 *                   trims of every replicated disk, as parts of records laid
 *                   out in diskjournal.h; the receiver checks every record
 *                   against its replica list before committing the epoch
 *     end-of-epoch trailer, 24 bytes:
 *         u64 magic      CUJU_WIRE_END_MAGIC ("CUJU-END")
 *         u64 epoch      the same epoch number again
 *         u64 checksum   CRC-32C (checksum.h) in the low 32 bits, upper 32
 *                        bits zero; seeded with session_id; over every byte
 *                        of the frame from the first byte of the frame header
 *                        up to and including the trailer's epoch field
 *     length = 40 + 8*npages + ndata*page_size + devstate_len + disk_len + 24,
 *     exactly.
 * Records are applied in table order; a page listed twice ends with the later
 * record's content.
 *
 * What the encoder does (sender, cuju_sender_stage)
 * --------------------------------------------------
 * For each dirty page index, in the order given: if the page's first 8 bytes
 * are zero the whole page is tested and, when all zero, sent as a ZERO record
 * (saving page_size bytes, counted in saved_bytes); every other page is copied
 * whole (FULL). Versions 1 and 2 send no sub-page deltas: neither dirty tracker
 * hands the sender the previous content of a page (only the `scan` tracker
 * keeps a shadow), and a delta against content the backup may not hold after
 * a reconnect would corrupt the replica silently. A later version may add a
 * DELTA encoding behind a new wire version; receivers reject unknown
 * encodings.
 *
 * Acknowledgement (receiver -> sender), frame type ACK, payload 8 bytes:
 *     u64 epoch      epochs are acknowledged one by one, in order.
 *
 * Error (either direction), frame type ERROR, payload 8 + n bytes:
 *     u32 code       CUJU_E_* below
 *     u32 n          <= CUJU_WIRE_MAX_ERRMSG
 *     n bytes        UTF-8 text for the log, not NUL-terminated
 * After sending ERROR the sender of it closes the connection.
 *
 * Encryption
 * ----------
 * When the two ends agreed keys (over the TLS peer channel: see aead.h and
 * cuju_libvirt/ft_engine/linkkeys.py), every byte above, HELLO included,
 * travels inside AES-256-GCM records of aead.h; the frames are unchanged. A
 * record that fails authentication ends the connection (CUJU_E_AUTH) before
 * its bytes reach the frame layer, so a tampered epoch is never committed.
 * The CRC stays: it covers what the journal replays after a crash.
 *
 * Close (sender -> receiver), frame type CLOSE, payload 0: orderly end of the
 * session after the last epoch; the receiver finishes applying and returns.
 *
 * Backup: receive, verify, commit, ack, apply (why this order)
 * -----------------------------------------------------------
 * The receiver writes each EPOCH frame, byte for byte, into a slot of its
 * journal (a file mapped MAP_SHARED, two slots), hashing while it receives.
 * When the frame is complete it verifies lengths, the page table (indexes
 * inside the region, encodings, FULL count) and the checksum; a frame failing
 * any check is never applied and ends the connection. Then it COMMITS the
 * epoch by writing the slot's (length, checksum, epoch) into the journal's
 * meta page (epoch last), sends ACK, and hands the slot to the apply thread,
 * which copies pages into the region, applies the disk section to the
 * replica images, writes the device state to "<path>.tmp" and renames it
 * over <path>, and only then records applied_epoch in the meta page. Memory,
 * disks and device state of an epoch are thus acknowledged together (one
 * frame, one commit) and applied together (one replayable slot). The next epoch is received into the other
 * slot meanwhile (pipelined; the receive thread waits for a slot whose epoch
 * is applied).
 *
 * ACK before apply keeps the apply copy off the primary's ack latency; the
 * journal is what makes it safe. A backup that dies between ACK and the end
 * of apply leaves a half-applied region, but the next receiver opened on the
 * same journal (cuju_receiver_open) replays every committed, not yet applied
 * slot in epoch order (after re-checking its checksum) before it answers a
 * handshake, so the region and device-state file are exactly the last
 * committed epoch, which is the last acknowledged one or, if the ACK itself
 * was lost, one the primary shipped but had not yet seen acknowledged (its
 * outputs were still held, so the standby resuming from it is safe). Page
 * records are absolute contents, so replay is idempotent. The journal
 * survives the death of the backup process (page cache); host crash
 * durability needs `durable` (msync + fsync), off by default because the
 * standby's RAM file does not survive a host crash either.
 */
#ifndef CUJU_WIRE_H
#define CUJU_WIRE_H

#include <stdint.h>
#include <string.h>

#include "version.h"

/* "CUJU-FT\0" and "CUJU-END" read as little-endian u64s. */
#define CUJU_WIRE_MAGIC     UINT64_C(0x0054462d554a5543)
#define CUJU_WIRE_END_MAGIC UINT64_C(0x444e452d554a5543)

enum cuju_frame_type {
    CUJU_FRAME_HELLO       = 0x4c4c4548u,   /* "HELL" */
    CUJU_FRAME_HELLO_REPLY = 0x594c5052u,   /* "RPLY" */
    CUJU_FRAME_EPOCH       = 0x48434f50u,   /* "POCH" */
    CUJU_FRAME_ACK         = 0x4b434120u,   /* " ACK" */
    CUJU_FRAME_ERROR       = 0x52525245u,   /* "ERRR" */
    CUJU_FRAME_CLOSE       = 0x45534f43u,   /* "COSE" */
};

enum cuju_page_encoding {
    CUJU_ENC_FULL = 0,
    CUJU_ENC_ZERO = 1,
};

/* Sizes (bytes). */
#define CUJU_FRAME_HDR_LEN    16u
#define CUJU_HELLO_LEN        40u
#define CUJU_EPOCH_HDR_LEN    40u
#define CUJU_TRAILER_LEN      24u
#define CUJU_ACK_LEN          8u

/* Limits on every length field. */
#define CUJU_WIRE_MIN_PAGE       4096u
#define CUJU_WIRE_MAX_PAGE       (2u << 20)
#define CUJU_WIRE_MAX_REGION     (UINT64_C(1) << 42)   /* 4 TiB */
#define CUJU_WIRE_MAX_DEVSTATE   (UINT64_C(256) << 20) /* 256 MiB */
#define CUJU_WIRE_MAX_DISK       (UINT64_C(1) << 30)   /* 1 GiB per epoch */
#define CUJU_WIRE_MAX_ERRMSG     256u
#define CUJU_WIRE_INDEX_MASK     ((UINT64_C(1) << 48) - 1)
#define CUJU_WIRE_RESERVED_MASK  (UINT64_C(0xff) << 48)

/* Error codes: returned by every C function, kept in state structs, carried
 * in ERROR frames. Stable: part of the wire format. */
enum cuju_err {
    CUJU_OK          = 0,
    CUJU_E_IO        = 1,   /* socket or file error; errno kept beside it */
    CUJU_E_EOF       = 2,   /* peer closed the connection mid-session */
    CUJU_E_TIMEOUT   = 3,   /* no progress within the I/O timeout */
    CUJU_E_MAGIC     = 4,   /* wrong magic: not a cuju-libvirt peer */
    CUJU_E_VERSION   = 5,   /* other wire version */
    CUJU_E_GEOMETRY  = 6,   /* page size or region size differ */
    CUJU_E_FRAME     = 7,   /* unknown type, bad flags, length out of limits */
    CUJU_E_INDEX     = 8,   /* page index outside the region */
    CUJU_E_CHECKSUM  = 9,   /* epoch checksum mismatch: corrupted in transit */
    CUJU_E_SEQUENCE  = 10,  /* epoch or ack out of order */
    CUJU_E_PEER      = 11,  /* the peer sent ERROR (its code: peer_error) */
    CUJU_E_APPLY     = 12,  /* writing the region or device-state file failed */
    CUJU_E_JOURNAL   = 13,  /* journal unreadable or its content corrupt */
    CUJU_E_CLOSED    = 14,  /* the object was closed */
    CUJU_E_NOMEM     = 15,
    CUJU_E_ARG       = 16,  /* the caller's arguments are invalid */
    CUJU_E_AUTH      = 17,  /* an encrypted record failed authentication (aead.h) */
    CUJU_E__COUNT
};

const char *cuju_strerror(int code);

static inline void cuju_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void cuju_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t cuju_get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint64_t cuju_get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Bytes of an EPOCH payload with these counts; 0 when it would exceed
 * `max` (or overflow), so callers compare against a computed limit. */
static inline uint64_t cuju_epoch_payload_len(uint64_t npages, uint64_t ndata, uint32_t page_size,
                                              uint64_t devstate_len, uint64_t disk_len)
{
    /* Callers bound npages by region pages (< 2^42 / 4096), devstate_len by
     * CUJU_WIRE_MAX_DEVSTATE and disk_len by CUJU_WIRE_MAX_DISK first, so
     * none of this overflows. */
    return CUJU_EPOCH_HDR_LEN + 8 * npages + ndata * (uint64_t)page_size + devstate_len + disk_len +
           CUJU_TRAILER_LEN;
}

#endif
