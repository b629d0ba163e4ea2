/* Getting a userfaultfd that belongs to another process's mm, from outside.
 *
 * uffd_attach() stops one thread of the target with PTRACE_SEIZE +
 * PTRACE_INTERRUPT, makes it execute userfaultfd(flags) at the `syscall`
 * instruction it is already parked on, copies the new fd into the caller with
 * pidfd_getfd(), makes the thread close() its copy again (so the target keeps no
 * reference: when the caller closes its fd the registration disappears and the
 * target can never block on an unread event), restores every register exactly
 * and detaches. A syscall that was interrupted by the stop is restarted the way
 * the kernel would have restarted it.
 *
 * Requirements: ptrace rights over the target (root, or same user without
 * restrictions), x86-64, and a thread of the target that sits in a system call
 * (QEMU's main loop thread always does when idle). Seccomp filters of the target
 * apply to the injected calls: QEMU's -sandbox does not deny userfaultfd/close.
 */
#ifndef CUJU_ATTACH_H
#define CUJU_ATTACH_H

#include <stdbool.h>

/* Steps, for error messages. */
enum uffd_attach_stage {
    ATTACH_OK = 0,
    ATTACH_PIDFD,      /* pidfd_open */
    ATTACH_SEIZE,      /* PTRACE_SEIZE / INTERRUPT / wait */
    ATTACH_NOSYSCALL,  /* the thread is not parked in a syscall: try another (-EAGAIN) */
    ATTACH_INJECT,     /* running userfaultfd() in the target */
    ATTACH_UFFD,       /* userfaultfd() in the target failed: errno of the target */
    ATTACH_GETFD,      /* pidfd_getfd */
    ATTACH_CLOSE,      /* close() in the target */
    ATTACH_DETACH,     /* restoring registers / detaching */
};

/* Returns the new fd in the caller (>= 0) or -errno; *stage says where it
 * failed. The target's thread `tid` of process `pid` is left untraced in every
 * case except a failure at ATTACH_DETACH, where the kernel detaches it when the
 * caller exits. */
int uffd_attach(int pid, int tid, bool user_mode_only, enum uffd_attach_stage *stage);

const char *uffd_attach_stage_name(enum uffd_attach_stage stage);

#endif
