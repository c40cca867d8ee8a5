/*
 * tcp_baseline: the C TCP baseline of perf/latency.py (ping-pong, bulk copies, pipelined posts).
 *
 * It speaks the tiny request protocol that perf/baselines.py's uvloop echo server also speaks, so
 * the two baselines measure the same thing. Every request starts with a 16-byte little-endian
 * header { u32 op; u32 reserved; u64 size }:
 *
 *   op 1 PING  `size` bytes follow; the server answers with the same `size` bytes (round trip)
 *   op 2 PUT   `size` bytes follow; the server reads them and answers 1 byte (like htod + sync)
 *   op 3 GET   nothing follows; the server answers `size` bytes (like dtoh)
 *   op 4 POST  `size` bytes follow; no answer (like a no-reply kernel launch)
 *
 * Build:   cc -O2 -o tcp_baseline native/tcp_baseline.c
 * Server:  tcp_baseline server [HOST [PORT]]       prints "listening on tcp://HOST:PORT"
 * Client:  tcp_baseline client HOST PORT OP SIZE COUNT [OP SIZE COUNT ...]
 *          OP is ping | put | get | post; prints one JSON line per (OP, SIZE, COUNT).
 *          ping/put/get: COUNT timed requests after COUNT/10 (at least 1) warm-up requests;
 *          latency percentiles by nearest rank. post: COUNT pipelined POSTs then one PING,
 *          best of three runs, as messages per second.
 *
 * The server forks a child per connection, so clients on several hosts can measure at once.
 * Nothing is checked beyond sizes: this is a measuring tool for trusted peers, not a service.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_PING = 1, OP_PUT = 2, OP_GET = 3, OP_POST = 4 };
#define HEADER_SIZE 16
#define CHUNK (4u << 20)

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t got = read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t put = write(fd, p, n);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return -1;
        p += put;
        n -= (size_t)put;
    }
    return 0;
}

/* Header and body in one gathered write (one syscall for a small request, as writelines does). */
static int writev_all(int fd, const void *head, size_t head_len, const void *body, size_t len) {
    struct iovec iov[2] = {{(void *)head, head_len}, {(void *)body, len}};
    int first = 0;
    while (first < 2) {
        ssize_t put = writev(fd, iov + first, 2 - first);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return -1;
        while (first < 2 && (size_t)put >= iov[first].iov_len) {
            put -= (ssize_t)iov[first].iov_len;
            first++;
        }
        if (first < 2) {
            iov[first].iov_base = (char *)iov[first].iov_base + put;
            iov[first].iov_len -= (size_t)put;
        }
    }
    return 0;
}

static void put_header(unsigned char *h, uint32_t op, uint64_t size) {
    memset(h, 0, HEADER_SIZE);
    for (int i = 0; i < 4; i++) h[i] = (unsigned char)(op >> (8 * i));
    for (int i = 0; i < 8; i++) h[8 + i] = (unsigned char)(size >> (8 * i));
}

