/* The FT link's record layer (aead.h): AES-256-GCM records over a socket. */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "aead.h"
#include "replicator.h"

struct cuju_aead {
    pthread_mutex_t lock;       /* tx: held while a record is encrypted and written */
    EVP_CIPHER_CTX *ctx;        /* lock (tx) / the one receiving thread (rx) */
    uint8_t iv[CUJU_AEAD_IV_LEN];   /* immutable */
    uint64_t seq;               /* lock (tx) / receiving thread (rx): next record's number */
    uint8_t *buf;               /* record buffer: header + data + tag */
    size_t have;                /* rx: plaintext bytes in buf not yet handed out */
    size_t off;                 /* rx: where they start (after the header) */
};

static struct cuju_aead *aead_new(const uint8_t *key, const uint8_t *iv, int encrypt)
{
    struct cuju_aead *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->ctx = EVP_CIPHER_CTX_new();
    a->buf = malloc(CUJU_AEAD_HDR_LEN + CUJU_AEAD_MAX_RECORD + CUJU_AEAD_TAG_LEN);
    if (a->ctx == NULL || a->buf == NULL ||
        EVP_CipherInit_ex(a->ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, encrypt) != 1 ||
        EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_GCM_SET_IVLEN, CUJU_AEAD_IV_LEN, NULL) != 1 ||
        EVP_CipherInit_ex(a->ctx, NULL, NULL, key, NULL, encrypt) != 1) {
        EVP_CIPHER_CTX_free(a->ctx);
        free(a->buf);
        free(a);
        return NULL;
    }
    memcpy(a->iv, iv, CUJU_AEAD_IV_LEN);
    pthread_mutex_init(&a->lock, NULL);
    return a;
}

static void aead_free(struct cuju_aead *a)
{
    if (a == NULL)
        return;
    EVP_CIPHER_CTX_free(a->ctx);
    pthread_mutex_destroy(&a->lock);
    free(a->buf);
    free(a);
}

int cuju_link_set_keys(struct cuju_link *l, const uint8_t *keys)
{
    if (l->tx != NULL || l->rx != NULL)
        return CUJU_E_ARG;
    const uint8_t *p = keys;
    struct cuju_aead *tx = aead_new(p, p + CUJU_AEAD_KEY_LEN, 1);
    p += CUJU_AEAD_KEY_LEN + CUJU_AEAD_IV_LEN;
    struct cuju_aead *rx = aead_new(p, p + CUJU_AEAD_KEY_LEN, 0);
    if (tx == NULL || rx == NULL) {
        aead_free(tx);
        aead_free(rx);
        return CUJU_E_NOMEM;
    }
    l->tx = tx;
    l->rx = rx;
    return CUJU_OK;
}

void cuju_link_clear(struct cuju_link *l)
{
    aead_free(l->tx);
    aead_free(l->rx);
    l->tx = l->rx = NULL;
}

int cuju_link_encrypted(const struct cuju_link *l)
{
    return l->tx != NULL;
}

static void nonce_for(const struct cuju_aead *a, uint8_t nonce[CUJU_AEAD_IV_LEN])
{
    memcpy(nonce, a->iv, CUJU_AEAD_IV_LEN);
    for (int i = 0; i < 8; i++)
        nonce[CUJU_AEAD_IV_LEN - 1 - i] ^= (uint8_t)(a->seq >> (8 * i));
}

/* Encrypt one record of n (1..MAX) bytes into a->buf; returns its wire length or 0. */
static size_t seal(struct cuju_aead *a, const uint8_t *src, size_t n)
{
    uint8_t nonce[CUJU_AEAD_IV_LEN];
    int outl = 0, fin = 0;
    if (a->seq == UINT64_MAX)
        return 0;   /* never reached in practice: 2^64 records */
    nonce_for(a, nonce);
    cuju_put_le32(a->buf, (uint32_t)n);
    if (EVP_EncryptInit_ex(a->ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(a->ctx, NULL, &outl, a->buf, CUJU_AEAD_HDR_LEN) != 1 ||
        EVP_EncryptUpdate(a->ctx, a->buf + CUJU_AEAD_HDR_LEN, &outl, src, (int)n) != 1 ||
        EVP_EncryptFinal_ex(a->ctx, a->buf + CUJU_AEAD_HDR_LEN + outl, &fin) != 1 ||
        EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_GCM_GET_TAG, CUJU_AEAD_TAG_LEN,
                            a->buf + CUJU_AEAD_HDR_LEN + n) != 1)
        return 0;
    a->seq++;
    return CUJU_AEAD_HDR_LEN + n + CUJU_AEAD_TAG_LEN;
}

