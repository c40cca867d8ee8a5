/* The agent's side of the wire protocol (docs/PROTOCOL.md): one TCP connection per server of the
 * lease, each with the reference blocking client's discipline
 * (bitfusion_net/client/blocking_driver.py) and its own lock, request ids and sticky errors.
 *
 * - No-reply requests (copies to the device, memsets, launches, frees, records) are written and
 *   not waited for: the socket's send buffer is the pipeline, a full one blocks the caller (that
 *   is the server's back-pressure). Their failures are sticky on the server and come back as the
 *   answer to the next request that wants a reply (ERROR_DEFERRED), which is how CUDA reports
 *   asynchronous errors too.
 * - A request with a reply is written, then frames are read until its answer arrives. Only one
 *   is outstanding at a time, so every large write happens with no reply on its way
 *   (PROTOCOL.md section 2 allows a client to alternate writing and reading on that condition).
 * - A reply's payload (MEMCPY_DTOH's data) is read straight into the caller's buffer.
 * - Once a connection is lost (EOF, reset, a fatal ERROR, a malformed frame, a timeout) its
 *   session is over: every later call on that server's devices answers
 *   CUDA_ERROR_DEVICE_UNAVAILABLE at once; the other servers' devices keep working, as the
 *   Python client's do.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "agent.h"
#include "lease.h"

bf_session bf_s = {.lock = PTHREAD_MUTEX_INITIALIZER};
int bf_log_level = 1;
static __thread char last_text[512];

void bf_log(int level, const char *fmt, ...) {
    if (level > bf_log_level)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "bitfusion-net agent: %s\n", line);
}

const char *bf_last_error_text(void) { return last_text; }

/* -- metadata ------------------------------------------------------------------------------- */
static void out_put(bf_out *o, const void *data, size_t n) {
    if (o->overflow || o->n + n > o->cap) {
        o->overflow = 1;
        return;
    }
    if (n)
        memcpy(o->p + o->n, data, n);
    o->n += n;
}
/* x86-64 and aarch64 Linux are little-endian, as the wire is: fields are copied as they are. */
void out_u8(bf_out *o, uint8_t v) { out_put(o, &v, 1); }
void out_u16(bf_out *o, uint16_t v) { out_put(o, &v, 2); }
void out_u32(bf_out *o, uint32_t v) { out_put(o, &v, 4); }
void out_u64(bf_out *o, uint64_t v) { out_put(o, &v, 8); }
void out_f64(bf_out *o, double v) { out_put(o, &v, 8); }
void out_raw(bf_out *o, const void *data, size_t n) { out_put(o, data, n); }
void out_bytes(bf_out *o, const void *data, size_t n) {
    out_u32(o, (uint32_t)n);
    out_put(o, data, n);
}

static void in_get(bf_in *i, void *dst, size_t n) {
    if (i->bad || i->at + n > i->n) {
        i->bad = 1;
        memset(dst, 0, n);
        return;
    }
    memcpy(dst, i->p + i->at, n);
    i->at += n;
}
uint8_t in_u8(bf_in *i) { uint8_t v; in_get(i, &v, 1); return v; }
uint16_t in_u16(bf_in *i) { uint16_t v; in_get(i, &v, 2); return v; }
uint32_t in_u32(bf_in *i) { uint32_t v; in_get(i, &v, 4); return v; }
uint64_t in_u64(bf_in *i) { uint64_t v; in_get(i, &v, 8); return v; }
double in_f64(bf_in *i) { double v; in_get(i, &v, 8); return v; }
const uint8_t *in_bytes(bf_in *i, uint32_t *n) {
    *n = in_u32(i);
    if (i->bad || i->at + *n > i->n) {
        i->bad = 1;
        *n = 0;
        return NULL;
    }
    const uint8_t *p = i->p + i->at;
    i->at += *n;
    return p;
}

