/* interrupt.c - stopping long calls early: Ctrl-C (SIGINT) and pymoe_interrupt() end the loads and feeds
 * running at that moment, at their next check, with PYMOE_EABORTED. */
#define _GNU_SOURCE /* sigaction's SA_* flags */
#include "internal.h"

#include <signal.h>
#include <stdatomic.h>
#include <string.h>

/* Moves on at each interrupt: a call remembers it when it starts and stops when it has changed, so calls
 * started later are not affected and nothing needs clearing. */
static atomic_uint interrupts;

void pymoe_interrupt(void) {
    atomic_fetch_add(&interrupts, 1u);
}

uint32_t pymoe_interrupt_count(void) {
    return atomic_load(&interrupts);
}

bool pymoe_abort_when_set(void * flag) {
    return flag && *(volatile int32_t *) flag != 0;
}

/* The handler SIGINT had before ours; ours calls it after counting the interrupt. */
static struct sigaction previous;

static void on_sigint(int sig, siginfo_t * info, void * context) {
    pymoe_interrupt();
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    }
}

int32_t pymoe_interrupt_on_sigint(void) {
    struct sigaction now;
    if (sigaction(SIGINT, NULL, &now) != 0) {
        return pymoe_fail(PYMOE_EBACKEND, "sigaction: cannot read the SIGINT handler");
    }
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigint) {
        return pymoe_ok();  /* installed, and still first */
    }
    if (!(now.sa_flags & SA_SIGINFO) && (now.sa_handler == SIG_DFL || now.sa_handler == SIG_IGN)) {
        return pymoe_ok();  /* Ctrl-C ends the process, or is ignored: nothing to chain to */
    }
    struct sigaction ours;
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = on_sigint;
    ours.sa_mask      = now.sa_mask;
    ours.sa_flags     = (now.sa_flags & ~SA_RESETHAND) | SA_SIGINFO;
    /* the handler it replaces is saved before ours can run: SIGINT is blocked while they swap */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    previous = now;
    int rc = sigaction(SIGINT, &ours, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc == 0 ? pymoe_ok() : pymoe_fail(PYMOE_EBACKEND, "sigaction: cannot install the SIGINT handler");
}
