/* Socket I/O shared by sender and receiver: exact reads and writes with a
 * progress timeout, socket tuning, frame headers, error frames. Plain C. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "checksum.h"
#include "replicator.h"

static const char *const errnames[CUJU_E__COUNT] = {
    [CUJU_OK] = "ok",
    [CUJU_E_IO] = "I/O error",
    [CUJU_E_EOF] = "peer closed the connection",
    [CUJU_E_TIMEOUT] = "timed out",
    [CUJU_E_MAGIC] = "wrong magic (not a cuju-libvirt FT link peer)",
    [CUJU_E_VERSION] = "wire version mismatch",
    [CUJU_E_GEOMETRY] = "page size or region size mismatch",
    [CUJU_E_FRAME] = "malformed frame",
    [CUJU_E_INDEX] = "page index outside the region",
    [CUJU_E_CHECKSUM] = "epoch checksum mismatch",
    [CUJU_E_SEQUENCE] = "epoch out of sequence",
    [CUJU_E_PEER] = "peer reported an error",
    [CUJU_E_APPLY] = "applying the epoch failed",
    [CUJU_E_JOURNAL] = "journal corrupt or unusable",
    [CUJU_E_CLOSED] = "closed",
    [CUJU_E_NOMEM] = "out of memory",
    [CUJU_E_ARG] = "invalid argument",
    [CUJU_E_AUTH] = "FT link record failed authentication (tampered, replayed, reordered or not from our peer)",
};

const char *cuju_strerror(int code)
{
    if (code < 0 || code >= CUJU_E__COUNT || errnames[code] == NULL)
        return "unknown error";
    return errnames[code];
}

uint64_t cuju_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int wait_fd(int fd, short events, int io_timeout_ms, int *err_errno)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int rc = poll(&p, 1, io_timeout_ms > 0 ? io_timeout_ms : -1);
        if (rc > 0)
            return CUJU_OK;     /* ready, or an error the next call reports */
        if (rc == 0)
            return CUJU_E_TIMEOUT;
        if (errno != EINTR) {
            *err_errno = errno;
            return CUJU_E_IO;
        }
    }
}

int cuju_send_all(int fd, const void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int rc = wait_fd(fd, POLLOUT, io_timeout_ms, err_errno);
            if (rc != CUJU_OK)
                return rc;
            continue;
        }
        *err_errno = n < 0 ? errno : EPIPE;
        return (n < 0 && (errno == EPIPE || errno == ECONNRESET)) ? CUJU_E_EOF : CUJU_E_IO;
    }
    return CUJU_OK;
}

int cuju_recv_all(int fd, void *buf, size_t len, int io_timeout_ms, int *err_errno)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0)
            return CUJU_E_EOF;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int rc = wait_fd(fd, POLLIN, io_timeout_ms, err_errno);
            if (rc != CUJU_OK)
                return rc;
            continue;
        }
        *err_errno = errno;
        return errno == ECONNRESET ? CUJU_E_EOF : CUJU_E_IO;
    }
    return CUJU_OK;
}

void cuju_tune_socket(int fd)
{
    int one = 1;
    /* ACKs and trailers are small and latency-bound; epochs are written in
     * large chunks, so Nagle buys nothing here. Not a TCP socket (tests may
     * use a socketpair): the calls fail harmlessly. */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

void cuju_frame_header(uint8_t *p, uint32_t type, uint64_t length)
{
    cuju_put_le32(p, type);
    cuju_put_le32(p + 4, 0);
    cuju_put_le64(p + 8, length);
}

size_t cuju_error_frame(uint8_t *f, int code, const char *msg)
{
    size_t n = msg ? strlen(msg) : 0;
    if (n > CUJU_WIRE_MAX_ERRMSG)
        n = CUJU_WIRE_MAX_ERRMSG;
    cuju_frame_header(f, CUJU_FRAME_ERROR, 8 + n);
    cuju_put_le32(f + 16, (uint32_t)code);
    cuju_put_le32(f + 20, (uint32_t)n);
    if (n)
        memcpy(f + 24, msg, n);
    return 24 + n;
}

uint64_t cuju_disk_geometry(unsigned n, const uint64_t *sizes)
{
    if (n == 0)
        return 0;
    uint8_t b[8];
    cuju_put_le64(b, n);
    uint32_t crc = cuju_crc32c(0, b, 8);
    for (unsigned i = 0; i < n; i++) {
        cuju_put_le64(b, sizes[i]);
        crc = cuju_crc32c(crc, b, 8);
    }
    return ((uint64_t)n << 32) | crc;
}