int cuju_link_send(struct cuju_link *l, const void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->tx;
    if (a == NULL)
        return cuju_send_all(l->fd, buf, len, io_timeout_ms, err_errno);
    const uint8_t *p = buf;
    int rc = CUJU_OK;
    pthread_mutex_lock(&a->lock);
    while (len > 0 && rc == CUJU_OK) {
        size_t n = len < CUJU_AEAD_MAX_RECORD ? len : CUJU_AEAD_MAX_RECORD;
        size_t wire = seal(a, p, n);
        if (wire == 0) {
            rc = CUJU_E_AUTH;
            break;
        }
        rc = cuju_send_all(l->fd, a->buf, wire, io_timeout_ms, err_errno);
        p += n;
        len -= n;
    }
    pthread_mutex_unlock(&a->lock);
    return rc;
}

/* Read and open the next record into a->buf. */
static int open_record(struct cuju_link *l, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->rx;
    uint8_t nonce[CUJU_AEAD_IV_LEN];
    int outl = 0, fin = 0;
    int rc = cuju_recv_all(l->fd, a->buf, CUJU_AEAD_HDR_LEN, io_timeout_ms, err_errno);
    if (rc != CUJU_OK)
        return rc;
    uint32_t n = cuju_get_le32(a->buf);
    if (n == 0 || n > CUJU_AEAD_MAX_RECORD)
        return CUJU_E_FRAME;
    rc = cuju_recv_all(l->fd, a->buf + CUJU_AEAD_HDR_LEN, n + CUJU_AEAD_TAG_LEN, io_timeout_ms, err_errno);
    if (rc != CUJU_OK)
        return rc;
    nonce_for(a, nonce);
    uint8_t *data = a->buf + CUJU_AEAD_HDR_LEN;
    if (EVP_DecryptInit_ex(a->ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(a->ctx, NULL, &outl, a->buf, CUJU_AEAD_HDR_LEN) != 1 ||
        EVP_DecryptUpdate(a->ctx, data, &outl, data, (int)n) != 1 ||
        EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_GCM_SET_TAG, CUJU_AEAD_TAG_LEN, data + n) != 1 ||
        EVP_DecryptFinal_ex(a->ctx, data + outl, &fin) != 1)
        return CUJU_E_AUTH;     /* the plaintext in buf is discarded: have stays 0 */
    a->seq++;
    a->off = CUJU_AEAD_HDR_LEN;
    a->have = n;
    return CUJU_OK;
}

int cuju_link_recv(struct cuju_link *l, void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->rx;
    if (a == NULL)
        return cuju_recv_all(l->fd, buf, len, io_timeout_ms, err_errno);
    uint8_t *p = buf;
    while (len > 0) {
        if (a->have == 0) {
            int rc = open_record(l, io_timeout_ms, err_errno);
            if (rc != CUJU_OK)
                return rc;
        }
        size_t n = len < a->have ? len : a->have;
        memcpy(p, a->buf + a->off, n);
        p += n;
        len -= n;
        a->off += n;
        a->have -= n;
    }
    return CUJU_OK;
}

void cuju_link_send_error(struct cuju_link *l, int code, const char *msg)
{
    uint8_t f[CUJU_FRAME_HDR_LEN + 8 + CUJU_WIRE_MAX_ERRMSG];
    size_t n = cuju_error_frame(f, code, msg);
    int e = 0;
    (void)cuju_link_send(l, f, n, 200, &e);
}
