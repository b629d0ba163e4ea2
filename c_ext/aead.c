/* The FT link's record layer (aead.h): AES-256-GCM records over a socket,
 * sealed and opened by a small pool of threads when a call spans records. */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aead.h"
#include "replicator.h"

#define WIRE_MAX (CUJU_AEAD_HDR_LEN + CUJU_AEAD_MAX_RECORD + CUJU_AEAD_TAG_LEN)

/* One record for a crypto thread: header (the AAD), data from src into dst
 * (dst == src for an in-place open), tag. */
struct job {
    uint8_t hdr[CUJU_AEAD_HDR_LEN];
    uint8_t tag[CUJU_AEAD_TAG_LEN];
    const uint8_t *src;
    uint8_t *dst;
    size_t n;
    uint64_t seq;
    int ok;         /* pool lock: set with done */
    int done;       /* pool lock */
};

/* The crypto threads of one direction, started at its first multi-record
 * call. A batch of up to CUJU_AEAD_BATCH jobs is published by the calling
 * thread (the one holding the direction), taken in order by the workers, and
 * waited for by the caller, who writes sealed records in seq order or returns
 * only when every opened record of its call has been checked. */
struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work;        /* a job was published, or stop */
    pthread_cond_t done;        /* a job finished */
    struct job jobs[CUJU_AEAD_BATCH];
    int njobs, next;            /* lock: published, taken */
    int stop;                   /* lock */
    int nthreads;
    pthread_t th[CUJU_AEAD_WORKERS];
    EVP_CIPHER_CTX *ctx[CUJU_AEAD_WORKERS];     /* one per worker */
    uint8_t *slot[CUJU_AEAD_BATCH];             /* tx: sealed records, WIRE_MAX each */
};

struct cuju_aead {
    pthread_mutex_t lock;       /* tx: held while records are sealed and written */
    EVP_CIPHER_CTX *ctx;        /* lock (tx) / the one receiving thread (rx) */
    int encrypt;
    uint8_t key[CUJU_AEAD_KEY_LEN];   /* immutable: for the pool's contexts */
    uint8_t iv[CUJU_AEAD_IV_LEN];     /* immutable */
    uint64_t seq;               /* lock (tx) / receiving thread (rx): next record's number */
    uint8_t *buf;               /* record buffer: header + data + tag */
    size_t have;                /* rx: plaintext bytes in buf not yet handed out */
    size_t off;                 /* rx: where they start (after the header) */
    struct pool *pool;          /* NULL until needed; owned like ctx */
};

static EVP_CIPHER_CTX *ctx_new(const uint8_t *key, int encrypt)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c != NULL && (EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL, encrypt) != 1 ||
                      EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, CUJU_AEAD_IV_LEN, NULL) != 1 ||
                      EVP_CipherInit_ex(c, NULL, NULL, key, NULL, encrypt) != 1)) {
        EVP_CIPHER_CTX_free(c);
        c = NULL;
    }
    return c;
}

static struct cuju_aead *aead_new(const uint8_t *key, const uint8_t *iv, int encrypt)
{
    struct cuju_aead *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->ctx = ctx_new(key, encrypt);
    a->buf = malloc(WIRE_MAX);
    if (a->ctx == NULL || a->buf == NULL) {
        EVP_CIPHER_CTX_free(a->ctx);
        free(a->buf);
        free(a);
        return NULL;
    }
    a->encrypt = encrypt;
    memcpy(a->key, key, CUJU_AEAD_KEY_LEN);
    memcpy(a->iv, iv, CUJU_AEAD_IV_LEN);
    pthread_mutex_init(&a->lock, NULL);
    return a;
}

static void nonce_for(const struct cuju_aead *a, uint64_t seq, uint8_t nonce[CUJU_AEAD_IV_LEN])
{
    memcpy(nonce, a->iv, CUJU_AEAD_IV_LEN);
    for (int i = 0; i < 8; i++)
        nonce[CUJU_AEAD_IV_LEN - 1 - i] ^= (uint8_t)(seq >> (8 * i));
}

/* Seal or open one record with ctx; 1 when it is good. An open writes its
 * plaintext into dst before the tag is checked: the callers discard it. */
