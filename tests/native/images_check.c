/* The agent's image reader (native/libcuda/images.c) on its own: prints the kernel table it
 * reads from an image file (PTX, cubin or fatbin), then reads every truncation of the image
 * (each in a buffer of exactly its size, so that AddressSanitizer sees any read past it).
 *
 *   images_check FILE   ->  "name types" lines, "none" if no kernel could be read, then "ok"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "images.h"

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f)
        return 2;
    static unsigned char data[1 << 22];
    size_t n = fread(data, 1, sizeof data - 1, f);
    fclose(f);
    data[n] = 0;
    size_t size = 0;
    int is_ptx = 0;
    bf_image(data, &size, &is_ptx);
    char *table = bf_image_kernels(data, is_ptx ? n : size, is_ptx);
    if (!table)
        printf("none\n");
    for (const char *p = table; p && *p; p += strlen(p) + 1, p += strlen(p) + 1)
        printf("%s %s\n", p, p + strlen(p) + 1);
    free(table);
    for (size_t cut = 0; cut < n; cut++) {
        unsigned char *copy = malloc(cut + 1);
        memcpy(copy, data, cut);
        copy[cut] = 0; /* PTX is text: NUL-terminated as the driver requires */
        free(bf_image_kernels(copy, cut, is_ptx));
        free(copy);
    }
    printf("ok\n");
    return 0;
}
