/* Page copies that bypass the cache (non-temporal stores), for destinations
 * nobody reads soon: the backup's region (apply) and large staging buffers.
 * A normal store first reads the destination line (read-for-ownership); a
 * streaming store does not, so scattered 4 KiB copies run up to ~2x faster
 * here. Any alignment (an unaligned head and tail are copied normally);
 * memcpy/memset without AVX2 or below 256 bytes.
 * Call cuju_stream_fence() before publishing that the data is in place.
 */
#ifndef CUJU_STREAMCOPY_H
#define CUJU_STREAMCOPY_H

#include <stddef.h>

void cuju_stream_copy(void *dst, const void *src, size_t len);
void cuju_stream_zero(void *dst, size_t len);
void cuju_stream_fence(void);

#endif
