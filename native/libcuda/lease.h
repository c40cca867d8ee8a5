/* The reservation file the agent reads (lease.c). */
#ifndef BF_LEASE_H
#define BF_LEASE_H
#include <stddef.h>
#include <stdint.h>

#include "agent.h"

/* The part of the reservation on one server (bitfusion_net/client/lease.py ServerReservation). */
typedef struct {
    char address[512];
    char server_id[128];
    char secret[256]; /* hex */
    uint64_t reservation;
} bf_lease_server;

typedef struct {
    char format[64];
    char token[1024];
    int servers; /* how many servers the reservation spans, in the order of the devices */
    int too_many; /* it names more than BF_MAX_SERVERS */
    bf_lease_server server[BF_MAX_SERVERS];
} bf_lease;

/* 0, or -1 with `why` saying what is wrong. */
int bf_read_lease(const char *path, bf_lease *out, char *why, size_t why_n);
#endif
