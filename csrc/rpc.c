/* rpc.c - rpc-server endpoints: the handshake pymoe speaks before ggml connects, timeouts on ggml's
 * connections, and what a lost server leaves behind.
 *
 * ggml's RPC client ends the process when a server cannot be reached, answers wrongly or goes away, and
 * waits forever on one that stops answering. So pymoe speaks the protocol's HELLO itself first (with
 * timeouts), gives ggml's sockets receive and send timeouts, and when ggml's RPC thread fails anyway,
 * llama_guard.cpp parks that thread here instead of ending the process: the caller, waiting on its own
 * thread (pymoe/_native.py), sees pymoe_rpc_failures() move on and reports it. */
#define _GNU_SOURCE /* DT_* in dirent */
#include "internal.h"

#include "ggml-rpc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum {
    HELLO_COMMAND = 14,          /* RPC_CMD_HELLO, fixed across protocol versions */
    CONN_CAPS     = 24,          /* RPC_CONN_CAPS_SIZE: the request's capabilities */
    HELLO_REPLY   = 4 + CONN_CAPS /* major, minor, patch, padding, capabilities */
};

static const double CONNECT_SECONDS = 3.0;
static const double ANSWER_SECONDS  = 5.0;

static double        timeout_seconds = 120.0; /* set before loads, read while they arm sockets */
static atomic_uint   failures;
static char          failure[512];  /* the first lost server's message */

void pymoe_rpc_set_timeout(double seconds) {
    timeout_seconds = seconds > 0 ? seconds : 0;
}

double pymoe_rpc_timeout(void) {
    return timeout_seconds;
}

uint32_t pymoe_rpc_failures(void) {
    return atomic_load(&failures);
}

const char * pymoe_rpc_failure(void) {
    return failure;
}

void pymoe_rpc_lost(const char * message) {
    if (atomic_load(&failures) == 0) {
        snprintf(failure, sizeof(failure), "%s", message);
    }
    atomic_fetch_add(&failures, 1u);
    for (;;) {
        pause();  /* this thread is ggml's, and it cannot go on; the process can */
    }
}

/* host and port of "host:port"; PYMOE_EINVAL otherwise. */
static int32_t split_endpoint(const char * endpoint, char * host, size_t host_size, const char ** port) {
    const char * colon = strrchr(endpoint, ':');
    size_t       hlen  = colon ? (size_t) (colon - endpoint) : 0;
    char *       end   = NULL;
    long         p     = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || hlen == 0 || hlen >= host_size || !end || *end || p <= 0 || p > 65535) {
        return pymoe_fail(PYMOE_EINVAL, "RPC server '%s' is not of the form host:port", endpoint);
    }
    memcpy(host, endpoint, hlen);
    host[hlen] = '\0';
    *port      = colon + 1;
    return PYMOE_OK;
}

