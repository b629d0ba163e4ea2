/* CRC-32C for the wire checksum (see checksum.h). Plain C, no Python. */
#include "checksum.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82f63b78u        /* CRC-32C, reflected */
#define LONG_BLK 8192u          /* 3-way interleave block sizes (powers of two) */
#define SHORT_BLK 256u

static uint32_t sw_table[8][256];       /* slicing-by-8 */
static uint32_t shift_long[4][256];     /* advance a CRC register over LONG_BLK zero bytes */
static uint32_t shift_short[4][256];    /* ... over SHORT_BLK zero bytes */
static int have_sse42;
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

/* ---- GF(2) operators that advance a CRC register over runs of zeros ---- */

static uint32_t gf2_times(const uint32_t mat[32], uint32_t vec)
{
    uint32_t sum = 0;
    for (int i = 0; vec; i++, vec >>= 1)
        if (vec & 1)
            sum ^= mat[i];
    return sum;
}

static void gf2_square(uint32_t out[32], const uint32_t mat[32])
{
    for (int i = 0; i < 32; i++)
        out[i] = gf2_times(mat, mat[i]);
}

/* The operator for `bytes` zero bytes (a power of two): start from one zero
 * bit and square (double) it 3 + log2(bytes) times. */
static void zeros_operator(uint32_t op[32], size_t bytes)
{
    uint32_t a[32], b[32];
    a[0] = POLY;
    for (int i = 1; i < 32; i++)
        a[i] = 1u << (i - 1);
    size_t doublings = 3;
    while (bytes > 1) {
        bytes >>= 1;
        doublings++;
    }
    uint32_t *cur = a, *next = b;
    for (size_t d = 0; d < doublings; d++) {
        gf2_square(next, cur);
        uint32_t *t = cur;
        cur = next;
        next = t;
    }
    memcpy(op, cur, sizeof(a));
}

static void shift_table(uint32_t tab[4][256], size_t bytes)
{
    uint32_t op[32];
    zeros_operator(op, bytes);
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 0; k < 4; k++)
            tab[k][n] = gf2_times(op, n << (8 * k));
}

static inline uint32_t shift_crc(uint32_t tab[4][256], uint32_t crc)
{
    return tab[0][crc & 0xff] ^ tab[1][(crc >> 8) & 0xff] ^ tab[2][(crc >> 16) & 0xff] ^ tab[3][crc >> 24];
}

static void init_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        sw_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            sw_table[k][n] = (sw_table[k - 1][n] >> 8) ^ sw_table[0][sw_table[k - 1][n] & 0xff];
    shift_table(shift_long, LONG_BLK);
    shift_table(shift_short, SHORT_BLK);
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

/* ---- software: slicing-by-8 (on the inverted register) ---- */

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ sw_table[0][(crc ^ *p++) & 0xff];
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = sw_table[7][w & 0xff] ^ sw_table[6][(w >> 8) & 0xff] ^ sw_table[5][(w >> 16) & 0xff] ^
              sw_table[4][(w >> 24) & 0xff] ^ sw_table[3][(w >> 32) & 0xff] ^ sw_table[2][(w >> 40) & 0xff] ^
              sw_table[1][(w >> 48) & 0xff] ^ sw_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ sw_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

/* ---- SSE4.2: three independent streams, combined by shifting ---- */

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c0 = crc;
    while (len && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    for (size_t blk = LONG_BLK; blk >= SHORT_BLK; blk = blk == LONG_BLK ? SHORT_BLK : 0) {
        uint32_t (*tab)[256] = blk == LONG_BLK ? shift_long : shift_short;
        while (len >= 3 * blk) {
            uint64_t c1 = 0, c2 = 0;
            const uint8_t *end = p + blk;
            do {
                uint64_t w0, w1, w2;
                memcpy(&w0, p, 8);
                memcpy(&w1, p + blk, 8);
                memcpy(&w2, p + 2 * blk, 8);
                c0 = _mm_crc32_u64(c0, w0);
                c1 = _mm_crc32_u64(c1, w1);
                c2 = _mm_crc32_u64(c2, w2);
                p += 8;
            } while (p < end);
            c0 = shift_crc(tab, (uint32_t)c0) ^ (uint32_t)c1;
            c0 = shift_crc(tab, (uint32_t)c0) ^ (uint32_t)c2;
            p += 2 * blk;
            len -= 3 * blk;
        }
        if (blk == SHORT_BLK)
            break;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c0 = _mm_crc32_u64(c0, w);
        p += 8;
        len -= 8;
    }
    while (len--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return (uint32_t)c0;
}
#endif

uint32_t cuju_crc32c(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&tables_once, init_tables);
    crc = ~crc;
#if defined(__x86_64__)
    if (have_sse42)
        return ~crc_hw(crc, data, len);
#endif
    return ~crc_sw(crc, data, len);
}

void cuju_csum_init(struct cuju_csum *c, uint64_t seed)
{
    c->crc = (uint32_t)(seed ^ (seed >> 32));
}

void cuju_csum_update(struct cuju_csum *c, const void *data, size_t len)
{
    c->crc = cuju_crc32c(c->crc, data, len);
}

uint64_t cuju_csum_final(const struct cuju_csum *c)
{
    return c->crc;
}

uint64_t cuju_csum(const void *data, size_t len, uint64_t seed)
{
    struct cuju_csum c;
    cuju_csum_init(&c, seed);
    cuju_csum_update(&c, data, len);
    return cuju_csum_final(&c);
}
