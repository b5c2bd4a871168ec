/* Exercises the sds_processor_* functions of include/sdstream.h from C: NULL and invalid
 * arguments, unknown and refused processors, bad JSON, buffers too small, a model-based
 * processor (HED) and a temporal one (temporal_net_tensorrt, 6 channels) on real frames.
 *
 *   processor_test MODEL_ROOT FRAME_A.ppm FRAME_B.ppm OUT_DIR
 *
 * MODEL_ROOT holds the tiny processor networks under their ids (tests/fixtures/model-root).
 * OUT_DIR receives hed.raw (HED of FRAME_A), temporal_0.raw and temporal_1.raw (the TemporalNet
 * image of FRAME_A, then of FRAME_B after it): width * height * channels bytes each, which
 * ffi/tests/c_api.rs compares with sdstream::ImageProcessor on the same frames.
 *
 * Prints one line per failed check and a summary; exit status 0 when every check passed. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdstream.h"
#include "../../../examples/c/ppm.h"

static int checks = 0, failures = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        checks++;                                                                       \
        if (!(cond)) {                                                                  \
            failures++;                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,     \
                    __LINE__, #cond, sds_last_error());                                 \
        }                                                                               \
    } while (0)

/* Whether the thread's last error contains `needle` (NULL: no requirement). */
static int message_has(const char *needle) {
    return needle == NULL || strstr(sds_last_error(), needle) != NULL;
}

