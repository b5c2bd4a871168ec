/* A native host streaming frames through sdstream's C API.
 *
 *   host MODEL_DIR VAE_DIR FRAMES_DIR OUT_DIR
 *
 * Loads the model (e.g. tests/fixtures/tiny-sd-turbo with TAESD tests/fixtures/tiny-taesd) at
 * 64x64, reads FRAMES_DIR/000.ppm, 001.ppm, ... (binary PPM, RGB8), processes the first half
 * synchronously with sds_engine_process, changes the prompt, streams the second half with
 * sds_engine_submit + sds_engine_recv, writes every output to OUT_DIR/NNN.ppm, and prints the
 * engine's status. Warm-up is off so that each output is exactly what the synchronous Rust
 * pipeline gives for the same frames (the test suite compares the bytes); live hosts usually
 * keep it on. Exit status 0 on success. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdstream.h"
#include "ppm.h"

#define MAX_FRAMES 64
#define SIZE 64

static int fail(const char *what, SdsStatus status) {
    fprintf(stderr, "host: %s failed (status %d): %s\n", what, (int)status, sds_last_error());
    return 1;
}

/* The parameter JSON for a prompt (paths are checked to need no JSON escaping). */
static void params_json(char *buf, size_t len, const char *model, const char *prompt) {
    snprintf(buf, len,
             "{\"model_id\": \"%s\", \"prompt\": \"%s\", \"width\": %d, \"height\": %d, "
             "\"seed\": 42}",
             model, prompt, SIZE, SIZE);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: host MODEL_DIR VAE_DIR FRAMES_DIR OUT_DIR\n");
        return 2;
    }
    const char *model = argv[1], *vae = argv[2], *frames_dir = argv[3], *out_dir = argv[4];
    for (int i = 1; i <= 2; i++) {
        if (strpbrk(argv[i], "\"\\")) {
            fprintf(stderr, "host: paths with quotes or backslashes are not supported\n");
            return 2;
        }
    }
    printf("sdstream %s (header %d.%d.%d)\n", sds_version(), SDS_VERSION_MAJOR,
           SDS_VERSION_MINOR, SDS_VERSION_PATCH);

    /* Read the frames. */
    uint8_t *frames[MAX_FRAMES];
    uint32_t widths[MAX_FRAMES], heights[MAX_FRAMES];
    int count = 0;
    char path[4096];
    for (; count < MAX_FRAMES; count++) {
        snprintf(path, sizeof path, "%s/%03d.ppm", frames_dir, count);
        frames[count] = ppm_read(path, &widths[count], &heights[count]);
        if (!frames[count]) break;
    }
    if (count == 0) {
        fprintf(stderr, "host: no frames in %s\n", frames_dir);
        return 1;
    }

    char params[8192], settings[4096];
    params_json(params, sizeof params, model, "a watercolor of a lighthouse");
    snprintf(settings, sizeof settings, "{\"vae\": \"%s\", \"allow_any_resolution\": true}", vae);
    const char *options =
        "{\"warmup\": false, \"drop_policy\": \"lossless\", \"queue_capacity\": 64, "
        "\"output_capacity\": 64}";

    SdsEngine *engine = NULL;
    SdsStatus st = sds_engine_create(params, settings, options, &engine);
    if (st != SDS_OK) return fail("sds_engine_create", st);

    uint32_t out_w = 0, out_h = 0;
    size_t out_size = 0;
    st = sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &out_w, &out_h, &out_size);
    if (st != SDS_OK) return fail("sds_engine_output_size", st);
    uint8_t *pixels = (uint8_t *)malloc(out_size);
    if (!pixels) return 1;
    printf("engine ready: output %ux%u RGB8, %zu bytes\n", out_w, out_h, out_size);

    int rc = 0;
    int half = count / 2;
    SdsOutput out;
    /* First half: synchronous. */
    for (int i = 0; i < half && rc == 0; i++) {
        SdsFrame frame = {frames[i], widths[i], heights[i], 0, SDS_PIXEL_FORMAT_RGB8};
        memset(&out, 0, sizeof out);
        out.data = pixels;
        out.capacity = out_size;
        st = sds_engine_process(engine, &frame, &out);
        if (st != SDS_OK) {
            rc = fail("sds_engine_process", st);
            break;
        }
        snprintf(path, sizeof path, "%s/%03d.ppm", out_dir, i);
        if (ppm_write(path, out.data, out.width, out.height, out.width * 3u) != 0) rc = 1;
        printf("frame %d -> id %llu, %ux%u\n", i, (unsigned long long)out.frame_id, out.width,
               out.height);
    }

    /* Change the prompt mid-stream: a hot update, applied before the next frame. */
    if (rc == 0) {
        SdsUpdateKind kind;
        params_json(params, sizeof params, model, "an oil painting of a stormy sea");
        st = sds_engine_update_params(engine, params, &kind);
        if (st != SDS_OK) rc = fail("sds_engine_update_params", st);
        else printf("prompt changed: update kind %d (%s)\n", (int)kind,
                    kind == SDS_UPDATE_HOT ? "hot" : "not hot");
    }

    /* Second half: streamed without waiting per frame, then collected. */
    uint64_t ids[MAX_FRAMES];
    for (int i = half; i < count && rc == 0; i++) {
        SdsFrame frame = {frames[i], widths[i], heights[i], 0, SDS_PIXEL_FORMAT_RGB8};
        st = sds_engine_submit_with_timestamp(engine, &frame, 1000 + i, &ids[i]);
        if (st != SDS_OK) rc = fail("sds_engine_submit_with_timestamp", st);
    }
    for (int n = half; n < count && rc == 0; n++) {
        memset(&out, 0, sizeof out);
        out.data = pixels;
        out.capacity = out_size;
        st = sds_engine_recv(engine, &out, 120000);
        if (st != SDS_OK) {
            rc = fail("sds_engine_recv", st);
            break;
        }
        int i = (int)(out.timestamp - 1000);
        if (i < half || i >= count || ids[i] != out.frame_id) {
            fprintf(stderr, "host: output with unexpected id %llu / timestamp %lld\n",
                    (unsigned long long)out.frame_id, (long long)out.timestamp);
            rc = 1;
            break;
        }
        snprintf(path, sizeof path, "%s/%03d.ppm", out_dir, i);
        if (ppm_write(path, out.data, out.width, out.height, out.width * 3u) != 0) rc = 1;
        printf("frame %d -> id %llu (streamed, params version %llu)\n", i,
               (unsigned long long)out.frame_id, (unsigned long long)out.params_version);
    }

    char *status = NULL;
    st = sds_engine_status_json(engine, &status);
    if (st == SDS_OK) {
        printf("status: %s\n", status);
        sds_string_free(status);
    } else if (rc == 0) {
        rc = fail("sds_engine_status_json", st);
    }

    sds_engine_destroy(engine);
    free(pixels);
    for (int i = 0; i < count; i++) free(frames[i]);
    if (rc == 0) printf("host: %d frames written to %s\n", count, out_dir);
    return rc;
}