static int crypt_record(const struct cuju_aead *a, EVP_CIPHER_CTX *ctx, struct job *j)
{
    uint8_t nonce[CUJU_AEAD_IV_LEN];
    int outl = 0, fin = 0;
    nonce_for(a, j->seq, nonce);
    if (a->encrypt)
        return EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1 &&
               EVP_EncryptUpdate(ctx, NULL, &outl, j->hdr, CUJU_AEAD_HDR_LEN) == 1 &&
               EVP_EncryptUpdate(ctx, j->dst, &outl, j->src, (int)j->n) == 1 &&
               EVP_EncryptFinal_ex(ctx, j->dst + outl, &fin) == 1 &&
               EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, CUJU_AEAD_TAG_LEN, j->tag) == 1;
    return EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1 &&
           EVP_DecryptUpdate(ctx, NULL, &outl, j->hdr, CUJU_AEAD_HDR_LEN) == 1 &&
           EVP_DecryptUpdate(ctx, j->dst, &outl, j->src, (int)j->n) == 1 &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CUJU_AEAD_TAG_LEN, j->tag) == 1 &&
           EVP_DecryptFinal_ex(ctx, j->dst + outl, &fin) == 1;
}

struct worker_arg {
    struct cuju_aead *a;
    int idx;
};

static void *worker_main(void *arg)
{
    struct cuju_aead *a = ((struct worker_arg *)arg)->a;
    int idx = ((struct worker_arg *)arg)->idx;
    free(arg);
    struct pool *p = a->pool;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && p->next >= p->njobs)
            pthread_cond_wait(&p->work, &p->lock);
        if (p->stop)
            break;
        struct job *j = &p->jobs[p->next++];
        pthread_mutex_unlock(&p->lock);
        int ok = crypt_record(a, p->ctx[idx], j);
        pthread_mutex_lock(&p->lock);
        j->ok = ok;
        j->done = 1;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void pool_free(struct pool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->th[i], NULL);
    for (int i = 0; i < CUJU_AEAD_WORKERS; i++)
        EVP_CIPHER_CTX_free(p->ctx[i]);
    for (int i = 0; i < CUJU_AEAD_BATCH; i++)
        free(p->slot[i]);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* -1: decide from the host's cores at the first pool start (aead.h). */
static int workers_setting = -1;

void cuju_aead_set_workers(int n)
{
    __atomic_store_n(&workers_setting, n < 0 ? -1 : n > CUJU_AEAD_WORKERS ? CUJU_AEAD_WORKERS : n,
                     __ATOMIC_RELAXED);
}

static int workers(void)
{
    int n = __atomic_load_n(&workers_setting, __ATOMIC_RELAXED);
    if (n >= 0)
        return n;
    return sysconf(_SC_NPROCESSORS_ONLN) >= CUJU_AEAD_POOL_MIN_CPUS ? CUJU_AEAD_WORKERS : 0;
}

/* Start a's pool; 0 when it cannot or should not (the caller then works
 * alone, sealing or opening each record itself). */
static int pool_start(struct cuju_aead *a)
{
    int nw = workers();
    if (nw == 0)
        return 0;
    struct pool *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return 0;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    int ok = 1;
    for (int i = 0; i < CUJU_AEAD_WORKERS && ok; i++)
        ok = (p->ctx[i] = ctx_new(a->key, a->encrypt)) != NULL;
    for (int i = 0; i < CUJU_AEAD_BATCH && ok && a->encrypt; i++)
        ok = (p->slot[i] = malloc(WIRE_MAX)) != NULL;
    a->pool = p;
    for (int i = 0; i < nw && ok; i++) {
        struct worker_arg *w = malloc(sizeof(*w));
        ok = w != NULL;
        if (ok) {
            *w = (struct worker_arg){.a = a, .idx = i};
            ok = pthread_create(&p->th[i], NULL, worker_main, w) == 0;
            if (!ok)
                free(w);
            else
                p->nthreads++;
        }
    }
    if (!ok) {
        a->pool = NULL;
        pool_free(p);
    }
    return ok;
}

