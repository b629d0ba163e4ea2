/* CUJU-XXH64: the 64-bit epoch checksum of the wire format (wire.h).
 *
 * The algorithm is XXH64 as published by Yann Collet (four 64-bit lanes of
 * multiply-rotate-multiply over 32-byte stripes, then a merge, the tail and an
 * avalanche), implemented here from the specification, streaming, with the
 * input read as little-endian 64/32-bit words. It detects corruption in
 * transit and in the journal; it is not a MAC (the FT link's authenticity is
 * the control channel's job).
 */
#ifndef CUJU_CHECKSUM_H
#define CUJU_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

struct cuju_hash {
    uint64_t v[4];          /* lane accumulators */
    uint64_t seed;
    uint64_t total;         /* bytes fed so far */
    uint8_t buf[32];        /* a partial stripe */
    uint32_t buffered;      /* bytes in buf */
};

void cuju_hash_init(struct cuju_hash *h, uint64_t seed);
void cuju_hash_update(struct cuju_hash *h, const void *data, size_t len);
uint64_t cuju_hash_final(const struct cuju_hash *h);
uint64_t cuju_hash64(const void *data, size_t len, uint64_t seed);

#endif