/* -- the connection ------------------------------------------------------------------------- */
static int live_conns(void) {
    int alive = 0;
    for (int k = 0; k < bf_s.conn_count; k++)
        alive += !__atomic_load_n(&bf_s.conns[k].lost, __ATOMIC_ACQUIRE);
    return alive;
}

/* The connection is over; its lock is held (or cuInit's, while it is being opened). */
static void lose(bf_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void lose(bf_conn *c, const char *fmt, ...) {
    if (c->lost)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->lost_reason, sizeof c->lost_reason, fmt, ap);
    va_end(ap);
    __atomic_store_n(&c->lost, 1, __ATOMIC_RELEASE);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (!c->connected) /* a refused handshake is reported by cuInit's own message */
        return;
    if (bf_s.conn_count == 1)
        bf_log(1, "the session with the server is over (%s); every CUDA call now fails with "
                  "CUDA_ERROR_DEVICE_UNAVAILABLE", c->lost_reason);
    else
        bf_log(1, "the session with the server %s (devices %d..%d) is over (%s); calls on its "
                  "devices now fail with CUDA_ERROR_DEVICE_UNAVAILABLE%s", c->address,
               c->first_device, c->first_device + c->device_count - 1, c->lost_reason,
               live_conns() ? "; the other servers' devices keep working"
                            : "; no server is left: every CUDA call now fails with "
                              "CUDA_ERROR_DEVICE_UNAVAILABLE");
}