static void aead_free(struct cuju_aead *a)
{
    if (a == NULL)
        return;
    pool_free(a->pool);
    EVP_CIPHER_CTX_free(a->ctx);
    pthread_mutex_destroy(&a->lock);
    OPENSSL_cleanse(a->key, sizeof(a->key));
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

/* Publish a job (its seq is the direction's next number). */
static void publish(struct pool *p, const struct job *j)
{
    pthread_mutex_lock(&p->lock);
    p->jobs[p->njobs] = *j;
    p->njobs++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
}

static int wait_job(struct pool *p, int k)
{
    pthread_mutex_lock(&p->lock);
    while (!p->jobs[k].done)
        pthread_cond_wait(&p->done, &p->lock);
    int ok = p->jobs[k].ok;
    pthread_mutex_unlock(&p->lock);
    return ok;
}

/* Every published job done; the batch is emptied. 1 when all were good. */
static int drain(struct pool *p)
{
    int ok = 1;
    for (int k = 0; k < p->njobs; k++)
        ok &= wait_job(p, k);
    pthread_mutex_lock(&p->lock);
    p->njobs = p->next = 0;
    pthread_mutex_unlock(&p->lock);
    return ok;
}

static void job_for(struct cuju_aead *a, struct job *j, const uint8_t *src, uint8_t *dst, size_t n)
{
    memset(j, 0, sizeof(*j));
    cuju_put_le32(j->hdr, (uint32_t)n);
    j->src = src;
    j->dst = dst;
    j->n = n;
    j->seq = a->seq++;
}

/* Serial: one record sealed by the caller into a->buf and written. */
static int send_one(struct cuju_link *l, const uint8_t *src, size_t n, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->tx;
    struct job j;
    job_for(a, &j, src, a->buf + CUJU_AEAD_HDR_LEN, n);
    if (!crypt_record(a, a->ctx, &j))
        return CUJU_E_AUTH;
    memcpy(a->buf, j.hdr, CUJU_AEAD_HDR_LEN);
    memcpy(a->buf + CUJU_AEAD_HDR_LEN + n, j.tag, CUJU_AEAD_TAG_LEN);
    return cuju_send_all(l->fd, a->buf, CUJU_AEAD_HDR_LEN + n + CUJU_AEAD_TAG_LEN, io_timeout_ms, err_errno);
}

/* Parallel: up to a batch of records sealed by the pool into its slots and
 * written in seq order as each is ready. */
static int send_batch(struct cuju_link *l, const uint8_t *src, size_t len, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->tx;
    struct pool *p = a->pool;
    int count = 0;
    for (size_t off = 0; off < len && count < CUJU_AEAD_BATCH; count++) {
        size_t n = len - off < CUJU_AEAD_MAX_RECORD ? len - off : CUJU_AEAD_MAX_RECORD;
        struct job j;
        job_for(a, &j, src + off, p->slot[count] + CUJU_AEAD_HDR_LEN, n);
        publish(p, &j);
        off += n;
    }
    int rc = CUJU_OK;
    for (int k = 0; k < count && rc == CUJU_OK; k++) {
        if (!wait_job(p, k)) {
            rc = CUJU_E_AUTH;
            break;
        }
        struct job *j = &p->jobs[k];    /* done: the workers no longer touch it */
        memcpy(p->slot[k], j->hdr, CUJU_AEAD_HDR_LEN);
        memcpy(p->slot[k] + CUJU_AEAD_HDR_LEN + j->n, j->tag, CUJU_AEAD_TAG_LEN);
        rc = cuju_send_all(l->fd, p->slot[k], CUJU_AEAD_HDR_LEN + j->n + CUJU_AEAD_TAG_LEN, io_timeout_ms,
                           err_errno);
    }
    drain(p);
    return rc;
}

int cuju_link_send(struct cuju_link *l, const void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->tx;
    if (a == NULL)
        return cuju_send_all(l->fd, buf, len, io_timeout_ms, err_errno);
    const uint8_t *p = buf;
    int rc = CUJU_OK;
    pthread_mutex_lock(&a->lock);
    if (len > CUJU_AEAD_MAX_RECORD && a->pool == NULL)
        (void)pool_start(a);
    while (len > 0 && rc == CUJU_OK) {
        if (a->seq > UINT64_MAX - CUJU_AEAD_BATCH) {
            rc = CUJU_E_AUTH;   /* never reached in practice: 2^64 records */
            break;
        }
        size_t n;
        if (len > CUJU_AEAD_MAX_RECORD && a->pool != NULL) {
            n = len < (size_t)CUJU_AEAD_BATCH * CUJU_AEAD_MAX_RECORD ? len
                                                                     : (size_t)CUJU_AEAD_BATCH * CUJU_AEAD_MAX_RECORD;
            rc = send_batch(l, p, n, io_timeout_ms, err_errno);
        } else {
            n = len < CUJU_AEAD_MAX_RECORD ? len : CUJU_AEAD_MAX_RECORD;
            rc = send_one(l, p, n, io_timeout_ms, err_errno);
        }
        p += n;
        len -= n;
    }
    pthread_mutex_unlock(&a->lock);
    return rc;
}

/* Read the next record's header; its length in *n. */
static int read_header(struct cuju_link *l, uint8_t hdr[CUJU_AEAD_HDR_LEN], uint32_t *n, int io_timeout_ms,
                       int *err_errno)
{
    int rc = cuju_recv_all(l->fd, hdr, CUJU_AEAD_HDR_LEN, io_timeout_ms, err_errno);
    if (rc != CUJU_OK)
        return rc;
    *n = cuju_get_le32(hdr);
    return *n == 0 || *n > CUJU_AEAD_MAX_RECORD ? CUJU_E_FRAME : CUJU_OK;
}

/* Read the rest of a record (ciphertext into dst, tag) and open it: in the
 * pool when there is one (the caller checks it at drain), else here. */
static int take_record(struct cuju_link *l, struct job *j, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->rx;
    int rc = cuju_recv_all(l->fd, j->dst, j->n, io_timeout_ms, err_errno);
    if (rc == CUJU_OK)
        rc = cuju_recv_all(l->fd, j->tag, CUJU_AEAD_TAG_LEN, io_timeout_ms, err_errno);
    if (rc != CUJU_OK)
        return rc;
    if (a->pool != NULL) {
        publish(a->pool, j);
        return CUJU_OK;
    }
    return crypt_record(a, a->ctx, j) ? CUJU_OK : CUJU_E_AUTH;
}

int cuju_link_recv(struct cuju_link *l, void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    struct cuju_aead *a = l->rx;
    if (a == NULL)
        return cuju_recv_all(l->fd, buf, len, io_timeout_ms, err_errno);
    uint8_t *p = buf, *start = buf;
    size_t total = len;
    int rc = CUJU_OK;
    if (len > CUJU_AEAD_MAX_RECORD && a->pool == NULL)
        (void)pool_start(a);
    while (len > 0 && rc == CUJU_OK) {
        if (a->have > 0) {
            size_t n = len < a->have ? len : a->have;
            memcpy(p, a->buf + a->off, n);
            p += n;
            len -= n;
            a->off += n;
            a->have -= n;
            continue;
        }
        if (a->seq == UINT64_MAX) {
            rc = CUJU_E_AUTH;
            break;
        }
        uint8_t hdr[CUJU_AEAD_HDR_LEN];
        uint32_t n = 0;
        rc = read_header(l, hdr, &n, io_timeout_ms, err_errno);
        if (rc != CUJU_OK)
            break;
        struct job j;
        if (n <= len) {
            /* The whole record belongs to this call: straight into the
             * destination, opened in place. */
            if (a->pool != NULL && a->pool->njobs == CUJU_AEAD_BATCH && !drain(a->pool)) {
                rc = CUJU_E_AUTH;
                break;
            }
            job_for(a, &j, p, p, n);
            rc = take_record(l, &j, io_timeout_ms, err_errno);
            p += n;
            len -= n;
        } else {
            /* Part of it is for a later call: into a->buf, opened here. */
            job_for(a, &j, a->buf + CUJU_AEAD_HDR_LEN, a->buf + CUJU_AEAD_HDR_LEN, n);
            rc = cuju_recv_all(l->fd, j.dst, n, io_timeout_ms, err_errno);
            if (rc == CUJU_OK)
                rc = cuju_recv_all(l->fd, j.tag, CUJU_AEAD_TAG_LEN, io_timeout_ms, err_errno);
            if (rc == CUJU_OK && !crypt_record(a, a->ctx, &j))
                rc = CUJU_E_AUTH;   /* the plaintext in buf is discarded: have stays 0 */
            if (rc == CUJU_OK) {
                a->off = CUJU_AEAD_HDR_LEN;
                a->have = n;
            }
        }
    }
    if (a->pool != NULL && !drain(a->pool) && rc == CUJU_OK)
        rc = CUJU_E_AUTH;
    if (rc != CUJU_OK)
        memset(start, 0, total);    /* nothing unauthenticated is left for the caller */
    return rc;
}

void cuju_link_send_error(struct cuju_link *l, int code, const char *msg)
{
    uint8_t f[CUJU_FRAME_HDR_LEN + 8 + CUJU_WIRE_MAX_ERRMSG];
    size_t n = cuju_error_frame(f, code, msg);
    int e = 0;
    (void)cuju_link_send(l, f, n, 200, &e);
}