static void get_header(const unsigned char *h, uint32_t *op, uint64_t *size) {
    *op = 0;
    *size = 0;
    for (int i = 0; i < 4; i++) *op |= (uint32_t)h[i] << (8 * i);
    for (int i = 0; i < 8; i++) *size |= (uint64_t)h[8 + i] << (8 * i);
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ---- server ------------------------------------------------------------------------------ */

static int discard(int fd, char *buf, uint64_t n) {
    while (n) {
        size_t take = n < CHUNK ? (size_t)n : CHUNK;
        ssize_t got = read(fd, buf, take);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        n -= (uint64_t)got;
    }
    return 0;
}

static void serve_connection(int fd) {
    char *buf = calloc(1, CHUNK);
    unsigned char header[HEADER_SIZE];
    if (!buf) die("calloc");
    set_nodelay(fd);
    for (;;) {
        uint32_t op;
        uint64_t size;
        if (read_all(fd, header, HEADER_SIZE)) break;
        get_header(header, &op, &size);
        if (op == OP_PING) {
            uint64_t left = size;
            while (left) { /* echo in chunks: a large ping is a bulk round trip */
                size_t take = left < CHUNK ? (size_t)left : CHUNK;
                if (read_all(fd, buf, take) || write_all(fd, buf, take)) goto done;
                left -= take;
            }
        } else if (op == OP_PUT || op == OP_POST) {
            if (discard(fd, buf, size)) break;
            if (op == OP_PUT && write_all(fd, "\1", 1)) break;
        } else if (op == OP_GET) {
            uint64_t left = size;
            while (left) {
                size_t take = left < CHUNK ? (size_t)left : CHUNK;
                if (write_all(fd, buf, take)) goto done;
                left -= take;
            }
        } else {
            fprintf(stderr, "tcp_baseline: unknown op %u\n", op);
            break;
        }
    }
done:
    free(buf);
    close(fd);
}

static int run_server(const char *host, const char *port) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) {
        fprintf(stderr, "tcp_baseline: %s\n", gai_strerror(rc));
        return 1;
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen)) die("bind");
    if (listen(fd, 16)) die("listen");
    struct sockaddr_storage bound;
    socklen_t len = sizeof bound;
    getsockname(fd, (struct sockaddr *)&bound, &len);
    char name[INET6_ADDRSTRLEN] = "?";
    int bound_port = 0;
    if (bound.ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&bound;
        inet_ntop(AF_INET, &in->sin_addr, name, sizeof name);
        bound_port = ntohs(in->sin_port);
        printf("listening on tcp://%s:%d\n", name, bound_port);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&bound;
        inet_ntop(AF_INET6, &in6->sin6_addr, name, sizeof name);
        bound_port = ntohs(in6->sin6_port);
        printf("listening on tcp://[%s]:%d\n", name, bound_port);
    }
    fflush(stdout);
    freeaddrinfo(ai);
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    for (;;) {
        int client = accept(fd, NULL, NULL);
        if (client < 0) {
            if (errno == EINTR) continue;
            die("accept");
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            serve_connection(client);
            _exit(0);
        }
        close(client);
    }
}

/* ---- client ------------------------------------------------------------------------------ */

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double nearest_rank(const double *sorted, size_t n, double q) {
    size_t rank = (size_t)ceil(q * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) {
        fprintf(stderr, "tcp_baseline: %s\n", gai_strerror(rc));
        exit(1);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) die("socket");
    if (connect(fd, ai->ai_addr, ai->ai_addrlen)) die("connect");
    freeaddrinfo(ai);
    set_nodelay(fd);
    return fd;
}

/* One request of `op` with `size` bytes; `msg` holds header + body (body only needed for ping). */
static void one_request(int fd, int op, uint64_t size, unsigned char *msg, char *data) {
    unsigned char header[HEADER_SIZE];
    char ack;
    switch (op) {
    case OP_PING: /* header and a small body in one write, as a request frame is */
        if (write_all(fd, msg, HEADER_SIZE + size) || read_all(fd, data, size)) die("ping");
        break;
    case OP_PUT:
        put_header(header, OP_PUT, size);
        if (writev_all(fd, header, HEADER_SIZE, data, size) || read_all(fd, &ack, 1))
            die("put");
        break;
    case OP_GET:
        put_header(header, OP_GET, size);
        if (write_all(fd, header, HEADER_SIZE) || read_all(fd, data, size)) die("get");
        break;
    }
}

