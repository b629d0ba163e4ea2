/* CUJU-XXH64 (see checksum.h). Plain C, no Python. */
#include "checksum.h"

#include <string.h>

#define P1 UINT64_C(0x9E3779B185EBCA87)
#define P2 UINT64_C(0xC2B2AE3D27D4EB4F)
#define P3 UINT64_C(0x165667B19E3779F9)
#define P4 UINT64_C(0x85EBCA77C2B2AE63)
#define P5 UINT64_C(0x27D4EB2F165667C5)

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t lane_round(uint64_t acc, uint64_t input)
{
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t merge_round(uint64_t acc, uint64_t val)
{
    acc ^= lane_round(0, val);
    return acc * P1 + P4;
}

void cuju_hash_init(struct cuju_hash *h, uint64_t seed)
{
    memset(h, 0, sizeof(*h));
    h->seed = seed;
    h->v[0] = seed + P1 + P2;
    h->v[1] = seed + P2;
    h->v[2] = seed;
    h->v[3] = seed - P1;
}

/* Consume whole stripes; returns bytes consumed (a multiple of 32). */
static size_t stripes(uint64_t v[4], const uint8_t *p, size_t len)
{
    uint64_t a = v[0], b = v[1], c = v[2], d = v[3];
    size_t n = len & ~(size_t)31;
    for (size_t i = 0; i < n; i += 32) {
        a = lane_round(a, rd64(p + i));
        b = lane_round(b, rd64(p + i + 8));
        c = lane_round(c, rd64(p + i + 16));
        d = lane_round(d, rd64(p + i + 24));
    }
    v[0] = a; v[1] = b; v[2] = c; v[3] = d;
    return n;
}

void cuju_hash_update(struct cuju_hash *h, const void *data, size_t len)
{
    const uint8_t *p = data;
    h->total += len;
    if (h->buffered) {
        size_t take = 32 - h->buffered;
        if (take > len)
            take = len;
        memcpy(h->buf + h->buffered, p, take);
        h->buffered += (uint32_t)take;
        p += take;
        len -= take;
        if (h->buffered < 32)
            return;
        stripes(h->v, h->buf, 32);
        h->buffered = 0;
    }
    size_t done = stripes(h->v, p, len);
    p += done;
    len -= done;
    if (len) {
        memcpy(h->buf, p, len);
        h->buffered = (uint32_t)len;
    }
}

uint64_t cuju_hash_final(const struct cuju_hash *h)
{
    uint64_t acc;
    if (h->total >= 32) {
        acc = rotl64(h->v[0], 1) + rotl64(h->v[1], 7) + rotl64(h->v[2], 12) + rotl64(h->v[3], 18);
        for (int i = 0; i < 4; i++)
            acc = merge_round(acc, h->v[i]);
    } else {
        acc = h->seed + P5;
    }
    acc += h->total;
    const uint8_t *p = h->buf;
    uint32_t len = h->buffered;
    while (len >= 8) {
        acc ^= lane_round(0, rd64(p));
        acc = rotl64(acc, 27) * P1 + P4;
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        acc ^= (uint64_t)rd32(p) * P1;
        acc = rotl64(acc, 23) * P2 + P3;
        p += 4;
        len -= 4;
    }
    while (len) {
        acc ^= (uint64_t)(*p) * P5;
        acc = rotl64(acc, 11) * P1;
        p++;
        len--;
    }
    acc ^= acc >> 33;
    acc *= P2;
    acc ^= acc >> 29;
    acc *= P3;
    acc ^= acc >> 32;
    return acc;
}

uint64_t cuju_hash64(const void *data, size_t len, uint64_t seed)
{
    struct cuju_hash h;
    cuju_hash_init(&h, seed);
    cuju_hash_update(&h, data, len);
    return cuju_hash_final(&h);
}
