/* Module images as the driver takes them: a pointer with no size. The size is read from the
 * image itself, as the driver (and LUPINE's lupine_pack_module_image) does:
 *
 *   fatbinC wrapper (0x466243b1)  follow its pointer to the fatbin
 *   fatbin (0xBA55ED50)           header_size + files_size
 *   ELF64 (a cubin)               the furthest end of any header, section or segment
 *   anything else                 PTX text: strlen + 1
 *
 * and each PTX kernel's parameter types are read from its .entry line, so a launch can be
 * packed as the protocol wants it (PROTOCOL.md section 7) and the server can check it.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <stddef.h>

#include "images.h"

static uint64_t rd(const uint8_t *p, int n) {
    uint64_t v = 0;
    memcpy(&v, p, (size_t)n);
    return v;
}

const void *bf_image(const void *image, size_t *size, int *is_ptx) {
    const uint8_t *p = image;
    *is_ptx = 0;
    uint32_t magic = (uint32_t)rd(p, 4);
    if (magic == 0x466243b1u) { /* __fatBinC_Wrapper_t: magic, version, data, filename */
        const void *data;
        memcpy(&data, p + 8, sizeof data);
        if (!data)
            return *size = 0, image;
        return bf_image(data, size, is_ptx);
    }
    if (magic == 0xBA55ED50u) {
        *size = (size_t)(rd(p + 6, 2) + rd(p + 8, 8));
        return image;
    }
    if (memcmp(p, "\x7f" "ELF", 4) == 0 && p[4] == 2) {
        uint64_t phoff = rd(p + 0x20, 8), shoff = rd(p + 0x28, 8);
        uint64_t phentsize = rd(p + 0x36, 2), phnum = rd(p + 0x38, 2);
        uint64_t shentsize = rd(p + 0x3a, 2), shnum = rd(p + 0x3c, 2);
        uint64_t end = 0x40;
        if (phoff + phnum * phentsize > end)
            end = phoff + phnum * phentsize;
        if (shoff + shnum * shentsize > end)
            end = shoff + shnum * shentsize;
        for (uint64_t i = 0; i < shnum; i++) {
            const uint8_t *sh = p + shoff + i * shentsize;
            if (rd(sh + 4, 4) == 8) /* SHT_NOBITS: no bytes in the file */
                continue;
            if (rd(sh + 0x18, 8) + rd(sh + 0x20, 8) > end)
                end = rd(sh + 0x18, 8) + rd(sh + 0x20, 8);
        }
        for (uint64_t i = 0; i < phnum; i++) {
            const uint8_t *ph = p + phoff + i * phentsize;
            if (rd(ph + 8, 8) + rd(ph + 0x20, 8) > end)
                end = rd(ph + 8, 8) + rd(ph + 0x20, 8);
        }
        *size = (size_t)end;
        return image;
    }
    *is_ptx = 1;
    *size = strlen(image) + 1;
    return image;
}

