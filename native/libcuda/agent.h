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

#define BF_MAX_SERVERS 16

/* One leased GPU, as the HELLO/ATTACH reply grants it. The program's device number is its place
   in bf_s.grants (the first server's GPUs, then the next server's, as the Python client numbers
   them); `index` is its number on its own server's connection (the `device` of requests). */
typedef struct {
    uint16_t index, server_gpu;
    int conn; /* which of bf_s.conns it is reached through */
    uint64_t total_memory, memory_limit;
    double fraction;
    char name[256];
    char executor[32];
    int attributes_known;
    int attributes[160]; /* by CUdevice_attribute number; -1: not reported by the server */
} bf_grant;

/* The opcodes of recent no-reply requests on one connection (request ids are per connection). */
#define BF_RECENT 4096
typedef struct {
    uint32_t id;
    uint8_t op;
} bf_recent;

/* One server's connection: its own lock, request ids, sticky errors and fate. Calls on the
   devices of different servers run in parallel; calls on one connection one at a time. */
typedef struct {
    pthread_mutex_t lock; /* one call on the connection at a time (the blocking client's rule) */
    int fd;
    int connected; /* the session is open */
    int lost;      /* gone: calls on its devices answer CUDA_ERROR_DEVICE_UNAVAILABLE (atomic) */
    uint32_t next_id;
    uint64_t max_payload;
    int first_device, device_count; /* its devices are first_device .. first_device+count-1 */
    char address[512];
    char server_id[128];
    char lost_reason[512];
    bf_recent *recent; /* BF_RECENT entries */
    uint8_t *meta;     /* BF_MAX_METADATA: the reply being read */
} bf_conn;

typedef struct {
    pthread_mutex_t lock; /* held while cuInit opens the connections */
    int conn_count;
    bf_conn conns[BF_MAX_SERVERS];
    int device_count;
    bf_grant grants[BF_MAX_DEVICES];
} bf_session;

extern bf_session bf_s;

/* Logging: level from BITFUSION_NET_AGENT_LOG (0 quiet, 1 problems [default], 2 every call). */
extern int bf_log_level;
void bf_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The session: connect (once, from cuInit), calls with and without replies. A call goes to the
   connection of device `dev` (a program's device number) and takes that connection's lock; its
   metadata names the device with out_device(), which writes the device's number on its server. */
CUresult bf_connect(void);
void out_device(bf_out *o, int dev);
/* A request with a reply: its metadata is copied to reply[0..*reply_n) (cap BF_MAX_METADATA);
   a reply payload lands in `into` (exactly into_n bytes). */
CUresult bf_call(int dev, uint8_t op, const bf_out *meta, const void *payload, uint64_t payload_n,
                 void *into, uint64_t into_n, uint8_t *reply, size_t *reply_n);
/* A no-reply request (pipelined: nothing is read; its failure surfaces at a later call). */
CUresult bf_post(int dev, uint8_t op, const bf_out *meta, const void *payload,
                 uint64_t payload_n);
/* Device addresses as the program sees them and as device `dev`'s server does (wire.c): the
   k-th server's are moved up by k << BF_ADDRESS_SHIFT. bf_from_server fails (-1) for a server
   address that cannot be moved so; bf_address_server is the server an address's window is. */
#define BF_ADDRESS_SHIFT 58
uint64_t bf_to_server(int dev, uint64_t address);
int bf_from_server(int dev, uint64_t address, uint64_t *visible);
int bf_address_server(uint64_t address);
void out_dptr(bf_out *o, int dev, uint64_t address);
const char *bf_server_address(int dev);
/* Whether device `dev`'s server has gone; whether every server has. */
int bf_device_lost(int dev);
int bf_all_lost(void);
/* The largest payload one frame to device `dev`'s server may carry. */
uint64_t bf_max_payload(int dev);
/* The server a device is on (its instance id; its place in the lease, from 0). */
const char *bf_server_id(int dev);
int bf_server_of(int dev);
/* The server's text for the last failed call on this thread (for logs). */
const char *bf_last_error_text(void);

#endif
