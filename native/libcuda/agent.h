/* bitfusion-net's libcuda.so.1 stand-in: what its modules share (docs/AGENT.md). */
#ifndef BF_AGENT_H
#define BF_AGENT_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

#include "entry_points.h"

/* Opcodes of docs/PROTOCOL.md section 6. */
enum {
    OP_HELLO = 0x01, OP_ERROR = 0x02, OP_KEEPALIVE = 0x03, OP_ATTACH = 0x05,
    OP_AUTHENTICATE = 0x08,
    OP_MEM_ALLOC = 0x10, OP_MEM_FREE = 0x11, OP_MEM_GET_INFO = 0x12, OP_MEMCPY_HTOD = 0x13,
    OP_MEMCPY_DTOH = 0x14, OP_MEMCPY_DTOD = 0x15, OP_MEMSET = 0x16, OP_SYNCHRONIZE = 0x17,
    OP_DEVICE_ATTRIBUTES = 0x19,
    OP_MODULE_LOAD = 0x20, OP_MODULE_UNLOAD = 0x21, OP_GET_FUNCTION = 0x22, OP_LAUNCH = 0x23,
    OP_MODULE_GET_GLOBAL = 0x24,
    OP_STREAM_CREATE = 0x30, OP_STREAM_DESTROY = 0x31, OP_STREAM_SYNCHRONIZE = 0x32,
    OP_STREAM_QUERY = 0x33, OP_STREAM_WAIT_EVENT = 0x34,
    OP_EVENT_CREATE = 0x38, OP_EVENT_DESTROY = 0x39, OP_EVENT_RECORD = 0x3A,
    OP_EVENT_SYNCHRONIZE = 0x3B, OP_EVENT_ELAPSED = 0x3C, OP_EVENT_QUERY = 0x3D,
};

/* Error codes of docs/PROTOCOL.md section 9.2. */
enum {
    E_PROTOCOL = 1, E_OUT_OF_MEMORY = 2, E_CAPACITY = 3, E_INVALID_HANDLE = 4,
    E_INVALID_VALUE = 5, E_KERNEL = 6, E_UNSUPPORTED = 7, E_INTERNAL = 8, E_LEASE_ENDED = 9,
    E_AUTH = 10, E_QUOTA = 11,
};

#define BF_MAX_METADATA 65536u
#define BF_MAX_DEVICES 64

/* Metadata being built: little-endian, no padding (PROTOCOL.md section 4). */
typedef struct {
    uint8_t *p;
    size_t n, cap;
    int overflow;
} bf_out;

void out_u8(bf_out *o, uint8_t v);
void out_u16(bf_out *o, uint16_t v);
void out_u32(bf_out *o, uint32_t v);
void out_u64(bf_out *o, uint64_t v);
void out_f64(bf_out *o, double v);
void out_bytes(bf_out *o, const void *data, size_t n); /* u32 length, then the bytes */
void out_raw(bf_out *o, const void *data, size_t n);

/* Metadata being read; a short read sets `bad`. */
typedef struct {
    const uint8_t *p;
    size_t n, at;
    int bad;
} bf_in;

uint8_t in_u8(bf_in *i);
uint16_t in_u16(bf_in *i);
uint32_t in_u32(bf_in *i);
uint64_t in_u64(bf_in *i);
double in_f64(bf_in *i);
const uint8_t *in_bytes(bf_in *i, uint32_t *n);

/* One leased GPU, as the HELLO/ATTACH reply grants it. */
typedef struct {
    uint16_t index, server_gpu;
    uint64_t total_memory, memory_limit;
    double fraction;
    char name[256];
    char executor[32];
    int attributes_known;
    int attributes[160]; /* by CUdevice_attribute number; -1: not reported by the server */
} bf_grant;

typedef struct {
    pthread_mutex_t lock; /* one call on the connection at a time (the blocking client's rule) */
    int fd;
    int connected; /* the session is open */
    int lost;      /* the connection has gone: every call answers CUDA_ERROR_DEVICE_UNAVAILABLE */
    uint32_t next_id;
    uint64_t max_payload;
    int device_count;
    bf_grant grants[BF_MAX_DEVICES];
    char server_id[64];
    char lost_reason[512];
} bf_session;

extern bf_session bf_s;

/* Logging: level from BITFUSION_NET_AGENT_LOG (0 quiet, 1 problems [default], 2 every call). */
extern int bf_log_level;
void bf_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The session: connect (once, from cuInit), calls with and without replies. All take bf_s.lock. */
CUresult bf_connect(void);
/* A request with a reply: its metadata is copied to reply[0..*reply_n) (cap BF_MAX_METADATA);
   a reply payload lands in `into` (exactly into_n bytes). */
CUresult bf_call(uint8_t op, const bf_out *meta, const void *payload, uint64_t payload_n,
                 void *into, uint64_t into_n, uint8_t *reply, size_t *reply_n);
/* A no-reply request (pipelined: nothing is read; its failure surfaces at a later call). */
CUresult bf_post(uint8_t op, const bf_out *meta, const void *payload, uint64_t payload_n);
/* The server's text for the last failed call on this thread (for logs). */
const char *bf_last_error_text(void);

#endif
