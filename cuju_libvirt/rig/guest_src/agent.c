/*
 * cuju-agent: the workload inside the Linux test guest of cuju-libvirt.
 *
 * One static binary, run by the initramfs' /init as `agent MODE`.  Every
 * parameter is a `cuju.KEY=VALUE` word, looked up first in argv (so the agent
 * can also run on the host, e.g. `agent udp cuju.peer=127.0.0.1:9000`) and
 * then on the kernel command line (/proc/cmdline).  Everything it reports is
 * one line on stdout, which /init points at the serial console (ttyS0); each
 * line starts with `cuju-MODE:` followed by KEY=VALUE words.
 *
 * Modes
 *   count     counter every cuju.interval_ms (100):  "cuju-count: n=N"
 *   udp       numbered UDP datagrams to cuju.peer=ADDR:PORT at cuju.pps (200)
 *             per second, and, with cuju.tcp=ADDR:PORT, one TCP connection
 *             carrying consecutive 64-bit big-endian counters (cuju.tcp_batch
 *             (8) counters per datagram).  The connection is made once and
 *             never re-made: if it breaks, the agent says so and goes on with
 *             UDP only.  Progress every cuju.report_ms (1000).
 *   echo      UDP echo responder on cuju.port (7); progress every report_ms.
 *   stress    writes over cuju.stress_mb (64) MiB of anonymous memory, one
 *             word per 4 KiB page per pass (cuju.stress_fill=1: every byte),
 *             and reports pages/s and MB/s every report_ms.
 *   cpu       compute-bound loop (xorshift rounds in registers, a few stack pages
 *             written): "cuju-cpu: iters=N" (cumulative, in units of 2^16
 *             rounds) every report_ms.
 *   service   TCP request/response server on cuju.port (7070): per connection,
 *             reads requests of cuju.req_bytes (64) bytes and answers each with
 *             the same bytes, byte 0 incremented; "cuju-service: listening
 *             port=P", then served=N every report_ms.
 *   pattern   fills cuju.pattern_mb (8) MiB of anonymous memory with the 16-byte
 *             cuju.marker (32 hex digits, required) repeated, says "cuju-pattern:
 *             filled mb=N", then rewrites cuju.pattern_pages (64) of those pages
 *             with the same bytes every cuju.interval_ms (100), round robin, so that
 *             the marker is in every few epochs too (what an eavesdropper on the
 *             FT link must not read); "cuju-pattern: rewrites=N" every report_ms.
 *             The marker's binary form exists only in this RAM: the kernel
 *             command line carries its hex digits.
 *   balloon   idles and reports MemTotal/MemFree every report_ms, so that a
 *             host inflating the virtio balloon can see the guest shrink.
 *   diskread  reads cuju.disk (/dev/vda) over and over into cuju.bufs (8)
 *             rotating buffers of cuju.bufsize (262144) bytes, alternating
 *             O_DIRECT and buffered passes (cuju.diskmode=direct|buffered|both)
 *             so that the virtio-blk device DMAs into guest RAM.  When the
 *             disk's blocks carry the test pattern (each 4 KiB block starts
 *             with "CUJUBLK\0" and its block index, u64 little-endian) every
 *             block is verified.
 *   fsrec     mounts cuju.disk (/dev/vda, ext4) on /mnt and appends numbered
 *             64-byte records to /mnt/records every cuju.rec_ms (5): write,
 *             fsync, and only then datagram number n (the UDP format below)
 *             to cuju.peer.  With each record it also overwrites one 4 KiB
 *             block of /mnt/blocks (cuju.blocks (64) blocks, O_DIRECT) and
 *             keeps the block's checksum in RAM.  Commands by UDP datagram to
 *             cuju.port (7001), each answered to its sender with one line:
 *             "verify" (stop writing; read both files with O_DIRECT, compare
 *             the records with their numbers and the blocks with the checksums
 *             in RAM), "trim" (unlink /mnt/filler if there is one, sync, and
 *             FITRIM the whole file system, as fstrim does: the blocks ext4
 *             no longer uses are discarded; the records go on) and "halt"
 *             (close, unmount, sync, power off: a machine without ACPI
 *             halts, "reboot: System halted" on the console).
 *             Record n: "rec %012llu %016llx" (n, mix64(n)), blank-padded,
 *             ending in a newline.
 *
 * UDP datagram (32 bytes, all integers big-endian):
 *   0  char[4] "CUJU"
 *   4  u8      version (1)
 *   5  u8[3]   zero
 *   8  u64     sequence number, 0, 1, 2, ... (never repeats in one boot)
 *   16 u64     guest CLOCK_MONOTONIC in nanoseconds when sent
 *   24 u64     TCP counters handed to the kernel so far
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define DGRAM_LEN 32
#define BLOCK_MAGIC "CUJUBLK"

static int g_argc;
static char **g_argv;
static char g_cmdline[8192];

static void load_cmdline(void)
{
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, g_cmdline, sizeof(g_cmdline) - 1);
    close(fd);
    if (n > 0)
        g_cmdline[n] = '\0';
}

/* Value of cuju.KEY from argv, else from the kernel command line, else NULL.
 * The result is the caller's to keep (parameters are read a handful of times). */
