/* The reservation file the agent reads (lease.c). */
#ifndef BF_LEASE_H
#define BF_LEASE_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char format[64];
    char token[1024];
    char address[512];
    char server_id[128];
    char secret[256]; /* hex */
    uint64_t reservation;
    int servers; /* how many servers the reservation spans (the agent uses the first) */
} bf_lease;

/* 0, or -1 with `why` saying what is wrong. */
int bf_read_lease(const char *path, bf_lease *out, char *why, size_t why_n);
#endif