static bool same_address(const struct sockaddr_storage * a, const struct sockaddr * b) {
    if (a->ss_family != b->sa_family) {
        return false;
    }
    if (b->sa_family == AF_INET) {
        const struct sockaddr_in * x = (const void *) a, * y = (const void *) b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (b->sa_family == AF_INET6) {
        const struct sockaddr_in6 * x = (const void *) a, * y = (const void *) b;
        return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return false;
}

/* Call on(fd) for each of this process's sockets connected to one of addrs; returns how many. */
static int for_connections(const struct addrinfo * addrs, void (*on)(int fd)) {
    DIR * dir = opendir("/proc/self/fd");
    if (!dir) {
        return 0;
    }
    int found = 0;
    for (struct dirent * e; (e = readdir(dir)) != NULL;) {
        char * end = NULL;
        long   fd  = strtol(e->d_name, &end, 10);
        if (!end || *end || end == e->d_name || fd == dirfd(dir)) {
            continue;
        }
        struct sockaddr_storage peer;
        socklen_t               len = sizeof(peer);
        int                     type = 0;
        socklen_t               tlen = sizeof(type);
        if (getsockopt((int) fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM ||
            getpeername((int) fd, (struct sockaddr *) &peer, &len) != 0) {
            continue;
        }
        for (const struct addrinfo * a = addrs; a; a = a->ai_next) {
            if (same_address(&peer, a->ai_addr)) {
                found++;
                if (on) {
                    on((int) fd);
                }
                break;
            }
        }
    }
    closedir(dir);
    return found;
}

static void set_timeouts(int fd) {
    double         s  = timeout_seconds;
    struct timeval tv = { (time_t) s, (suseconds_t) ((s - (double) (time_t) s) * 1e6) };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* Wait until fd is ready for events, at most seconds; false on a timeout. */
static bool wait_for(int fd, short events, double seconds) {
    struct pollfd p = { fd, events, 0 };
    int           rc;
    do {
        rc = poll(&p, 1, (int) (seconds * 1000));
    } while (rc < 0 && errno == EINTR);
    return rc == 1;
}

/* Read exactly n bytes: 1 done, 0 the peer closed, -1 an error, -2 a timeout. */
static int read_exactly(int fd, uint8_t * buf, size_t n, double seconds) {
    for (size_t got = 0; got < n;) {
        if (!wait_for(fd, POLLIN, seconds)) {
            return -2;
        }
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r == 0) {
            return 0;
        }
        if (r < 0 && errno != EINTR && errno != EAGAIN) {
            return -1;
        }
        got += r > 0 ? (size_t) r : 0;
    }
    return 1;
}

static int32_t hello(int fd, const char * endpoint, int32_t version[3]) {
    uint8_t  request[1 + 8 + CONN_CAPS] = { HELLO_COMMAND };
    uint64_t size = CONN_CAPS;
    memcpy(request + 1, &size, sizeof(size));  /* the protocol's sizes are the hosts' own uint64 */
    if (!wait_for(fd, POLLOUT, ANSWER_SECONDS) || send(fd, request, sizeof(request), MSG_NOSIGNAL) != sizeof(request)) {
        return pymoe_fail(PYMOE_EBACKEND, "the rpc-server at %s does not take the handshake: %s", endpoint,
                          strerror(errno));
    }
    uint8_t answer[HELLO_REPLY];
    int     rc = read_exactly(fd, (uint8_t *) &size, sizeof(size), ANSWER_SECONDS);
    if (rc == 1 && size != HELLO_REPLY) {
        return pymoe_fail(PYMOE_EBACKEND, "%s is not an rpc-server pymoe can use: it answered the handshake with "
                          "%llu bytes, not %d", endpoint, (unsigned long long) size, HELLO_REPLY);
    }
    rc = rc == 1 ? read_exactly(fd, answer, sizeof(answer), ANSWER_SECONDS) : rc;
    if (rc == -2) {
        return pymoe_fail(PYMOE_EBACKEND, "the rpc-server at %s did not answer the handshake within %.0f s (it is "
                          "stopped, or serving another client)", endpoint, ANSWER_SECONDS);
    }
    if (rc != 1) {
        return pymoe_fail(PYMOE_EBACKEND, "%s closed the connection during the handshake (not an rpc-server, or "
                          "one that would not serve this client)", endpoint);
    }
    for (int i = 0; i < 3; i++) {
        version[i] = answer[i];
    }
    if (answer[0] != RPC_PROTO_MAJOR_VERSION || answer[1] > RPC_PROTO_MINOR_VERSION) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "the rpc-server at %s speaks RPC protocol %d.%d.%d; this pymoe's "
                          "llama.cpp speaks %d.%d (use the pymoe-rpc-server of this pymoe)", endpoint, answer[0],
                          answer[1], answer[2], RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION);
    }
    return PYMOE_OK;
}

int32_t pymoe_rpc_handshake(const char * endpoint, int32_t version[3]) {
    if (!endpoint || !version) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_rpc_handshake: NULL argument");
    }
    version[0] = version[1] = version[2] = -1;
    char         host[256];
    const char * port = NULL;
    int32_t      rc   = split_endpoint(endpoint, host, sizeof(host), &port);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct addrinfo hints = { 0 }, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0 || !res) {
        return pymoe_fail(PYMOE_ENOENT, "RPC server '%s': cannot resolve host '%s'", endpoint, host);
    }
    if (for_connections(res, NULL) > 0) {  /* ggml talks to it already: it serves one client at a time */
        freeaddrinfo(res);
        return pymoe_ok();
    }
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    rc     = fd < 0 ? pymoe_fail(PYMOE_EBACKEND, "socket: %s", strerror(errno)) : PYMOE_OK;
    if (rc == PYMOE_OK) {
        fcntl(fd, F_SETFL, O_NONBLOCK);
        int       err = 0;
        socklen_t len = sizeof(err);
        bool      up  = connect(fd, res->ai_addr, res->ai_addrlen) == 0 ||
                  (errno == EINPROGRESS && wait_for(fd, POLLOUT, CONNECT_SECONDS) &&
                   getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0);
        rc = up ? hello(fd, endpoint, version)
                : pymoe_fail(PYMOE_ENOENT, "no rpc-server answers at %s (start one with: pymoe-rpc-server -H %s -p %s)",
                             endpoint, host, port);
        close(fd);
    }
    freeaddrinfo(res);
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

void pymoe_rpc_arm_all(const char * servers) {
    char * list = servers ? strdup(servers) : NULL;
    char * save = NULL;
    for (char * tok = list ? strtok_r(list, ", ", &save) : NULL; tok; tok = strtok_r(NULL, ", ", &save)) {
        pymoe_rpc_arm(tok);
    }
    free(list);
}

int32_t pymoe_rpc_arm(const char * endpoint) {
    char         host[256];
    const char * port = NULL;
    if (split_endpoint(endpoint, host, sizeof(host), &port) != PYMOE_OK) {
        return 0;
    }
    struct addrinfo hints = { 0 }, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0 || !res) {
        return 0;
    }
    int n = timeout_seconds > 0 ? for_connections(res, set_timeouts) : 0;
    freeaddrinfo(res);
    return n;
}
