/* ptrace-injected userfaultfd(): see attach.h. */
#define _GNU_SOURCE
#include "attach.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include "uffd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* Kernel-internal restart codes a tracer sees in rax of an interrupted syscall. */
#define K_ERESTARTSYS 512
#define K_ERESTARTNOINTR 513
#define K_ERESTARTNOHAND 514
#define K_ERESTART_RESTARTBLOCK 516

#define MAX_HELD_SIGNALS 16

const char *
uffd_attach_stage_name(enum uffd_attach_stage stage)
{
    switch (stage) {
    case ATTACH_OK: return "ok";
    case ATTACH_PIDFD: return "pidfd_open";
    case ATTACH_SEIZE: return "ptrace seize/interrupt";
    case ATTACH_NOSYSCALL: return "thread not in a system call";
    case ATTACH_INJECT: return "injecting a system call";
    case ATTACH_UFFD: return "userfaultfd() in the target";
    case ATTACH_GETFD: return "pidfd_getfd";
    case ATTACH_CLOSE: return "close() in the target";
    case ATTACH_DETACH: return "restoring registers/detaching";
    }
    return "?";
}

#if defined(__x86_64__)

struct held {
    int sigs[MAX_HELD_SIGNALS]; /* signals the tracee got while we held it */
    int n;
};

static void
hold_signal(struct held *h, int sig)
{
    for (int i = 0; i < h->n; i++)
        if (h->sigs[i] == sig)
            return; /* standard signals do not queue anyway */
    if (h->n < MAX_HELD_SIGNALS)
        h->sigs[h->n++] = sig;
}

/* Wait for the next ptrace stop of tid that is not a signal delivery; signals
 * are held back and re-sent after detaching. `want_syscall` waits for a
 * syscall-stop, else for the PTRACE_INTERRUPT event stop. */
static int
wait_stop(int tid, bool want_syscall, struct held *h)
{
    for (;;) {
        int st;
        if (waitpid(tid, &st, __WALL) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (WIFEXITED(st) || WIFSIGNALED(st))
            return -ESRCH;
        if (!WIFSTOPPED(st))
            continue;
        int sig = WSTOPSIG(st);
        int event = st >> 16;
        if (want_syscall && sig == (SIGTRAP | 0x80))
            return 0;
        if (!want_syscall && event == PTRACE_EVENT_STOP)
            return 0;
        if (event == PTRACE_EVENT_STOP) {
            /* A group-stop or a late interrupt stop: just go on. */
            if (ptrace(want_syscall ? PTRACE_SYSCALL : PTRACE_CONT, tid, 0, 0) < 0)
                return -errno;
            continue;
        }
        if (event == 0 && sig != (SIGTRAP | 0x80)) {
            /* Signal-delivery stop: suppress now, deliver after detaching. */
            hold_signal(h, sig);
            if (ptrace(want_syscall ? PTRACE_SYSCALL : PTRACE_CONT, tid, 0, 0) < 0)
                return -errno;
            if (!want_syscall && ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0)
                return -errno;
            continue;
        }
        if (ptrace(want_syscall ? PTRACE_SYSCALL : PTRACE_CONT, tid, 0, 0) < 0)
            return -errno;
    }
}

/* Run one syscall in the stopped tracee at address `insn`; returns 0 and the
 * syscall's return value in *ret, or -errno of the ptrace machinery. */
static int
inject(int tid, const struct user_regs_struct *base, uint64_t insn, uint64_t nr, uint64_t a0,
       uint64_t a1, int64_t *ret, struct held *h)
{
    struct user_regs_struct r = *base;
    int err;

    r.rip = insn;
    r.rax = nr;
    r.orig_rax = (uint64_t)-1; /* no restart fix-up on the way out of this stop */
    r.rdi = a0;
    r.rsi = a1;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) < 0)
        return -errno;
    if (ptrace(PTRACE_SYSCALL, tid, 0, 0) < 0)
        return -errno;
    if ((err = wait_stop(tid, true, h)) < 0) /* syscall entry */
        return err;
    if (ptrace(PTRACE_SYSCALL, tid, 0, 0) < 0)
        return -errno;
    if ((err = wait_stop(tid, true, h)) < 0) /* syscall exit */
        return err;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0)
        return -errno;
    *ret = (int64_t)r.rax;
    return 0;
}

