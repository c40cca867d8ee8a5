/* Module images (images.c). */
#ifndef BF_IMAGES_H
#define BF_IMAGES_H
#include <stddef.h>

/* The image to send for `image` (a fatbinC wrapper is followed to its fatbin) and its size, as
   the driver sizes images; *is_ptx says it is PTX text. */
const void *bf_image(const void *image, size_t *size, int *is_ptx);
/* The kernels of an image and their argument types, as "name\0types\0...\0" (malloc'd; NULL if
   none could be read). Types "!" mark a kernel whose parameters have no protocol code. */
char *bf_image_kernels(const void *image, size_t size, int is_ptx);
/* A kernel's argument types from such a table: 0, -1 not in it, -2 not launchable. */
int bf_kernel_arg_types(const char *table, const char *kernel, char *out, size_t cap);
#endif