static const char *param(const char *key)
{
    char prefix[128];
    size_t plen = (size_t)snprintf(prefix, sizeof(prefix), "cuju.%s=", key);

    for (int i = 2; i < g_argc; i++)
        if (strncmp(g_argv[i], prefix, plen) == 0)
            return g_argv[i] + plen;
    for (const char *p = g_cmdline; *p;) {
        while (*p == ' ' || *p == '\n')
            p++;
        const char *end = p;
        while (*end && *end != ' ' && *end != '\n')
            end++;
        if ((size_t)(end - p) >= plen && strncmp(p, prefix, plen) == 0)
            return strndup(p + plen, (size_t)(end - p) - plen);
        p = end;
    }
    return NULL;
}

static long param_long(const char *key, long dflt, long min, long max)
{
    const char *v = param(key);
    if (!v)
        return dflt;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < min || x > max) {
        printf("cuju-agent: error=bad-parameter key=cuju.%s value=%s min=%ld max=%ld\n", key, v, min,
               max);
        exit(2);
    }
    return x;
}

/* Parse ADDR:PORT (IPv4) from cuju.KEY into *sa; exits with a message if malformed. */
static int param_addr(const char *key, struct sockaddr_in *sa, int required)
{
    const char *v = param(key);
    if (!v) {
        if (required) {
            printf("cuju-agent: error=missing-parameter key=cuju.%s want=ADDR:PORT\n", key);
            exit(2);
        }
        return 0;
    }
    char host[64];
    const char *colon = strrchr(v, ':');
    long port = colon ? strtol(colon + 1, NULL, 10) : 0;
    size_t hlen = colon ? (size_t)(colon - v) : 0;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    if (!colon || hlen >= sizeof(host) || port <= 0 || port > 65535)
        goto bad;
    memcpy(host, v, hlen);
    host[hlen] = '\0';
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
        goto bad;
    sa->sin_port = htons((uint16_t)port);
    return 1;
bad:
    printf("cuju-agent: error=bad-parameter key=cuju.%s value=%s want=ADDR:PORT\n", key, v);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* ---- count ------------------------------------------------------------- */

__attribute__((noreturn)) static void mode_count(void)
{
    long interval_ms = param_long("interval_ms", 100, 1, 3600000);
    uint64_t next = now_ns();
    for (uint64_t n = 0;; n++) {
        printf("cuju-count: n=%llu\n", (unsigned long long)n);
        next += (uint64_t)interval_ms * 1000000ull;
        uint64_t now = now_ns();
        if (next < now)
            next = now;
        sleep_until(next);
    }
}

/* ---- udp (+ tcp) ------------------------------------------------------- */

enum tcp_state { TCP_OFF, TCP_CONNECTING, TCP_UP, TCP_BROKEN };
static const char *const tcp_state_name[] = {"off", "connecting", "up", "broken"};

struct tcp_stream {
    enum tcp_state state;
    int fd;
    struct sockaddr_in peer;
    uint64_t retry_at;       /* next connect attempt while CONNECTING without fd */
    uint64_t goal;           /* counters the stream should have carried by now */
    uint64_t sent_bytes;     /* bytes accepted by the kernel */
};

static void tcp_try_connect(struct tcp_stream *t, uint64_t now)
{
    if (t->fd < 0) {
        if (now < t->retry_at)
            return;
        t->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (t->fd < 0)
            return;
        int one = 1;
        setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(t->fd, (struct sockaddr *)&t->peer, sizeof(t->peer)) == 0) {
            t->state = TCP_UP;
            printf("cuju-udp: tcp=up\n");
            return;
        }
        if (errno != EINPROGRESS)
            goto retry;
    }
    struct pollfd pfd = {.fd = t->fd, .events = POLLOUT};
    if (poll(&pfd, 1, 0) <= 0)
        return;
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err == 0) {
        t->state = TCP_UP;
        printf("cuju-udp: tcp=up\n");
        return;
    }
