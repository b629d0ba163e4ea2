/* The epoch checksum of the wire format (wire.h): CRC-32C.
 *
 * CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78, initial
 * and final XOR 0xFFFFFFFF, as in iSCSI and ext4), seeded by starting from
 * the CRC "value" (uint32)(seed ^ seed >> 32) instead of 0, i.e.
 * checksum = crc32c_update(crc_of_seed, data) in the zlib convention where
 * crc32c_update(0, "123456789") == 0xE3069283. Carried in a u64 field whose
 * upper 32 bits are zero.
 *
 * Why CRC-32C and not a 64-bit hash: the checksum is computed twice per byte
 * replicated (sender, receiver) on hosts that also run the guest, so its cost
 * counts. With SSE4.2 three interleaved streams of the crc32 instruction are
 * combined with a precomputed shift operator (~3x the speed of one stream,
 * ~3x XXH64 here); without SSE4.2 a slicing-by-8 table runs. It detects every
 * burst up to 32 bits and all 1-3 bit errors in an epoch; it is not a MAC.
 */
#ifndef CUJU_CHECKSUM_H
#define CUJU_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

struct cuju_csum {
    uint32_t crc;           /* zlib-convention CRC of what was fed so far */
};

void cuju_csum_init(struct cuju_csum *c, uint64_t seed);
void cuju_csum_update(struct cuju_csum *c, const void *data, size_t len);
uint64_t cuju_csum_final(const struct cuju_csum *c);
uint64_t cuju_csum(const void *data, size_t len, uint64_t seed);

/* Plain CRC-32C in the zlib convention (crc = 0 to start). */
uint32_t cuju_crc32c(uint32_t crc, const void *data, size_t len);

#endif
