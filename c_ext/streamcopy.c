/* Non-temporal page copies (see streamcopy.h). Plain C, no Python. */
#include "streamcopy.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

static int have_avx2 = -1;      /* benign race: every thread computes the same value */

static int avx2(void)
{
    if (have_avx2 < 0) {
        __builtin_cpu_init();
        have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return have_avx2;
}

__attribute__((target("avx2"))) static void nt_copy(void *dst, const void *src, size_t len)
{
    __m256i *d = dst;
    const __m256i *s = src;
    for (size_t i = 0; i < len / 32; i += 4) {
        __m256i a = _mm256_loadu_si256(s + i), b = _mm256_loadu_si256(s + i + 1);
        __m256i c = _mm256_loadu_si256(s + i + 2), e = _mm256_loadu_si256(s + i + 3);
        _mm256_stream_si256(d + i, a);
        _mm256_stream_si256(d + i + 1, b);
        _mm256_stream_si256(d + i + 2, c);
        _mm256_stream_si256(d + i + 3, e);
    }
}

__attribute__((target("avx2"))) static void nt_zero(void *dst, size_t len)
{
    __m256i *d = dst, z = _mm256_setzero_si256();
    for (size_t i = 0; i < len / 32; i += 4) {
        _mm256_stream_si256(d + i, z);
        _mm256_stream_si256(d + i + 1, z);
        _mm256_stream_si256(d + i + 2, z);
        _mm256_stream_si256(d + i + 3, z);
    }
}

/* Split [dst, dst+len) into an unaligned head, a streamable body (32-byte
 * aligned, a multiple of 128 bytes) and a tail; 0 when not worth it. */
static int split(const void *dst, size_t len, size_t *head, size_t *body)
{
    if (len < 256 || !avx2())
        return 0;
    *head = (32 - ((uintptr_t)dst & 31)) & 31;
    *body = (len - *head) & ~(size_t)127;
    return 1;
}

void cuju_stream_copy(void *dst, const void *src, size_t len)
{
    size_t head, body;
    if (!split(dst, len, &head, &body)) {
        memcpy(dst, src, len);
        return;
    }
    uint8_t *d = dst;
    const uint8_t *s = src;
    memcpy(d, s, head);
    nt_copy(d + head, s + head, body);
    memcpy(d + head + body, s + head + body, len - head - body);
}

void cuju_stream_zero(void *dst, size_t len)
{
    size_t head, body;
    if (!split(dst, len, &head, &body)) {
        memset(dst, 0, len);
        return;
    }
    uint8_t *d = dst;
    memset(d, 0, head);
    nt_zero(d + head, body);
    memset(d + head + body, 0, len - head - body);
}

void cuju_stream_fence(void)
{
    _mm_sfence();
}

#else

void cuju_stream_copy(void *dst, const void *src, size_t len)
{
    memcpy(dst, src, len);
}

void cuju_stream_zero(void *dst, size_t len)
{
    memset(dst, 0, len);
}

void cuju_stream_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

#endif