retry:
    /* Only the first connection is retried (the observer may not listen yet). */
    close(t->fd);
    t->fd = -1;
    t->retry_at = now + 200000000ull;
}

static void tcp_pump(struct tcp_stream *t)
{
    unsigned char buf[4096];
    while (t->sent_bytes < t->goal * 8) {
        uint64_t off = t->sent_bytes;
        uint64_t first = off / 8;
        size_t skip = (size_t)(off % 8);
        uint64_t want = t->goal * 8 - off;
        size_t n = 0;
        for (uint64_t c = first; n < sizeof(buf) - 8 && c < t->goal; c++, n += 8)
            put_be64(buf + n, c);
        n -= skip;
        if (n > want)
            n = (size_t)want;
        ssize_t w = send(t->fd, buf + skip, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return;
            printf("cuju-udp: tcp=broken errno=%d error=%s sent_bytes=%llu\n", errno, strerror(errno),
                   (unsigned long long)t->sent_bytes);
            close(t->fd);
            t->fd = -1;
            t->state = TCP_BROKEN;
            return;
        }
        t->sent_bytes += (uint64_t)w;
    }
}

static int mode_udp(void)
{
    struct sockaddr_in peer;
    param_addr("peer", &peer, 1);
    long pps = param_long("pps", 200, 1, 100000);
    long batch = param_long("tcp_batch", 8, 1, 4096);
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    struct tcp_stream t = {.state = TCP_OFF, .fd = -1};
    if (param_addr("tcp", &t.peer, 0))
        t.state = TCP_CONNECTING;

    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        printf("cuju-udp: error=socket errno=%d\n", errno);
        return 1;
    }
    printf("cuju-udp: start peer=%s pps=%ld tcp=%s\n", param("peer"), pps, param("tcp") ? param("tcp") : "-");

    uint64_t interval = 1000000000ull / (uint64_t)pps;
    uint64_t next = now_ns(), next_report = next + (uint64_t)report_ms * 1000000ull;
    uint64_t send_errors = 0;
    for (uint64_t seq = 0;; seq++) {
        uint64_t now = now_ns();
        if (t.state == TCP_CONNECTING)
            tcp_try_connect(&t, now);
        if (t.state == TCP_UP) {
            t.goal += (uint64_t)batch;
            tcp_pump(&t);
        }
        unsigned char d[DGRAM_LEN] = {'C', 'U', 'J', 'U', 1};
        put_be64(d + 8, seq);
        put_be64(d + 16, now);
        put_be64(d + 24, t.sent_bytes / 8);
        if (sendto(fd, d, sizeof(d), 0, (struct sockaddr *)&peer, sizeof(peer)) < 0)
            send_errors++;
        if (now >= next_report) {
            printf("cuju-udp: seq=%llu tcp=%s tcp_bytes=%llu send_errors=%llu\n", (unsigned long long)seq,
                   tcp_state_name[t.state], (unsigned long long)t.sent_bytes,
                   (unsigned long long)send_errors);
            next_report = now + (uint64_t)report_ms * 1000000ull;
        }
        next += interval;
        if (next < now)
            next = now; /* fell behind (VM paused): no burst to catch up */
        sleep_until(next);
    }
}

/* ---- echo -------------------------------------------------------------- */

static int mode_echo(void)
{
    long port = param_long("port", 7, 1, 65535);
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        printf("cuju-echo: error=bind port=%ld errno=%d\n", port, errno);
        return 1;
    }
    printf("cuju-echo: listening port=%ld\n", port);
    uint64_t echoed = 0, next_report = now_ns() + (uint64_t)report_ms * 1000000ull;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, (int)report_ms);
        if (r > 0) {
            unsigned char buf[65536];
            struct sockaddr_in from;
            socklen_t flen = sizeof(from);
            ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
            if (n >= 0 && sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, flen) == n)
                echoed++;
        }
        uint64_t now = now_ns();
        if (now >= next_report) {
            printf("cuju-echo: echoed=%llu\n", (unsigned long long)echoed);
            next_report = now + (uint64_t)report_ms * 1000000ull;
        }
    }
}

