/* Minimal binary PPM (P6, 8-bit RGB) reading and writing for the examples: no image library
 * needed. Not part of the sdstream API. */
#ifndef SDS_EXAMPLE_PPM_H
#define SDS_EXAMPLE_PPM_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Reads a P6 file with maxval 255; returns malloc'ed RGB8 rows (free() them) or NULL. */
static inline uint8_t *ppm_read(const char *path, uint32_t *width, uint32_t *height) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned w = 0, h = 0, maxval = 0;
    uint8_t *data = NULL;
    if (fscanf(f, "P6 %u %u %u", &w, &h, &maxval) == 3 && maxval == 255 && w > 0 && h > 0 &&
        fgetc(f) != EOF) {
        size_t size = (size_t)w * h * 3;
        data = (uint8_t *)malloc(size);
        if (data && fread(data, 1, size, f) != size) {
            free(data);
            data = NULL;
        }
    }
    fclose(f);
    if (data) {
        *width = w;
        *height = h;
    }
    return data;
}

/* Writes RGB8 rows `stride` bytes apart as P6; returns 0 on success. */
static inline int ppm_write(const char *path, const uint8_t *rgb, uint32_t width, uint32_t height,
                     size_t stride) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fprintf(f, "P6\n%u %u\n255\n", width, height) > 0;
    for (uint32_t y = 0; ok && y < height; y++)
        ok = fwrite(rgb + y * stride, 1, (size_t)width * 3, f) == (size_t)width * 3;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

#endif