static void measure_latency(int fd, const char *name, int op, uint64_t size, size_t count) {
    unsigned char *msg = NULL;
    char *data = malloc(size ? size : 1);
    double *samples = malloc(count * sizeof *samples);
    if (!data || !samples) die("malloc");
    memset(data, 1, size); /* touch the pages, as the Python side's arrays are */
    if (op == OP_PING) {
        msg = malloc(HEADER_SIZE + size);
        if (!msg) die("malloc");
        put_header(msg, OP_PING, size);
        memset(msg + HEADER_SIZE, 7, size);
    }
    size_t warmup = count / 10 ? count / 10 : 1;
    for (size_t i = 0; i < warmup; i++) one_request(fd, op, size, msg, data);
    double sum = 0;
    for (size_t i = 0; i < count; i++) {
        double t0 = now_s();
        one_request(fd, op, size, msg, data);
        samples[i] = now_s() - t0;
        sum += samples[i];
    }
    qsort(samples, count, sizeof *samples, compare_doubles);
    printf("{\"op\": \"%s\", \"size\": %llu, \"count\": %zu, \"p50_us\": %.3f, \"p99_us\": %.3f, "
           "\"p999_us\": %.3f, \"min_us\": %.3f, \"mean_us\": %.3f}\n",
           name, (unsigned long long)size, count, nearest_rank(samples, count, 0.5) * 1e6,
           nearest_rank(samples, count, 0.99) * 1e6, nearest_rank(samples, count, 0.999) * 1e6,
           samples[0] * 1e6, sum / (double)count * 1e6);
    fflush(stdout);
    free(msg);
    free(data);
    free(samples);
}

static void measure_posts(int fd, uint64_t size, size_t count) {
    size_t one = HEADER_SIZE + size;
    unsigned char *burst = malloc(one * count);
    unsigned char ping[HEADER_SIZE + 1];
    char echo;
    if (!burst) die("malloc");
    for (size_t i = 0; i < count; i++) {
        put_header(burst + i * one, OP_POST, size);
        memset(burst + i * one + HEADER_SIZE, 3, size);
    }
    put_header(ping, OP_PING, 1);
    ping[HEADER_SIZE] = 0;
    double best = 0;
    for (int run = 0; run < 4; run++) { /* the first run is a warm-up */
        double t0 = now_s();
        if (write_all(fd, burst, one * count) || write_all(fd, ping, sizeof ping) ||
            read_all(fd, &echo, 1))
            die("post");
        double rate = (double)count / (now_s() - t0);
        if (run > 0 && rate > best) best = rate;
    }
    printf("{\"op\": \"post\", \"size\": %llu, \"count\": %zu, \"per_second\": %.1f}\n",
           (unsigned long long)size, count, best);
    fflush(stdout);
    free(burst);
}

static int run_client(const char *host, const char *port, int argc, char **argv) {
    int fd = connect_to(host, port);
    for (int i = 0; i + 2 < argc; i += 3) {
        const char *name = argv[i];
        uint64_t size = strtoull(argv[i + 1], NULL, 10);
        size_t count = strtoull(argv[i + 2], NULL, 10);
        if (count < 1) count = 1;
        if (!strcmp(name, "ping")) measure_latency(fd, name, OP_PING, size, count);
        else if (!strcmp(name, "put")) measure_latency(fd, name, OP_PUT, size, count);
        else if (!strcmp(name, "get")) measure_latency(fd, name, OP_GET, size, count);
        else if (!strcmp(name, "post")) measure_posts(fd, size, count);
        else {
            fprintf(stderr, "tcp_baseline: unknown op %s\n", name);
            return 2;
        }
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "server"))
        return run_server(argc > 2 ? argv[2] : "127.0.0.1", argc > 3 ? argv[3] : "0");
    if (argc >= 7 && !strcmp(argv[1], "client") && (argc - 4) % 3 == 0)
        return run_client(argv[2], argv[3], argc - 4, argv + 4);
    fprintf(stderr,
            "usage: %s server [HOST [PORT]]\n"
            "       %s client HOST PORT OP SIZE COUNT [OP SIZE COUNT ...]\n"
            "       OP: ping | put | get | post\n",
            argv[0], argv[0]);
    return 2;
}