/* ---- stress ------------------------------------------------------------ */

static int mode_stress(void)
{
    long mb = param_long("stress_mb", 64, 1, 1 << 20);
    long fill = param_long("stress_fill", 0, 0, 1);
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    size_t size = (size_t)mb << 20, pages = size / PAGE;
    unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        printf("cuju-stress: error=mmap mb=%ld errno=%d\n", mb, errno);
        return 1;
    }
    printf("cuju-stress: start mb=%ld fill=%ld pages=%zu\n", mb, fill, pages);
    uint64_t t0 = now_ns(), done = 0, pass = 0;
    for (;; pass++) {
        for (size_t p = 0; p < pages; p++) {
            unsigned char *pg = mem + p * PAGE;
            if (fill)
                memset(pg, (int)(pass & 0xff) ^ 0x5a, PAGE);
            /* A value that changes every pass, at an offset that moves through the page. */
            *(volatile uint64_t *)(pg + ((pass * 8) % PAGE)) = pass * pages + p + 1;
            if ((++done & 1023) == 0) {
                uint64_t now = now_ns();
                if (now - t0 >= (uint64_t)report_ms * 1000000ull) {
                    double s = (double)(now - t0) / 1e9;
                    double bytes = fill ? (double)done * PAGE : (double)done * 8;
                    printf("cuju-stress: pass=%llu pages_per_s=%.0f mb_per_s=%.1f\n",
                           (unsigned long long)pass, (double)done / s, bytes / s / 1e6);
                    t0 = now;
                    done = 0;
                }
            }
        }
    }
}

/* ---- pattern ------------------------------------------------------------- */

#define MARKER_LEN 16

static int hex_nibble(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int mode_pattern(void)
{
    const char *hex = param("marker");
    long mb = param_long("pattern_mb", 8, 1, 1 << 16);
    long per_tick = param_long("pattern_pages", 64, 1, 1 << 20);
    long interval_ms = param_long("interval_ms", 100, 1, 3600000);
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    unsigned char marker[MARKER_LEN];
    for (int i = 0; i < MARKER_LEN; i++) {
        int hi = hex && strlen(hex) == 2 * MARKER_LEN ? hex_nibble(hex[2 * i]) : -1;
        int lo = hi >= 0 ? hex_nibble(hex[2 * i + 1]) : -1;
        if (lo < 0) {
            printf("cuju-pattern: error=bad-parameter key=cuju.marker want=%d-hex-digits\n", 2 * MARKER_LEN);
            return 2;
        }
        marker[i] = (unsigned char)(hi << 4 | lo);
    }
    size_t size = (size_t)mb << 20, pages = size / PAGE;
    unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        printf("cuju-pattern: error=mmap mb=%ld errno=%d\n", mb, errno);
        return 1;
    }
    for (size_t off = 0; off < size; off += MARKER_LEN)
        memcpy(mem + off, marker, MARKER_LEN);
    printf("cuju-pattern: filled mb=%ld pages=%zu\n", mb, pages);
    uint64_t rewrites = 0, next = now_ns(), report = next + (uint64_t)report_ms * 1000000ull;
    uint64_t m[2];
    memcpy(m, marker, MARKER_LEN);
    for (size_t p = 0;;) {
        /* The same bytes again, through volatile stores: the page is written (dirty) all the same. */
        for (long i = 0; i < per_tick; i++, p = (p + 1) % pages) {
            volatile uint64_t *w = (volatile uint64_t *)(void *)(mem + p * PAGE);
            for (size_t k = 0; k < PAGE / 8; k += 2) {
                w[k] = m[0];
                w[k + 1] = m[1];
            }
        }
        rewrites += (uint64_t)per_tick;
        uint64_t now = now_ns();
        if (now >= report) {
            printf("cuju-pattern: rewrites=%llu\n", (unsigned long long)rewrites);
            report = now + (uint64_t)report_ms * 1000000ull;
        }
        next += (uint64_t)interval_ms * 1000000ull;
        if (next < now)
            next = now;
        sleep_until(next);
    }
}

/* ---- cpu ----------------------------------------------------------------- */