int
uffd_attach(int pid, int tid, bool user_mode_only, enum uffd_attach_stage *stage)
{
    struct user_regs_struct saved, resume;
    struct held held = {.n = 0};
    int pidfd, err, result = -1;
    bool seized = false;
    int64_t ret;

    *stage = ATTACH_PIDFD;
    pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        return -errno;

    *stage = ATTACH_SEIZE;
    if (ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD) < 0) {
        err = -errno;
        goto out;
    }
    seized = true;
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0) {
        err = -errno;
        goto out;
    }
    if ((err = wait_stop(tid, false, &held)) < 0)
        goto out;
    if (ptrace(PTRACE_GETREGS, tid, 0, &saved) < 0) {
        err = -errno;
        goto out;
    }
    resume = saved;

    /* The thread must be parked right after a `syscall` instruction (0f 05). */
    *stage = ATTACH_NOSYSCALL;
    if ((int64_t)saved.orig_rax < 0) {
        err = -EAGAIN;
        goto detach;
    }
    uint64_t insn = saved.rip - 2;
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)insn, 0);
    if (errno != 0 || (word & 0xffff) != 0x050f) {
        err = -EAGAIN;
        goto detach;
    }

    /* What the kernel would do on the way back to user space for a syscall
     * interrupted without a handler: restart it. We do it by hand so that the
     * registers we restore are final and need no kernel fix-up. */
    int64_t rax = (int64_t)saved.rax;
    if (rax == -K_ERESTARTSYS || rax == -K_ERESTARTNOINTR || rax == -K_ERESTARTNOHAND) {
        resume.rax = saved.orig_rax;
        resume.rip = insn;
        resume.orig_rax = (uint64_t)-1;
    } else if (rax == -K_ERESTART_RESTARTBLOCK) {
        resume.rax = SYS_restart_syscall;
        resume.rip = insn;
        resume.orig_rax = (uint64_t)-1;
    }

    *stage = ATTACH_INJECT;
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    if ((err = inject(tid, &saved, insn, SYS_userfaultfd, (uint64_t)flags, 0, &ret, &held)) < 0)
        goto detach;
    if (ret < 0) {
        *stage = ATTACH_UFFD;
        err = (int)ret;
        goto detach;
    }
    int remote_fd = (int)ret;

    *stage = ATTACH_GETFD;
    result = (int)syscall(SYS_pidfd_getfd, pidfd, remote_fd, 0);
    err = result < 0 ? -errno : 0;

    /* Always close the target's copy, also when getfd failed. */
    int64_t cret;
    int cerr = inject(tid, &saved, insn, SYS_close, (uint64_t)remote_fd, 0, &cret, &held);
    if (err == 0 && (cerr < 0 || cret < 0)) {
        *stage = ATTACH_CLOSE;
        err = cerr < 0 ? cerr : (int)cret;
    }
    if (err == 0) {
        /* Make sure the fd is ours and non-blocking. */
        int fl = fcntl(result, F_GETFD);
        if (fl >= 0)
            fcntl(result, F_SETFD, fl | FD_CLOEXEC);
    }

detach:
    if (ptrace(PTRACE_SETREGS, tid, 0, &resume) < 0 && err == 0) {
        *stage = ATTACH_DETACH;
        err = -errno;
    }
out:
    if (seized) {
        if (ptrace(PTRACE_DETACH, tid, 0, 0) < 0 && err == 0) {
            *stage = ATTACH_DETACH;
            err = -errno;
        }
        for (int i = 0; i < held.n; i++)
            syscall(SYS_tgkill, pid, tid, held.sigs[i]);
    }
    close(pidfd);
    if (err < 0) {
        if (result >= 0)
            close(result);
        return err;
    }
    *stage = ATTACH_OK;
    return result;
}

#else /* !__x86_64__ */

int
uffd_attach(int pid, int tid, bool user_mode_only, enum uffd_attach_stage *stage)
{
    (void)pid;
    (void)tid;
    (void)user_mode_only;
    *stage = ATTACH_INJECT;
    return -ENOSYS;
}

#endif