static const char *skip_space(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* The protocol's code for a PTX parameter type (.u64 pointers are 'Q': 8 bytes either way). */
static char code_for(const char *type, size_t n) {
    static const struct { const char *ptx; char code; } map[] = {
        {".u8", 'B'},  {".s8", 'b'},  {".b8", 'B'},  {".u16", 'H'}, {".s16", 'h'}, {".b16", 'H'},
        {".u32", 'I'}, {".s32", 'i'}, {".b32", 'I'}, {".u64", 'Q'}, {".s64", 'q'}, {".b64", 'Q'},
        {".f32", 'f'}, {".f64", 'd'},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strlen(map[i].ptx) == n && strncmp(type, map[i].ptx, n) == 0)
            return map[i].code;
    return 0;
}

/* One .entry at `p` (just after ".entry"): appends "name\0types\0" to the table; returns where
   parsing goes on, or NULL at the end. A parameter with no protocol code (a struct passed by
   value as .b8 name[N]) gives the kernel the types "!" (known, not launchable). */
static int table_add(char **table, size_t *n, size_t *cap, const char *name, size_t name_n,
                     const char *types) {
    size_t need = name_n + 1 + strlen(types) + 1;
    if (*n + need + 1 > *cap) {
        size_t grown = (*cap + need + 1) * 2;
        char *t = realloc(*table, grown);
        if (!t)
            return -1;
        *table = t;
        *cap = grown;
    }
    memcpy(*table + *n, name, name_n);
    (*table)[*n + name_n] = 0;
    strcpy(*table + *n + name_n + 1, types);
    *n += need;
    (*table)[*n] = 0; /* the table ends with an empty name */
    return 0;
}

static void ptx_kernels(const char *ptx, const char *end, char **table, size_t *n, size_t *cap) {
    for (const char *p = ptx; p && p < end; ) {
        const char *entry = memmem(p, (size_t)(end - p), ".entry", 6);
        if (!entry)
            return;
        const char *name = skip_space(entry + 6);
        const char *name_end = name;
        while (name_end < end && (isalnum((unsigned char)*name_end) || *name_end == '_' ||
                                  *name_end == '$' || *name_end == '.'))
            name_end++;
        const char *q = skip_space(name_end);
        p = name_end;
        if (name_end == name || q >= end || (*q != '(' && *q != '{'))
            continue;
        char types[1024];
        size_t count = 0;
        int unusable = 0;
        if (*q == '(') {
            const char *close = memchr(q, ')', (size_t)(end - q));
            if (!close)
                return;
            for (const char *param = q; param < close;) {
                const char *found = memmem(param, (size_t)(close - param), ".param", 6);
                if (!found)
                    break;
                const char *stop = found + 6;
                while (stop < close && *stop != ',')
                    stop++;
                char code = 0;
                for (const char *t = found + 6; t < stop; t++) {
                    if (*t == '[')
                        unusable = 1;
                    if (*t == '.' && !code) {
                        size_t len = 1;
                        while (t + len < stop && ((t[len] >= 'a' && t[len] <= 'z') ||
                                                  (t[len] >= '0' && t[len] <= '9')))
                            len++;
                        code = code_for(t, len);
                    }
                }
                if (!code)
                    unusable = 1;
                if (count + 1 < sizeof types)
                    types[count++] = code ? code : '!';
                param = stop;
            }
            p = close;
        }
        types[count] = 0;
        if (unusable)
            strcpy(types, "!");
        if (table_add(table, n, cap, name, (size_t)(name_end - name), types) < 0)
            return;
    }
}

/* A cubin's kernels: each `.nv.info.<kernel>` section's EIATTR_KPARAM_INFO records (attribute
   0x17: ordinal, offset, and the size in bits 18-31 of its last word) give the parameters'
   sizes, which is all a launch needs (PROTOCOL.md packs bytes; a float is an 'I' of the same
   size here). Every read is bounds-checked: a malformed image gives no kernels, not a crash. */
static void cubin_kernels(const uint8_t *elf, size_t size, char **table, size_t *n,
                          size_t *cap) {
    if (size < 0x40 || memcmp(elf, "\x7f" "ELF", 4) != 0 || elf[4] != 2)
        return;
    uint64_t shoff = rd(elf + 0x28, 8), shentsize = rd(elf + 0x3a, 2), shnum = rd(elf + 0x3c, 2);
    uint64_t shstrndx = rd(elf + 0x3e, 2);
    if (shentsize < 0x40 || shstrndx >= shnum || shoff > size || shnum * shentsize > size - shoff)
        return;
    const uint8_t *strtab_header = elf + shoff + shstrndx * shentsize;
    uint64_t stroff = rd(strtab_header + 0x18, 8), strsize = rd(strtab_header + 0x20, 8);
    if (stroff > size || strsize > size - stroff)
        return;
    for (uint64_t i = 0; i < shnum; i++) {
        const uint8_t *sh = elf + shoff + i * shentsize;
        uint64_t name_at = rd(sh, 4), off = rd(sh + 0x18, 8), len = rd(sh + 0x20, 8);
        if (name_at >= strsize || off > size || len > size - off)
            continue;
        const char *name = (const char *)elf + stroff + name_at;
        size_t name_n = strnlen(name, (size_t)(strsize - name_at));
        if (name_n <= 9 || strncmp(name, ".nv.info.", 9) != 0 || name_at + name_n >= strsize)
            continue;
        int sizes[256], offsets[256], count = 0, unusable = 0;
        for (uint64_t p = off; p + 4 <= off + len;) {
            uint8_t format = elf[p], attr = elf[p + 1];
            if (format != 4) { /* no value, a byte or a half: four bytes in all */
                p += 4;
                continue;
            }
            uint64_t value_n = rd(elf + p + 2, 2);
            if (p + 4 + value_n > off + len)
                break;
            if (attr == 0x17 && value_n >= 12) {
                uint64_t ordinal = rd(elf + p + 8, 2), offset = rd(elf + p + 10, 2);
                uint64_t bytes = (rd(elf + p + 12, 4) >> 18) & 0x3fff;
                if (ordinal < 256) {
                    while (count <= (int)ordinal) {
                        offsets[count] = -1;
                        sizes[count++] = 0;
                    }
                    sizes[ordinal] = (int)bytes;
                    offsets[ordinal] = (int)offset;
                } else {
                    unusable = 1;
                }
            }
            p += 4 + value_n;
        }
        char types[257];
        int natural = 0;
        for (int k = 0; k < count; k++) {
            int b = sizes[k];
            types[k] = b == 1 ? 'B' : b == 2 ? 'H' : b == 4 ? 'I' : b == 8 ? 'Q' : '!';
            if (types[k] == '!')
                unusable = 1; /* a struct by value: no protocol argument code */
            else
                natural = (natural + b - 1) / b * b;
            /* the agent lays parameters out at their natural alignment (cuFuncGetParamInfo,
               `extra` launches): a struct of 1, 2, 4 or 8 bytes aligned otherwise is refused
               rather than packed from the wrong place */
            if (offsets[k] != natural)
                unusable = 1;
            natural += b;
        }
        types[count] = 0;
        if (unusable)
            strcpy(types, "!");
        if (table_add(table, n, cap, name + 9, name_n - 9, types) < 0)
            return;
    }
}

/* A fatbin entry's payload, zstd-decompressed (nvcc 13 compresses PTX by default, and cubins too
   with -Xfatbin -compress-all: flag 0x8000), through the system's libzstd.so.1 where there is
   one; NULL if it is not compressed that way or cannot be decompressed. */
#define FATBIN_ZSTD 0x8000u
static uint8_t *zstd_payload(const uint8_t *entry, uint64_t header, const uint8_t *payload,
                             uint64_t body, size_t *out_n) {
    if (header < 0x40 || !(rd(entry + 0x28, 8) & FATBIN_ZSTD) || body < 4 ||
        memcmp(payload, "\x28\xb5\x2f\xfd", 4) != 0)
        return NULL;
    uint64_t compressed = rd(entry + 0x10, 4), plain = rd(entry + 0x38, 8);
    if (compressed > body || plain == 0 || plain > (64u << 20))
        return NULL;
    static size_t (*decompress)(void *, size_t, const void *, size_t);
    static unsigned (*is_error)(size_t);
    static int tried;
    if (!tried) { /* once; the agent needs libzstd only for these images */
        tried = 1;
        void *zstd = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
        if (zstd) {
            *(void **)&decompress = dlsym(zstd, "ZSTD_decompress");
            *(void **)&is_error = dlsym(zstd, "ZSTD_isError");
        }
    }
    if (!decompress || !is_error)
        return NULL;
    uint8_t *out = malloc((size_t)plain + 1);
    if (!out)
        return NULL;
    size_t got = decompress(out, (size_t)plain, payload, (size_t)compressed);
    if (is_error(got) || got > plain) {
        free(out);
        return NULL;
    }
    out[got] = 0; /* PTX is read as text */
    *out_n = got;
    return out;
}

char *bf_image_kernels(const void *image, size_t size, int is_ptx) {
    char *table = NULL;
    size_t n = 0, cap = 0;
    const uint8_t *p = image;
    if (is_ptx) {
        ptx_kernels(image, (const char *)image + strlen(image), &table, &n, &cap);
    } else if (size >= 16 && rd(p, 4) == 0xBA55ED50u) {
        /* a fatbin: entries of (kind, header size, payload size) after its header; the cubins
           (kind 2) first, else the PTX (kind 1), each as stored or zstd-decompressed */
        uint64_t at = rd(p + 6, 2), end = at + rd(p + 8, 8);
        if (end > size)
            end = size;
        for (int pass = 0; pass < 2 && !n; pass++)
            for (uint64_t e = at; e + 16 <= end;) {
                uint64_t kind = rd(p + e, 2), header = rd(p + e + 4, 4), body = rd(p + e + 8, 8);
                if (header < 16 || header > end - e || body > end - e - header)
                    break;
                const uint8_t *payload = p + e + header;
                size_t plain_n = 0;
                uint8_t *plain = (pass == 0 && kind == 2) || (pass == 1 && kind == 1)
                                     ? zstd_payload(p + e, header, payload, body, &plain_n)
                                     : NULL;
                const uint8_t *data = plain ? plain : payload;
                uint64_t data_n = plain ? plain_n : body;
                if (pass == 0 && kind == 2)
                    cubin_kernels(data, data_n, &table, &n, &cap);
                else if (pass == 1 && kind == 1 && data_n > 8 && memchr(data, 0, data_n) &&
                         memmem(data, data_n, ".version", 8))
                    ptx_kernels((const char *)data, (const char *)data + strlen((const char *)data),
                                &table, &n, &cap);
                free(plain);
                e += header + body;
            }
    } else {
        cubin_kernels(image, size, &table, &n, &cap);
    }
    return table;
}

int bf_kernel_arg_types(const char *table, const char *kernel, char *out, size_t cap) {
    for (const char *p = table; p && *p; p += strlen(p) + 1, p += strlen(p) + 1) {
        if (strcmp(p, kernel) != 0)
            continue;
        const char *types = p + strlen(p) + 1;
        if (strcmp(types, "!") == 0)
            return -2;
        if (strlen(types) + 1 > cap)
            return -2;
        strcpy(out, types);
        return 0;
    }
    return -1;
}