__attribute__((noreturn)) static void mode_cpu(void)
{
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    uint64_t x = 0x9E3779B97F4A7C15ull, iters = 0, next = now_ns() + (uint64_t)report_ms * 1000000ull;
    printf("cuju-cpu: start\n");
    for (;;) {
        for (int i = 0; i < 65536; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        iters++;
        uint64_t now = now_ns();
        if (now >= next) {
            printf("cuju-cpu: iters=%llu x=%llu\n", (unsigned long long)iters, (unsigned long long)(x & 0xffff));
            next = now + (uint64_t)report_ms * 1000000ull;
        }
    }
}

/* ---- service ------------------------------------------------------------- */

static int mode_service(void)
{
    long port = param_long("port", 7070, 1, 65535);
    long req = param_long("req_bytes", 64, 1, 65536);
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0) {
        printf("cuju-service: error=listen port=%ld errno=%d\n", port, errno);
        return 1;
    }
    printf("cuju-service: listening port=%ld req_bytes=%ld\n", port, req);
    struct pollfd fds[17] = {{.fd = lfd, .events = POLLIN}};
    size_t have[17] = {0};
    unsigned char *buf[17] = {0};
    int n = 1;
    uint64_t served = 0, next_report = now_ns() + (uint64_t)report_ms * 1000000ull;
    for (;;) {
        int r = poll(fds, (nfds_t)n, (int)report_ms);
        if (r > 0 && (fds[0].revents & POLLIN) && n < 17) {
            int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                fds[n] = (struct pollfd){.fd = c, .events = POLLIN};
                have[n] = 0;
                buf[n] = malloc((size_t)req);
                n++;
            }
        }
        for (int i = 1; r > 0 && i < n; i++) {
            if (!fds[i].revents)
                continue;
            ssize_t got = read(fds[i].fd, buf[i] + have[i], (size_t)req - have[i]);
            if (got <= 0) {
                close(fds[i].fd);
                free(buf[i]);
                fds[i] = fds[n - 1];
                have[i] = have[n - 1];
                buf[i] = buf[n - 1];
                n--;
                i--;
                continue;
            }
            have[i] += (size_t)got;
            if (have[i] == (size_t)req) {
                buf[i][0]++;
                if (write(fds[i].fd, buf[i], (size_t)req) == (ssize_t)req)
                    served++;
                have[i] = 0;
            }
        }
        uint64_t now = now_ns();
        if (now >= next_report) {
            printf("cuju-service: served=%llu\n", (unsigned long long)served);
            next_report = now + (uint64_t)report_ms * 1000000ull;
        }
    }
}

/* ---- balloon ----------------------------------------------------------- */

