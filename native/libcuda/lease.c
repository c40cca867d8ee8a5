/* The reservation file `bitfusion-net run` and `request_gpus` write (BITFUSION_NET_LEASE;
 * bitfusion_net/client/lease.py): the agent reads the address, server id, reservation id and
 * secret of each of its servers, and the token, from it, so the secret travels in a file only its
 * owner can read and never in the environment.
 *
 * A small strict JSON reader: it walks the whole document (strings with their escapes, numbers,
 * literals, nesting) and keeps the few fields it needs; anything malformed is refused.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "lease.h"

typedef struct {
    const char *p, *end;
    int bad;
    bf_lease *out;
} reader;

static void space(reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t'))
        r->p++;
}

static int eat(reader *r, char c) {
    space(r);
    if (r->p < r->end && *r->p == c) {
        r->p++;
        return 1;
    }
    return 0;
}

/* A string into dst (cap bytes, NUL-terminated; NULL: skipped). \uXXXX beyond ASCII is kept
   as '?': none of the fields the agent reads holds one. */
static void string(reader *r, char *dst, size_t cap) {
    size_t n = 0;
    if (!eat(r, '"')) {
        r->bad = 1;
        return;
    }
    while (r->p < r->end && *r->p != '"') {
        char c = *r->p++;
        if (c == '\\') {
            if (r->p >= r->end) {
                r->bad = 1;
                return;
            }
            char e = *r->p++;
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': {
                if (r->end - r->p < 4) {
                    r->bad = 1;
                    return;
                }
                char hex[5] = {r->p[0], r->p[1], r->p[2], r->p[3], 0};
                long v = strtol(hex, NULL, 16);
                c = v < 0x80 ? (char)v : '?';
                r->p += 4;
                break;
            }
            default: c = e; break; /* \" \\ \/ */
            }
        }
        if (dst && n + 1 < cap)
            dst[n++] = c;
    }
    if (!eat(r, '"'))
        r->bad = 1;
    if (dst && cap)
        dst[n] = 0;
}

static void value(reader *r, int depth, const char *path);

static void object(reader *r, int depth, const char *path) {
    if (!eat(r, '{')) {
        r->bad = 1;
        return;
    }
    if (eat(r, '}'))
        return;
    do {
        char key[64];
        string(r, key, sizeof key);
        if (r->bad || !eat(r, ':')) {
            r->bad = 1;
            return;
        }
        char sub[160];
        snprintf(sub, sizeof sub, "%s/%s", path, key);
        value(r, depth + 1, sub);
    } while (!r->bad && eat(r, ','));
    if (!eat(r, '}'))
        r->bad = 1;
}

/* The server entry a path is a field of ("/servers/N/FIELD"): N, with *field pointing at FIELD;
   -1 if it is no such path. */
static int server_field(reader *r, const char *path, const char **field) {
    if (strncmp(path, "/servers/", 9) != 0)
        return -1;
    char *end;
    long n = strtol(path + 9, &end, 10);
    if (end == path + 9 || *end != '/' || n < 0 || strchr(end + 1, '/'))
        return -1;
    bf_lease *l = r->out;
    if (n >= BF_MAX_SERVERS) {
        l->too_many = 1;
        return -1;
    }
    if (n + 1 > l->servers)
        l->servers = (int)n + 1;
    *field = end + 1;
    return (int)n;
}

static void value(reader *r, int depth, const char *path) {
    bf_lease *l = r->out;
    space(r);
    if (depth > 32 || r->p >= r->end) {
        r->bad = 1;
        return;
    }
    char c = *r->p;
    if (c == '{') {
        object(r, depth, path);
    } else if (c == '[') {
        r->p++;
        int index = 0;
        if (eat(r, ']'))
            return;
        do {
            char sub[176];
            snprintf(sub, sizeof sub, "%s/%d", path, index++);
            value(r, depth + 1, sub);
        } while (!r->bad && eat(r, ','));
        if (!eat(r, ']'))
            r->bad = 1;
    } else if (c == '"') {
        char *dst = NULL;
        size_t cap = 0;
        const char *field = NULL;
        int k = server_field(r, path, &field);
        if (strcmp(path, "/format") == 0)
            dst = l->format, cap = sizeof l->format;
        else if (strcmp(path, "/token") == 0)
            dst = l->token, cap = sizeof l->token;
        else if (k >= 0 && strcmp(field, "address") == 0)
            dst = l->server[k].address, cap = sizeof l->server[k].address;
        else if (k >= 0 && strcmp(field, "server_id") == 0)
            dst = l->server[k].server_id, cap = sizeof l->server[k].server_id;
        else if (k >= 0 && strcmp(field, "secret") == 0)
            dst = l->server[k].secret, cap = sizeof l->server[k].secret;
        string(r, dst, cap);
    } else {
        const char *start = r->p;
        while (r->p < r->end && strchr("+-.0123456789eEtruefalsn", *r->p))
            r->p++;
        if (r->p == start) {
            r->bad = 1;
            return;
        }
        const char *field = NULL;
        int k = server_field(r, path, &field);
        if (k >= 0 && strcmp(field, "reservation") == 0) {
            char number[32];
            snprintf(number, sizeof number, "%.*s", (int)(r->p - start), start);
            l->server[k].reservation = strtoull(number, NULL, 10);
        }
    }
}

int bf_read_lease(const char *path, bf_lease *out, char *why, size_t why_n) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(why, why_n, "cannot read the reservation file %s", path);
        return -1;
    }
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text, f);
    fclose(f);
    reader r = {text, text + n, 0, out};
    value(&r, 0, "");
    space(&r);
    int complete = out->servers > 0;
    for (int k = 0; k < out->servers && k < BF_MAX_SERVERS; k++)
        complete &= out->server[k].address[0] && out->server[k].reservation;
    if (r.bad || r.p != r.end || strcmp(out->format, "bitfusion-net reservation 1") != 0 ||
        !complete) {
        snprintf(why, why_n, "%s is not a bitfusion-net reservation file", path);
        return -1;
    }
    if (out->too_many) {
        snprintf(why, why_n, "%s: the reservation spans more than %d servers, the most the agent "
                 "can use", path, BF_MAX_SERVERS);
        return -1;
    }
    return 0;
}