static int write_all(bf_conn *c, struct iovec *iov, int count) {
    while (count > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)count};
        ssize_t sent = sendmsg(c->fd, &msg, MSG_NOSIGNAL); /* a closed peer is EPIPE, not SIGPIPE */
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            lose(c, "cannot send to the server: %s",
                 errno == EAGAIN ? "timed out" : strerror(errno));
            return -1;
        }
        size_t left = (size_t)sent;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int read_all(bf_conn *c, void *dst, size_t n) {
    char *p = dst;
    while (n > 0) {
        ssize_t got = recv(c->fd, p, n, 0);
        if (got == 0) {
            lose(c, "the server closed the connection");
            return -1;
        }
        if (got < 0) {
            if (errno == EINTR)
                continue;
            lose(c, "cannot read from the server: %s",
                 errno == EAGAIN ? "no reply within BITFUSION_NET_AGENT_TIMEOUT" : strerror(errno));
            return -1;
        }
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

static uint32_t take_id(bf_conn *c) {
    uint32_t id = c->next_id++;
    if (c->next_id == 0)
        c->next_id = 1; /* request id 0 is the server's (PROTOCOL.md 3.3) */
    return id;
}

/* The opcodes of recent no-reply requests, so that a deferred error is mapped as the call that
   failed would map it (a bad pointer in a copy is CUDA_ERROR_INVALID_VALUE, a bad stream
   CUDA_ERROR_INVALID_HANDLE). */
#define RECENT BF_RECENT

static const char *op_name(uint8_t op) {
    switch (op) {
    case OP_HELLO: return "HELLO";
    case OP_ATTACH: return "ATTACH";
    case OP_AUTHENTICATE: return "AUTHENTICATE";
    case OP_MEM_ALLOC: return "MEM_ALLOC";
    case OP_MEM_FREE: return "MEM_FREE";
    case OP_MEM_GET_INFO: return "MEM_GET_INFO";
    case OP_MEMCPY_HTOD: return "MEMCPY_HTOD";
    case OP_MEMCPY_DTOH: return "MEMCPY_DTOH";
    case OP_MEMCPY_DTOD: return "MEMCPY_DTOD";
    case OP_MEMSET: return "MEMSET";
    case OP_SYNCHRONIZE: return "SYNCHRONIZE";
    case OP_DEVICE_ATTRIBUTES: return "DEVICE_ATTRIBUTES";
    case OP_MODULE_LOAD: return "MODULE_LOAD";
    case OP_MODULE_UNLOAD: return "MODULE_UNLOAD";
    case OP_GET_FUNCTION: return "GET_FUNCTION";
    case OP_LAUNCH: return "LAUNCH";
    case OP_MODULE_GET_GLOBAL: return "MODULE_GET_GLOBAL";
    case OP_STREAM_CREATE: return "STREAM_CREATE";
    case OP_STREAM_DESTROY: return "STREAM_DESTROY";
    case OP_STREAM_SYNCHRONIZE: return "STREAM_SYNCHRONIZE";
    case OP_STREAM_QUERY: return "STREAM_QUERY";
    case OP_STREAM_WAIT_EVENT: return "STREAM_WAIT_EVENT";
    case OP_EVENT_CREATE: return "EVENT_CREATE";
    case OP_EVENT_DESTROY: return "EVENT_DESTROY";
    case OP_EVENT_RECORD: return "EVENT_RECORD";
    case OP_EVENT_SYNCHRONIZE: return "EVENT_SYNCHRONIZE";
    case OP_EVENT_ELAPSED: return "EVENT_ELAPSED";
    case OP_EVENT_QUERY: return "EVENT_QUERY";
    default: return "?";
    }
}

static int send_frame(bf_conn *c, uint8_t op, uint32_t id, const bf_out *meta, const void *payload,
                      uint64_t payload_n) {
    /* level 4: every request, the trace of what a program made the server do */
    bf_log(4, "-> #%u %s%s (%llu payload bytes)%s%s", id, op_name(op),
           c->recent[id % RECENT].id == id && c->recent[id % RECENT].op == op ? " (no reply)" : "",
           (unsigned long long)payload_n, bf_s.conn_count > 1 ? " to " : "",
           bf_s.conn_count > 1 ? c->address : "");
    uint8_t head[24] = {'B', 'F', 'N', 'T', 3, op, 0, 0};
    uint32_t meta_n = meta ? (uint32_t)meta->n : 0;
    memcpy(head + 8, &id, 4);
    memcpy(head + 12, &meta_n, 4);
    memcpy(head + 16, &payload_n, 8);
    struct iovec iov[3] = {{head, 24}, {meta ? meta->p : NULL, meta_n},
                           {(void *)(uintptr_t)payload, (size_t)payload_n}};
    return write_all(c, iov, payload_n ? 3 : 2);
}

CUresult bf_map_error(uint16_t code, uint8_t op);

CUresult bf_map_error(uint16_t code, uint8_t op) {
    switch (code) {
    case E_OUT_OF_MEMORY:
    case E_QUOTA:
        return CUDA_ERROR_OUT_OF_MEMORY;
    case E_INVALID_HANDLE:
        /* the driver calls a pointer outside every allocation an invalid value */
        if (op == OP_MEM_FREE || op == OP_MEMCPY_HTOD || op == OP_MEMCPY_DTOH ||
            op == OP_MEMCPY_DTOD || op == OP_MEMSET)
            return CUDA_ERROR_INVALID_VALUE;
        if (op == OP_GET_FUNCTION || op == OP_MODULE_GET_GLOBAL)
            return CUDA_ERROR_NOT_FOUND;
        return CUDA_ERROR_INVALID_HANDLE;
    case E_INVALID_VALUE:
        if (op == OP_MODULE_LOAD)
            return CUDA_ERROR_INVALID_IMAGE;
        if (op == OP_MODULE_GET_GLOBAL)
            return CUDA_ERROR_NOT_FOUND;
        return CUDA_ERROR_INVALID_VALUE;
    case E_KERNEL:
        return CUDA_ERROR_LAUNCH_FAILED;
    case E_UNSUPPORTED:
        return CUDA_ERROR_NOT_SUPPORTED;
    case E_CAPACITY:
        return CUDA_ERROR_OUT_OF_MEMORY;
    case E_LEASE_ENDED:
    case E_AUTH:
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    default: /* PROTOCOL, INTERNAL and codes newer than this agent */
        return CUDA_ERROR_UNKNOWN;
    }
}

/* Read frames until the answer to `id`; the lock is held. */
static CUresult await_reply(bf_conn *c, uint32_t id, uint8_t op, void *into, uint64_t into_n,
                            uint8_t *reply, size_t *reply_n) {
    uint8_t *meta = c->meta;
    for (;;) {
        uint8_t head[24];
        if (read_all(c, head, 24) < 0)
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        uint8_t rop = head[5];
        uint16_t flags;
        uint32_t rid, meta_n;
        uint64_t payload_n;
        memcpy(&flags, head + 6, 2);
        memcpy(&rid, head + 8, 4);
        memcpy(&meta_n, head + 12, 4);
        memcpy(&payload_n, head + 16, 8);
        if (memcmp(head, "BFNT", 4) != 0 || head[4] != 3 || flags != 1 ||
            meta_n > BF_MAX_METADATA) {
            lose(c, "the server sent a malformed frame header");
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        }
        int with_payload = rop == OP_MEMCPY_DTOH && rop == op && rid == id;
        if (payload_n && (!with_payload || payload_n != into_n)) {
            lose(c, "the server sent a payload of %llu bytes where none (or another size) was due",
                 (unsigned long long)payload_n);
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        }
        if (read_all(c, meta, meta_n) < 0)
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        if (payload_n && read_all(c, into, payload_n) < 0)
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        if (rop == OP_KEEPALIVE && rid == 0)
            continue;
        if (rop == OP_ERROR) {
            bf_in in = {meta, meta_n, 0, 0};
            uint16_t code = in_u16(&in), eflags = in_u16(&in);
            uint32_t from = in_u32(&in), later = in_u32(&in), text_n;
            const uint8_t *text = in_bytes(&in, &text_n);
            if (in.bad) {
                lose(c, "the server sent a malformed ERROR frame");
                return CUDA_ERROR_DEVICE_UNAVAILABLE;
            }
            uint8_t failed_op = op;
            if ((eflags & 1) && c->recent[from % RECENT].id == from)
                failed_op = c->recent[from % RECENT].op;
            snprintf(last_text, sizeof last_text, "%.*s%s", (int)text_n, (const char *)text,
                     later ? " (and more later failures)" : "");
            if (rid != id || (eflags & 2)) {
                lose(c, "%.*s", (int)text_n, (const char *)text);
                return CUDA_ERROR_DEVICE_UNAVAILABLE;
            }
            if (eflags & 1)
                bf_log(2, "an earlier asynchronous call (request %u) failed: %s", from, last_text);
            return bf_map_error(code, failed_op);
        }
        if (rid != id || rop != op) {
            lose(c, "the server answered request %u (opcode 0x%02x) while %u was awaited", rid, rop,
                 id);
            return CUDA_ERROR_DEVICE_UNAVAILABLE;
        }
        if (reply) {
            memcpy(reply, meta, meta_n);
            *reply_n = meta_n;
        }
        return CUDA_SUCCESS;
    }
}

static CUresult call_locked(bf_conn *c, uint8_t op, const bf_out *meta, const void *payload,
                            uint64_t payload_n, void *into, uint64_t into_n, uint8_t *reply,
                            size_t *reply_n) {
    if (c->lost)
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    uint32_t id = take_id(c);
    if (send_frame(c, op, id, meta, payload, payload_n) < 0)
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    return await_reply(c, id, op, into, into_n, reply, reply_n);
}

/* The connection of device `dev`; NULL for a number no grant has (the callers check devices
   first, so that is a bug in the agent, answered as an unknown device would be). */
static bf_conn *conn_of(int dev) {
    if (dev < 0 || dev >= bf_s.device_count)
        return NULL;
    return &bf_s.conns[bf_s.grants[dev].conn];
}

void out_device(bf_out *o, int dev) {
    out_u16(o, dev >= 0 && dev < bf_s.device_count ? bf_s.grants[dev].index : (uint16_t)0xffff);
}

/* Device addresses: each server hands out its own, and two servers may hand out the same one
   (every NumPy device starts at 2^57, every GPU's at what its driver picks). The program sees
   the k-th server's (from 0) moved up by k * 2^BF_ADDRESS_SHIFT, so one address names one
   allocation on one server, and the allocation table (which device an address is on) is never
   ambiguous. The first server's addresses are its own: a one-server lease sees exactly what the
   server hands out. */
static uint64_t address_offset(int dev) {
    return dev >= 0 && dev < bf_s.device_count ? (uint64_t)bf_s.grants[dev].conn << BF_ADDRESS_SHIFT
                                               : 0;
}

uint64_t bf_to_server(int dev, uint64_t address) { return address - address_offset(dev); }

int bf_from_server(int dev, uint64_t address, uint64_t *visible) {
    *visible = address + address_offset(dev);
    /* a server address at or above 2^BF_ADDRESS_SHIFT would land in the next server's window */
    return bf_s.conn_count > 1 && address >> BF_ADDRESS_SHIFT ? -1 : 0;
}

int bf_address_server(uint64_t address) {
    return bf_s.conn_count > 1 ? (int)(address >> BF_ADDRESS_SHIFT) : 0;
}

void out_dptr(bf_out *o, int dev, uint64_t address) { out_u64(o, bf_to_server(dev, address)); }

const char *bf_server_address(int dev) {
    bf_conn *c = conn_of(dev);
    return c ? c->address : "?";
}

int bf_device_lost(int dev) {
    bf_conn *c = conn_of(dev);
    return !c || __atomic_load_n(&c->lost, __ATOMIC_ACQUIRE);
}

int bf_all_lost(void) { return bf_s.conn_count > 0 && live_conns() == 0; }

uint64_t bf_max_payload(int dev) {
    bf_conn *c = conn_of(dev);
    return c && c->max_payload ? c->max_payload : 1;
}

const char *bf_server_id(int dev) {
    bf_conn *c = conn_of(dev);
    return c ? c->server_id : "";
}

int bf_server_of(int dev) {
    return dev >= 0 && dev < bf_s.device_count ? bf_s.grants[dev].conn : 0;
}

CUresult bf_call(int dev, uint8_t op, const bf_out *meta, const void *payload, uint64_t payload_n,
                 void *into, uint64_t into_n, uint8_t *reply, size_t *reply_n) {
    if (meta && meta->overflow)
        return CUDA_ERROR_INVALID_VALUE;
    bf_conn *c = conn_of(dev);
    if (!c)
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&c->lock);
    CUresult r = call_locked(c, op, meta, payload, payload_n, into, into_n, reply, reply_n);
    pthread_mutex_unlock(&c->lock);
    return r;
}

CUresult bf_post(int dev, uint8_t op, const bf_out *meta, const void *payload,
                 uint64_t payload_n) {
    if (meta && meta->overflow)
        return CUDA_ERROR_INVALID_VALUE;
    bf_conn *c = conn_of(dev);
    if (!c)
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&c->lock);
    CUresult r = CUDA_ERROR_DEVICE_UNAVAILABLE;
    if (!c->lost) {
        uint32_t id = take_id(c);
        c->recent[id % RECENT].id = id;
        c->recent[id % RECENT].op = op;
        r = send_frame(c, op, id, meta, payload, payload_n) < 0 ? CUDA_ERROR_DEVICE_UNAVAILABLE
                                                                : CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* -- opening the session -------------------------------------------------------------------- */
static int hex_value(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Whether the agent can speak to `address`: it speaks plain TCP only. Anything else (tls://,
   rdma://, a typo) is refused before any connection is made, naming the address and `where` it
   came from, so that the program never talks to something it did not mean to. */
static int tcp_address(const char *address, const char *where) {
    if (strncmp(address, "tcp://", 6) == 0)
        return 1;
    const char *why = "";
    if (strncmp(address, "tls://", 6) == 0)
        why = " (TLS is not supported by the agent yet)";
    else if (strncmp(address, "rdma://", 7) == 0)
        why = " (RDMA is not supported by the agent yet)";
    bf_log(1, "%s names the server %s: the agent speaks plain TCP only and needs a "
              "tcp://HOST:PORT server%s; no GPU is used (reserve the GPUs from servers that "
              "listen on tcp://)",
           where, address, why);
    return 0;
}

static int open_socket(const char *address) {
    char host[256];
    const char *rest = address + 6, *port;
    if (*rest == '[') { /* [IPv6]:port */
        const char *end = strchr(rest, ']');
        if (!end || end[1] != ':' || (size_t)(end - rest - 1) >= sizeof host) {
            bf_log(1, "%s is not a tcp://HOST:PORT address", address);
            return -1;
        }
        memcpy(host, rest + 1, (size_t)(end - rest - 1));
        host[end - rest - 1] = 0;
        port = end + 2;
    } else {
        const char *colon = strrchr(rest, ':');
        if (!colon || (size_t)(colon - rest) >= sizeof host) {
            bf_log(1, "the server address %s names no port", address);
            return -1;
        }
        memcpy(host, rest, (size_t)(colon - rest));
        host[colon - rest] = 0;
        port = colon + 1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *found, *a;
    int rc = getaddrinfo(host, port, &hints, &found);
    if (rc != 0) {
        bf_log(1, "cannot resolve %s: %s", address, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (a = found; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0) {
        bf_log(1, "cannot connect to %s: %s", address, strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const char *timeout = getenv("BITFUSION_NET_AGENT_TIMEOUT");
    if (timeout && atof(timeout) > 0) {
        double s = atof(timeout);
        struct timeval tv = {(time_t)s, (suseconds_t)((s - (double)(time_t)s) * 1e6)};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    return fd;
}

/* The grants of connection `c`'s HELLO/ATTACH reply become the program's next devices. */
static CUresult parse_hello_reply(bf_conn *c, int conn, const uint8_t *meta, size_t n) {
    bf_in in = {meta, n, 0, 0};
    (void)in_u64(&in); /* session id */
    c->max_payload = in_u64(&in);
    (void)in_u32(&in);
    uint32_t grants_n;
    const uint8_t *grants = in_bytes(&in, &grants_n);
    if (in.bad || in.at != n || c->max_payload == 0)
        return CUDA_ERROR_UNKNOWN;
    bf_in g = {grants, grants_n, 0, 0};
    c->first_device = bf_s.device_count;
    c->device_count = 0;
    while (g.at < g.n && !g.bad) {
        if (bf_s.device_count == BF_MAX_DEVICES) {
            bf_log(1, "the lease holds more than %d GPUs, the most the agent can use",
                   BF_MAX_DEVICES);
            return CUDA_ERROR_UNKNOWN;
        }
        bf_grant *d = &bf_s.grants[bf_s.device_count];
        memset(d, 0, sizeof *d);
        d->index = in_u16(&g);
        d->server_gpu = in_u16(&g);
        d->conn = conn;
        d->total_memory = in_u64(&g);
        d->memory_limit = in_u64(&g);
        d->fraction = in_f64(&g);
        (void)in_f64(&g); /* weight */
        (void)in_u8(&g);  /* mode */
        uint32_t len;
        const uint8_t *text = in_bytes(&g, &len);
        snprintf(d->name, sizeof d->name, "%.*s", (int)len, text ? (const char *)text : "");
        text = in_bytes(&g, &len);
        snprintf(d->executor, sizeof d->executor, "%.*s", (int)len, text ? (const char *)text : "");
        if (g.bad)
            break;
        bf_s.device_count++;
        c->device_count++;
    }
    return g.bad ? CUDA_ERROR_UNKNOWN : CUDA_SUCCESS;
}

/* Logging is set up when the library is loaded: cudart looks entry points up before cuInit. */
__attribute__((constructor)) static void read_log_level(void) {
    const char *level = getenv("BITFUSION_NET_AGENT_LOG");
    if (level)
        bf_log_level = atoi(level);
}

/* What one connection is opened with. */
typedef struct {
    const char *address, *reservation, *secret, *server_id, *token;
} bf_target;

/* Open connection number `k` to `t` (AUTHENTICATE if there is a token, then ATTACH to the
   reservation, or a HELLO of its own); bf_s.lock is held. */
static CUresult open_conn(int k, const bf_target *t) {
    bf_conn *c = &bf_s.conns[k];
    *c = (bf_conn){.fd = -1, .next_id = 1};
    pthread_mutex_init(&c->lock, NULL);
    snprintf(c->address, sizeof c->address, "%s", t->address);
    c->recent = calloc(BF_RECENT, sizeof *c->recent);
    c->meta = malloc(BF_MAX_METADATA);
    bf_s.conn_count = k + 1;
    if (!c->recent || !c->meta) {
        bf_log(1, "out of memory opening the session with %s", t->address);
        return CUDA_ERROR_NO_DEVICE;
    }
    c->fd = open_socket(t->address);
    if (c->fd < 0)
        return CUDA_ERROR_NO_DEVICE;
    static uint8_t buf[BF_MAX_METADATA], reply[BF_MAX_METADATA];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    CUresult r;
    if (t->token && *t->token) {
        out_bytes(&o, t->token, strlen(t->token));
        r = call_locked(c, OP_AUTHENTICATE, &o, NULL, 0, NULL, 0, reply, &reply_n);
        if (r != CUDA_SUCCESS) {
            bf_log(1, "the server %s refused the token: %s", t->address,
                   c->lost_reason[0] ? c->lost_reason : last_text);
            return CUDA_ERROR_NO_DEVICE;
        }
        o.n = 0;
    }
    const char *client = getenv("BITFUSION_NET_AGENT_CLIENT");
    if (!client)
        client = "libcuda agent";
    uint8_t op;
    if (t->reservation && *t->reservation) {
        uint8_t raw[128];
        size_t raw_n = 0;
        for (const char *p = t->secret ? t->secret : ""; p[0] && p[1] && raw_n < sizeof raw;
             p += 2) {
            int hi = hex_value(p[0]), lo = hex_value(p[1]);
            if (hi < 0 || lo < 0)
                break;
            raw[raw_n++] = (uint8_t)(hi << 4 | lo);
        }
        const char *id = t->server_id ? t->server_id : "";
        out_u64(&o, strtoull(t->reservation, NULL, 10));
        out_bytes(&o, raw, raw_n);
        out_bytes(&o, id, strlen(id));
        out_bytes(&o, client, strlen(client));
        op = OP_ATTACH;
        snprintf(c->server_id, sizeof c->server_id, "%s", id);
    } else {
        const char *gpus = getenv("BITFUSION_NET_AGENT_GPUS");
        const char *fraction = getenv("BITFUSION_NET_AGENT_FRACTION");
        const char *memory = getenv("BITFUSION_NET_AGENT_MEMORY");
        uint64_t bytes = memory ? strtoull(memory, NULL, 10) : 0;
        out_u16(&o, (uint16_t)(gpus ? atoi(gpus) : 1));
        out_f64(&o, bytes ? 0.0 : (fraction ? atof(fraction) : 1.0));
        out_u64(&o, bytes);
        out_f64(&o, 0.0);
        out_u8(&o, 0);
        out_bytes(&o, client, strlen(client));
        op = OP_HELLO;
    }
    r = call_locked(c, op, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r != CUDA_SUCCESS) {
        bf_log(1, "the server %s refused the session: %s", t->address,
               c->lost_reason[0] ? c->lost_reason : last_text);
        return CUDA_ERROR_NO_DEVICE;
    }
    if (parse_hello_reply(c, k, reply, reply_n) != CUDA_SUCCESS) {
        lose(c, "the server's %s reply is malformed", op == OP_HELLO ? "HELLO" : "ATTACH");
        bf_log(1, "the server %s: %s", t->address, c->lost_reason);
        return CUDA_ERROR_NO_DEVICE;
    }
    c->connected = 1;
    bf_log(2, "session open on %s: devices %d..%d, max payload %llu", t->address,
           c->first_device, c->first_device + c->device_count - 1,
           (unsigned long long)c->max_payload);
    return CUDA_SUCCESS;
}

/* Open the sessions named by the environment (docs/AGENT.md): BITFUSION_NET_AGENT_SERVER (a
   HELLO of its own, or an ATTACH with BITFUSION_NET_AGENT_RESERVATION/_SECRET/_SERVER_ID), else
   the reservation file BITFUSION_NET_LEASE that `bitfusion-net run` hands its command: an ATTACH
   to each of its servers, in the file's order, which is the order of the devices. */
static CUresult connect_locked(void) {
    static bf_lease lease;
    static bf_target targets[BF_MAX_SERVERS];
    static char reservation_text[BF_MAX_SERVERS][32];
    int count = 1;
    targets[0] = (bf_target){
        getenv("BITFUSION_NET_AGENT_SERVER"), getenv("BITFUSION_NET_AGENT_RESERVATION"),
        getenv("BITFUSION_NET_AGENT_SECRET"), getenv("BITFUSION_NET_AGENT_SERVER_ID"),
        getenv("BITFUSION_NET_TOKEN")};
    const char *where = "BITFUSION_NET_AGENT_SERVER";
    const char *lease_path = getenv("BITFUSION_NET_LEASE");
    char where_text[700];
    if ((!targets[0].address || !*targets[0].address) && lease_path && *lease_path) {
        char why[600];
        if (bf_read_lease(lease_path, &lease, why, sizeof why) < 0) {
            bf_log(1, "%s", why);
            return CUDA_ERROR_NO_DEVICE;
        }
        const char *token = lease.token[0] ? lease.token : targets[0].token;
        count = lease.servers;
        for (int k = 0; k < count; k++) {
            bf_lease_server *s = &lease.server[k];
            snprintf(reservation_text[k], sizeof reservation_text[k], "%llu",
                     (unsigned long long)s->reservation);
            /* the token the reservation was made with, as connect() */
            targets[k] = (bf_target){s->address, reservation_text[k], s->secret, s->server_id,
                                     token};
        }
        snprintf(where_text, sizeof where_text, "the reservation file %s", lease_path);
        where = where_text;
    }
    if (!targets[0].address || !*targets[0].address) {
        bf_log(1, "no server: run the program under 'bitfusion-net run -n 1 -- CMD', or set "
                  "BITFUSION_NET_LEASE or BITFUSION_NET_AGENT_SERVER=tcp://HOST:PORT");
        return CUDA_ERROR_NO_DEVICE;
    }
    /* every address first: a lease the agent cannot wholly use is refused before any
       connection, rather than giving the program some of its GPUs under other numbers */
    int usable = 1;
    for (int k = 0; k < count; k++)
        usable &= tcp_address(targets[k].address, where);
    if (!usable)
        return CUDA_ERROR_NO_DEVICE;
    for (int k = 0; k < count; k++) {
        CUresult r = open_conn(k, &targets[k]);
        if (r != CUDA_SUCCESS)
            return r;
    }
    if (count > 1)
        bf_log(2, "%d devices on %d servers", bf_s.device_count, count);
    return CUDA_SUCCESS;
}

CUresult bf_connect(void) {
    static CUresult result = CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&bf_s.lock);
    /* cuInit runs the handshakes once; a failed one is the answer from then on, as a driver
       that found no device keeps saying so. A lease is used whole or not at all: the
       connections opened before one failed are closed again. */
    static int tried;
    if (!tried) {
        tried = 1;
        result = connect_locked();
        if (result != CUDA_SUCCESS) {
            for (int k = 0; k < bf_s.conn_count; k++) {
                bf_conn *c = &bf_s.conns[k];
                if (c->fd >= 0)
                    close(c->fd);
                c->fd = -1;
                __atomic_store_n(&c->lost, 1, __ATOMIC_RELEASE);
            }
            bf_s.device_count = 0;
        }
    }
    pthread_mutex_unlock(&bf_s.lock);
    return result;
}