static long meminfo_kb(const char *field)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long kb = -1;
    size_t flen = strlen(field);
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, flen) == 0 && line[flen] == ':') {
            kb = strtol(line + flen + 1, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

__attribute__((noreturn)) static void mode_balloon(void)
{
    long report_ms = param_long("report_ms", 1000, 10, 3600000);
    for (;;) {
        printf("cuju-balloon: memtotal_kb=%ld memfree_kb=%ld\n", meminfo_kb("MemTotal"),
               meminfo_kb("MemFree"));
        usleep((useconds_t)report_ms * 1000u);
    }
}

/* ---- diskread ---------------------------------------------------------- */

struct disk_stats {
    uint64_t blocks_checked;
    uint64_t bad_blocks;
};

static void check_blocks(const unsigned char *buf, size_t len, uint64_t first_block, struct disk_stats *st)
{
    for (size_t off = 0; off + PAGE <= len; off += PAGE) {
        const unsigned char *b = buf + off;
        uint64_t idx = 0;
        for (int i = 7; i >= 0; i--)
            idx = (idx << 8) | b[8 + i];
        st->blocks_checked++;
        if (memcmp(b, BLOCK_MAGIC, sizeof(BLOCK_MAGIC)) != 0 || idx != first_block + off / PAGE)
            st->bad_blocks++;
    }
}

/* One pass over the disk; returns bytes read or -1. */
static long long read_pass(const char *disk, int direct, unsigned char **bufs, long nbufs, size_t bufsize,
                           int patterned, struct disk_stats *st)
{
    int fd = open(disk, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    if (fd < 0) {
        printf("cuju-diskread: error=open disk=%s direct=%d errno=%d\n", disk, direct, errno);
        return -1;
    }
    if (!direct)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); /* make the buffered pass hit the device */
    long long total = 0;
    for (long i = 0;; i = (i + 1) % nbufs) {
        ssize_t n = read(fd, bufs[i], bufsize);
        if (n < 0) {
            printf("cuju-diskread: error=read direct=%d errno=%d offset=%lld\n", direct, errno, total);
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        if (patterned)
            check_blocks(bufs[i], (size_t)n, (uint64_t)total / PAGE, st);
        total += n;
    }
    close(fd);
    return total;
}

static int mode_diskread(void)
{
    const char *disk_path = param("disk") ? param("disk") : "/dev/vda";
    long nbufs = param_long("bufs", 8, 1, 1024);
    long bufsize = param_long("bufsize", 262144, (long)PAGE, 64L << 20);
    const char *how = param("diskmode") ? param("diskmode") : "both";
    int use_direct = strcmp(how, "buffered") != 0, use_buffered = strcmp(how, "direct") != 0;
    if (bufsize % (long)PAGE) {
        printf("cuju-diskread: error=bad-parameter key=cuju.bufsize value=%ld want=multiple-of-4096\n",
               bufsize);
        return 2;
    }
    unsigned char **bufs = calloc((size_t)nbufs, sizeof(*bufs));
    for (long i = 0; i < nbufs; i++)
        if (posix_memalign((void **)&bufs[i], PAGE, (size_t)bufsize) != 0) {
            printf("cuju-diskread: error=alloc\n");
            return 1;
        }
    /* Is the disk patterned? Look at block 0 through a buffered read. */
    int patterned = 0;
    int fd = open(disk_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        unsigned char first[16];
        patterned = read(fd, first, sizeof(first)) == (ssize_t)sizeof(first) &&
                    memcmp(first, BLOCK_MAGIC, sizeof(BLOCK_MAGIC)) == 0;
        close(fd);
    }
    printf("cuju-diskread: start disk=%s bufs=%ld bufsize=%ld mode=%s patterned=%d\n", disk_path, nbufs,
           bufsize, how, patterned);
    for (uint64_t pass = 0;; pass++) {
        int direct = use_direct && use_buffered ? (int)(pass % 2 == 0) : use_direct;
        struct disk_stats st = {0};
        uint64_t t0 = now_ns();
        long long n = read_pass(disk_path, direct, bufs, nbufs, (size_t)bufsize, patterned, &st);
        if (n < 0) {
            sleep(1);
            continue;
        }
        double s = (double)(now_ns() - t0) / 1e9;
        printf("cuju-diskread: pass=%llu direct=%d bytes=%lld mb_per_s=%.1f blocks_checked=%llu "
               "bad_blocks=%llu\n",
               (unsigned long long)pass, direct, n, s > 0 ? (double)n / s / 1e6 : 0.0,
               (unsigned long long)st.blocks_checked, (unsigned long long)st.bad_blocks);
    }
}

/* ---- fsrec -------------------------------------------------------------- */

#define REC_LEN 64

static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void record_of(char *r, uint64_t n)
{
    int len = snprintf(r, REC_LEN, "rec %012llu %016llx", (unsigned long long)n, (unsigned long long)mix64(n));
    memset(r + len, ' ', REC_LEN - 1 - (size_t)len);
    r[REC_LEN - 1] = '\n';
}

static void block_of(unsigned char *b, uint64_t index, uint64_t gen)
{
    memcpy(b, "CUJUFSB", 8);
    for (size_t w = 1; w < PAGE / 8; w++) {
        uint64_t v = w == 1 ? index : w == 2 ? gen : mix64((index << 40) ^ (gen << 8) ^ w);
        memcpy(b + w * 8, &v, 8);
    }
}

static uint64_t fnv64(const unsigned char *b, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* <linux/fs.h>'s FITRIM (that header clashes with <sys/mount.h>). */
struct cuju_fstrim_range {
    uint64_t start, len, minlen;
};
#define CUJU_FITRIM _IOWR('X', 121, struct cuju_fstrim_range)

/* "trim": drop /mnt/filler, then discard every block ext4 does not use; one line. */
static void fsrec_trim(char *out, size_t outlen)
{
    int gone = unlink("/mnt/filler") == 0;
    sync();
    struct cuju_fstrim_range range = {.start = 0, .len = UINT64_MAX, .minlen = 0};
    int fd = open("/mnt", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int r = fd >= 0 ? ioctl(fd, CUJU_FITRIM, &range) : -1;
    snprintf(out, outlen, "cuju-fsrec: trimmed bytes=%llu unlinked=%d fitrim=%d errno=%d",
             r == 0 ? (unsigned long long)range.len : 0ull, gone, r, r ? errno : 0);
    if (fd >= 0)
        close(fd);
}

struct fsrec {
    int rec_fd, blk_fd;
    uint64_t records;        /* records written (and fsynced) so far */
    long blocks;
    uint64_t *sums;          /* checksum in RAM of each block as last written */
    unsigned char *buf;      /* one O_DIRECT-aligned block */
};

/* Read both files back with O_DIRECT (the disk, not the page cache); one line. */
static void fsrec_verify(struct fsrec *f, char *out, size_t outlen)
{
    unsigned long long bad_blocks = 0, bad_records = 0, on_disk = 0;
    int bfd = open("/mnt/blocks", O_RDONLY | O_DIRECT | O_CLOEXEC);
    for (long i = 0; bfd >= 0 && i < f->blocks; i++)
        if (pread(bfd, f->buf, PAGE, (off_t)i * PAGE) != PAGE || fnv64(f->buf, PAGE) != f->sums[i])
            bad_blocks++;
    int rfd = open("/mnt/records", O_RDONLY | O_DIRECT | O_CLOEXEC);
    char want[REC_LEN];
    for (off_t off = 0; rfd >= 0;) {
        ssize_t n = pread(rfd, f->buf, PAGE, off);
        if (n <= 0)
            break;
        for (ssize_t at = 0; at + REC_LEN <= n; at += REC_LEN, on_disk++) {
            record_of(want, on_disk);
            if (memcmp(f->buf + at, want, REC_LEN) != 0)
                bad_records++;
        }
        if (n < PAGE)
            break;
        off += n;
    }
    snprintf(out, outlen, "cuju-fsrec: verify records=%llu on_disk=%llu bad_records=%llu blocks=%ld bad_blocks=%llu "
             "open=%d,%d", (unsigned long long)f->records, on_disk, bad_records, f->blocks, bad_blocks,
             bfd >= 0, rfd >= 0);
    if (bfd >= 0)
        close(bfd);
    if (rfd >= 0)
        close(rfd);
}

static int mode_fsrec(void)
{
    struct sockaddr_in peer;
    param_addr("peer", &peer, 1);
    const char *disk = param("disk") ? param("disk") : "/dev/vda";
    long rec_ms = param_long("rec_ms", 5, 0, 3600000);
    long port = param_long("port", 7001, 1, 65535);
    struct fsrec f = {.blocks = param_long("blocks", 64, 1, 65536)};
    mkdir("/mnt", 0755);
    if (mount(disk, "/mnt", "ext4", 0, NULL) != 0) {
        printf("cuju-fsrec: error=mount disk=%s errno=%d\n", disk, errno);
        return 1;
    }
    f.sums = calloc((size_t)f.blocks, sizeof(*f.sums));
    f.rec_fd = open("/mnt/records", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    f.blk_fd = open("/mnt/blocks", O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
    int out = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int ctl = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (!f.sums || f.rec_fd < 0 || f.blk_fd < 0 || out < 0 || ctl < 0 ||
        bind(ctl, (struct sockaddr *)&sa, sizeof(sa)) < 0 || posix_memalign((void **)&f.buf, PAGE, PAGE) != 0) {
        printf("cuju-fsrec: error=setup errno=%d\n", errno);
        return 1;
    }
    /* Every block written once and made durable: later O_DIRECT overwrites change no metadata. */
    for (long i = 0; i < f.blocks; i++) {
        block_of(f.buf, (uint64_t)i, 0);
        if (pwrite(f.blk_fd, f.buf, PAGE, (off_t)i * PAGE) != PAGE) {
            printf("cuju-fsrec: error=prealloc errno=%d\n", errno);
            return 1;
        }
        f.sums[i] = fnv64(f.buf, PAGE);
    }
    fsync(f.blk_fd);
    printf("cuju-fsrec: start disk=%s rec_ms=%ld blocks=%ld port=%ld\n", disk, rec_ms, f.blocks, port);
    int writing = 1;
    uint64_t next = now_ns(), next_report = next + 1000000000ull;
    for (;;) {
        char cmd[64], reply[256];
        struct sockaddr_in from;
        socklen_t flen = sizeof(from);
        ssize_t got = recvfrom(ctl, cmd, sizeof(cmd) - 1, 0, (struct sockaddr *)&from, &flen);
        if (got > 0) {
            cmd[got] = '\0';
            if (strncmp(cmd, "verify", 6) == 0) {
                writing = 0;
                fsrec_verify(&f, reply, sizeof(reply));
            } else if (strncmp(cmd, "trim", 4) == 0) {
                fsrec_trim(reply, sizeof(reply));
            } else if (strncmp(cmd, "halt", 4) == 0) {
                close(f.rec_fd);
                close(f.blk_fd);
                int r = umount("/mnt");
                sync();
                snprintf(reply, sizeof(reply), "cuju-fsrec: halted records=%llu umount=%d errno=%d",
                         (unsigned long long)f.records, r, r ? errno : 0);
                printf("%s\n", reply);
                sendto(ctl, reply, strlen(reply), 0, (struct sockaddr *)&from, flen);
                usleep(200000);
                reboot(RB_POWER_OFF);
                return 0;
            } else {
                snprintf(reply, sizeof(reply), "cuju-fsrec: error=unknown-command");
            }
            printf("%s\n", reply);
            sendto(ctl, reply, strlen(reply), 0, (struct sockaddr *)&from, flen);
        }
        if (writing) {
            char rec[REC_LEN];
            record_of(rec, f.records);
            if (write(f.rec_fd, rec, REC_LEN) != REC_LEN || fsync(f.rec_fd) != 0) {
                printf("cuju-fsrec: error=append n=%llu errno=%d\n", (unsigned long long)f.records, errno);
                return 1;
            }
            /* Reported only now that fsync returned. */
            unsigned char d[DGRAM_LEN] = {'C', 'U', 'J', 'U', 1};
            put_be64(d + 8, f.records);
            put_be64(d + 16, now_ns());
            sendto(out, d, sizeof(d), 0, (struct sockaddr *)&peer, sizeof(peer));
            long i = (long)(f.records % (uint64_t)f.blocks);
            block_of(f.buf, (uint64_t)i, f.records + 1);
            if (pwrite(f.blk_fd, f.buf, PAGE, (off_t)i * PAGE) != PAGE) {
                printf("cuju-fsrec: error=block i=%ld errno=%d\n", i, errno);
                return 1;
            }
            f.sums[i] = fnv64(f.buf, PAGE);
            f.records++;
        }
        uint64_t now = now_ns();
        if (now >= next_report) {
            printf("cuju-fsrec: records=%llu\n", (unsigned long long)f.records);
            next_report = now + 1000000000ull;
        }
        next += (uint64_t)rec_ms * 1000000ull;
        if (next < now)
            next = now;
        if (writing)
            sleep_until(next);
        else
            usleep(10000);
    }
}

/* ---- main -------------------------------------------------------------- */

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_argc = argc;
    g_argv = argv;
    load_cmdline();
    const char *mode = argc > 1 ? argv[1] : param("mode");
    if (!mode) {
        printf("cuju-agent: error=no-mode usage=agent count|udp|echo|stress|balloon|diskread|cpu|service|fsrec|pattern "
               "[cuju.KEY=VALUE ...]\n");
        return 2;
    }
    if (strcmp(mode, "count") == 0)
        mode_count();
    if (strcmp(mode, "udp") == 0)
        return mode_udp();
    if (strcmp(mode, "echo") == 0)
        return mode_echo();
    if (strcmp(mode, "stress") == 0)
        return mode_stress();
    if (strcmp(mode, "balloon") == 0)
        mode_balloon();
    if (strcmp(mode, "diskread") == 0)
        return mode_diskread();
    if (strcmp(mode, "cpu") == 0)
        mode_cpu();
    if (strcmp(mode, "service") == 0)
        return mode_service();
    if (strcmp(mode, "fsrec") == 0)
        return mode_fsrec();
    if (strcmp(mode, "pattern") == 0)
        return mode_pattern();
    printf("cuju-agent: error=unknown-mode mode=%s known=count,udp,echo,stress,balloon,diskread,cpu,service,fsrec,pattern\n",
           mode);
    return 2;
}