/* A call must return `want`; on failure its message must contain `needle` (if not NULL). */
#define EXPECT(call, want, needle)                                                      \
    do {                                                                                \
        SdsStatus got_ = (call);                                                        \
        checks++;                                                                       \
        if (got_ != (want)) {                                                           \
            failures++;                                                                 \
            fprintf(stderr, "%s:%d: %s returned %d, expected %d (%s): %s\n", __FILE__,  \
                    __LINE__, #call, (int)got_, (int)(want), #want, sds_last_error());  \
        } else if (!message_has(needle)) {                                              \
            failures++;                                                                 \
            fprintf(stderr, "%s:%d: %s: message \"%s\" lacks \"%s\"\n", __FILE__,       \
                    __LINE__, #call, sds_last_error(), (const char *)(needle));         \
        }                                                                               \
    } while (0)

static int write_raw(const char *dir, const char *name, const uint8_t *data, size_t size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(data, 1, size, f) == size;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

static SdsControlOutput output_to(uint8_t *data, size_t capacity) {
    SdsControlOutput out;
    memset(&out, 0xAB, sizeof out); /* garbage in the out-fields must not matter */
    out.data = data;
    out.capacity = capacity;
    return out;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL_ROOT FRAME_A.ppm FRAME_B.ppm OUT_DIR\n", argv[0]);
        return 2;
    }
    char settings[4096];
    snprintf(settings, sizeof settings, "{\"model_root\": \"%s\"}", argv[1]);
    uint32_t w = 0, h = 0, w2 = 0, h2 = 0;
    uint8_t *rgb_a = ppm_read(argv[2], &w, &h);
    uint8_t *rgb_b = ppm_read(argv[3], &w2, &h2);
    if (!rgb_a || !rgb_b || w != w2 || h != h2) {
        fprintf(stderr, "cannot read two frames of one size\n");
        return 2;
    }
    SdsFrame frame_a = {rgb_a, w, h, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsFrame frame_b = {rgb_b, w, h, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsProcessor *p = (SdsProcessor *)0x1;

    /* Refusals: each leaves *out NULL and says why. */
    EXPECT(sds_processor_create(NULL, NULL, NULL, &p), SDS_ERR_NULL, "name");
    CHECK(p == NULL);
    EXPECT(sds_processor_create("hed", NULL, NULL, NULL), SDS_ERR_NULL, "out");
    EXPECT(sds_processor_create("no_such", NULL, NULL, &p), SDS_ERR_INVALID_PARAMS, "no_such");
    EXPECT(sds_processor_create("mediapipe_pose", NULL, NULL, &p), SDS_ERR_INVALID_PARAMS,
           "openpose");
    EXPECT(sds_processor_create("canny", "{not json", NULL, &p), SDS_ERR_INVALID_JSON, NULL);
    EXPECT(sds_processor_create("canny", "[1, 2]", NULL, &p), SDS_ERR_INVALID_PARAMS,
           "JSON object");
    EXPECT(sds_processor_create("canny", "{\"low_threshold\": 900}", NULL, &p),
           SDS_ERR_INVALID_PARAMS, "params.low_threshold");
    EXPECT(sds_processor_create("canny", NULL, "{\"vae\": 3}", &p), SDS_ERR_INVALID_PARAMS,
           "vae");
    EXPECT(sds_processor_create("hed", NULL, "{\"model_root\": \"/nonexistent-sds-root\"}", &p),
           SDS_ERR_MODEL, "lllyasviel/Annotators");
    CHECK(p == NULL);
    EXPECT(sds_processor_process(NULL, &frame_a, NULL), SDS_ERR_NULL, "processor");
    EXPECT(sds_processor_output_size(NULL, 1, 1, NULL, NULL, NULL, NULL), SDS_ERR_NULL, NULL);
    EXPECT(sds_processor_reset(NULL), SDS_ERR_NULL, NULL);
    EXPECT(sds_processor_destroy(NULL), SDS_OK, NULL);
    CHECK(strstr(sds_processor_last_error(NULL), "NULL") != NULL);

    /* HED on frame A. */
    SdsProcessor *hed = NULL;
    EXPECT(sds_processor_create("hed", "{\"safe\": false}", settings, &hed), SDS_OK, NULL);
    CHECK(hed != NULL);
    uint32_t ow = 0, oh = 0, channels = 0;
    size_t size = 0;
    EXPECT(sds_processor_output_size(hed, w, h, &ow, &oh, &channels, &size), SDS_OK, NULL);
    CHECK(ow == w && oh == h && channels == 3 && size == (size_t)w * h * 3);
    uint8_t *buf = (uint8_t *)malloc(size);
    SdsControlOutput small = output_to(buf, size - 1);
    EXPECT(sds_processor_process(hed, &frame_a, &small), SDS_ERR_BUFFER_TOO_SMALL, "needs");
    CHECK(small.size == size && small.width == w && small.channels == 3);
    CHECK(strstr(sds_processor_last_error(hed), "needs") != NULL);
    SdsControlOutput no_data = output_to(NULL, size);
    EXPECT(sds_processor_process(hed, &frame_a, &no_data), SDS_ERR_NULL, "out->data");
    EXPECT(sds_processor_process(hed, NULL, &no_data), SDS_ERR_NULL, "frame");
    SdsFrame empty = {rgb_a, 0, h, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsControlOutput out = output_to(buf, size);
    EXPECT(sds_processor_process(hed, &empty, &out), SDS_ERR_INVALID_FRAME, NULL);
    out = output_to(buf, size);
    EXPECT(sds_processor_process(hed, &frame_a, &out), SDS_OK, NULL);
    CHECK(out.size == size && out.width == w && out.height == h && out.channels == 3);
    CHECK(write_raw(argv[4], "hed.raw", buf, size) == 0);
    EXPECT(sds_processor_destroy(hed), SDS_OK, NULL);
    free(buf);

    /* TemporalNet: 6 channels; the first image has black flow, the second follows frame A. */
    SdsProcessor *tn = NULL;
    EXPECT(sds_processor_create("temporal_net_tensorrt", "{\"height\": 256, \"width\": 256}",
                                settings, &tn),
           SDS_OK, NULL);
    EXPECT(sds_processor_output_size(tn, w, h, &ow, &oh, &channels, &size), SDS_OK, NULL);
    CHECK(channels == 6 && size == (size_t)w * h * 6);
    buf = (uint8_t *)malloc(size);
    out = output_to(buf, size);
    EXPECT(sds_processor_process(tn, &frame_a, &out), SDS_OK, NULL);
    CHECK(out.channels == 6);
    int black = 1;
    for (size_t i = 0; i < (size_t)w * h; i++)
        for (int c = 3; c < 6; c++) black &= buf[i * 6 + c] == 0;
    CHECK(black);
    CHECK(write_raw(argv[4], "temporal_0.raw", buf, size) == 0);
    out = output_to(buf, size);
    EXPECT(sds_processor_process(tn, &frame_b, &out), SDS_OK, NULL);
    CHECK(write_raw(argv[4], "temporal_1.raw", buf, size) == 0);
    /* After a reset the next image starts over (black flow again). */
    EXPECT(sds_processor_reset(tn), SDS_OK, NULL);
    out = output_to(buf, size);
    EXPECT(sds_processor_process(tn, &frame_b, &out), SDS_OK, NULL);
    black = 1;
    for (size_t i = 0; i < (size_t)w * h; i++)
        for (int c = 3; c < 6; c++) black &= buf[i * 6 + c] == 0;
    CHECK(black);
    EXPECT(sds_processor_destroy(tn), SDS_OK, NULL);
    free(buf);

    free(rgb_a);
    free(rgb_b);
    printf("processor_test: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
