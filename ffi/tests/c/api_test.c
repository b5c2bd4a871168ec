/* Exercises every function of include/sdstream.h from C, including NULL and invalid arguments,
 * wrong frame and buffer sizes, invalid JSON, unknown fields, use after a failed reload, and
 * control images for an `external` ControlNet.
 *
 *   api_test MODEL_DIR VAE_DIR FRAME.ppm CONTROLNET_DIR CONTROL.ppm OUT_DIR
 *
 * FRAME.ppm is a 64x64 frame; the control image is the top-left 48x40 window of the 64x64
 * CONTROL.ppm (passed with a row stride, so it is resized like a frame). OUT_DIR receives
 * control_0.ppm to control_2.ppm, the outputs of test_controls' engine, which ffi/tests/c_api.rs
 * compares with the Rust pipeline.
 *
 * Prints one line per failed check and a summary; exit status 0 when every check passed. Run
 * by ffi/tests/c_api.rs (under AddressSanitizer). */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sdstream.h"
#include "../../../examples/c/ppm.h"

static int checks = 0, failures = 0;

/* How long a test waits for an output: generous, since under valgrind one tiny frame with a
 * ControlNet takes over a minute. */
#define RECV_TIMEOUT_MS 600000

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

static void report_message(const char *file, int line, const char *call, const char *needle) {
    fprintf(stderr, "%s:%d: %s: message \"%s\" lacks \"%s\"\n", file, line, call,
            sds_last_error(), needle);
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
            report_message(__FILE__, __LINE__, #call, needle);                          \
        }                                                                               \
    } while (0)

static char params[4096], params_other_prompt[4096], params_bad_model[4096],
    params_missing_model[4096], params_external_net[4096], settings[4096];

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static SdsOutput output_to(uint8_t *data, size_t capacity, uint32_t stride) {
    SdsOutput out;
    memset(&out, 0xAB, sizeof out); /* garbage in the out-fields must not matter */
    out.data = data;
    out.capacity = capacity;
    out.stride = stride;
    return out;
}

/* Polls until an output arrives (at most ~60 s). */
static SdsStatus poll_wait(SdsEngine *engine, SdsOutput *out) {
    for (int i = 0; i < 6000; i++) {
        SdsStatus st = sds_engine_poll(engine, out);
        if (st != SDS_ERR_NO_OUTPUT) return st;
        sleep_ms(10);
    }
    return SDS_ERR_NO_OUTPUT;
}

/* Reads the status JSON and says whether it contains `needle`. */
static int status_has(SdsEngine *engine, const char *needle) {
    char *json = NULL;
    if (sds_engine_status_json(engine, &json) != SDS_OK) return 0;
    int found = strstr(json, needle) != NULL;
    sds_string_free(json);
    return found;
}

static void test_version(void) {
    char expected[64];
    snprintf(expected, sizeof expected, "%d.%d.%d", SDS_VERSION_MAJOR, SDS_VERSION_MINOR,
             SDS_VERSION_PATCH);
    CHECK(strcmp(sds_version(), expected) == 0);
    CHECK(sds_last_error() != NULL && sds_last_error()[0] == '\0');
}

static void test_create_errors(const char *model) {
    SdsEngine *engine = (SdsEngine *)&engine; /* non-NULL garbage: must be reset to NULL */
    EXPECT(sds_engine_create(NULL, settings, NULL, &engine), SDS_ERR_NULL, "`params_json`");
    CHECK(engine == NULL);
    EXPECT(sds_engine_create(params, NULL, NULL, &engine), SDS_ERR_NULL, "`settings_json`");
    EXPECT(sds_engine_create(params, settings, NULL, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_create_async(params, settings, NULL, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_create("{\"prompt\": ", settings, NULL, &engine), SDS_ERR_INVALID_JSON,
           "sds_engine_create");
    EXPECT(sds_engine_create("{\"bogus_field\": 1}", settings, NULL, &engine),
           SDS_ERR_INVALID_PARAMS, "unknown field `bogus_field`");
    EXPECT(sds_engine_create("\xff\xfe", settings, NULL, &engine), SDS_ERR_INVALID_ARGUMENT,
           "UTF-8");
    EXPECT(sds_engine_create(params, "{\"no_such_setting\": true}", NULL, &engine),
           SDS_ERR_INVALID_PARAMS, "unknown field `no_such_setting`");
    EXPECT(sds_engine_create(params, settings, "{\"queue_capacity\": 0}", &engine),
           SDS_ERR_INVALID_PARAMS, "queue_capacity");
    EXPECT(sds_engine_create(params, settings, "{\"queue_depth\": 3}", &engine),
           SDS_ERR_INVALID_JSON, "queue_depth");
    char bad[4096];
    snprintf(bad, sizeof bad,
             "{\"model_id\": \"%s\", \"width\": 64, \"height\": 64, \"t_index_list\": [60]}",
             model);
    EXPECT(sds_engine_create(bad, settings, NULL, &engine), SDS_ERR_INVALID_PARAMS,
           "t_index_list");
    EXPECT(sds_engine_create(params_missing_model, settings, NULL, &engine),
           SDS_ERR_INVALID_PARAMS, "/nonexistent/sdstream-model");
    /* an existing folder that holds no pipeline: the load fails */
    EXPECT(sds_engine_create(params_bad_model, settings, NULL, &engine), SDS_ERR_MODEL,
           "tiny-taesd");
    CHECK(engine == NULL);
}

static void test_null_handles(void) {
    uint8_t byte = 0;
    SdsOutput out = output_to(&byte, 1, 0);
    SdsFrame frame = {&byte, 1, 1, 0, SDS_PIXEL_FORMAT_RGB8};
    uint32_t w, h;
    size_t size;
    char *json;
    EXPECT(sds_engine_wait_ready(NULL, 0), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_close(NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_restart(NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_set_style_image(NULL, &frame), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_process(NULL, &frame, &out), SDS_ERR_NULL, "sds_engine_process");
    EXPECT(sds_engine_submit(NULL, &frame, NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_submit_with_timestamp(NULL, &frame, 1, NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_submit_with_controls(NULL, &frame, NULL, 0, NULL, NULL), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_process_with_controls(NULL, &frame, NULL, 0, &out), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_poll(NULL, &out), SDS_ERR_NULL, "sds_engine_poll");
    EXPECT(sds_engine_recv(NULL, &out, 0), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_flush(NULL, NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_output_size(NULL, SDS_PIXEL_FORMAT_RGB8, &w, &h, &size), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_update_params(NULL, params, NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_status_json(NULL, &json), SDS_ERR_NULL, "`engine`");
    CHECK(strstr(sds_engine_last_error(NULL), "NULL") != NULL);
    EXPECT(sds_engine_destroy(NULL), SDS_OK, NULL);
    sds_string_free(NULL);
}

static void test_engine(const uint8_t *rgb) {
    SdsEngine *engine = NULL;
    EXPECT(sds_engine_create(params, settings, NULL, &engine), SDS_OK, NULL);
    if (!engine) return;
    CHECK(sds_engine_last_error(engine)[0] == '\0');
    EXPECT(sds_engine_wait_ready(engine, 0), SDS_OK, NULL);

    /* output_size */
    uint32_t w = 0, h = 0;
    size_t size = 0;
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, NULL, &h, &size), SDS_ERR_NULL,
           "`width`");
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &w, &h, NULL), SDS_ERR_NULL,
           "`size`");
    EXPECT(sds_engine_output_size(engine, 7, &w, &h, &size), SDS_ERR_INVALID_ARGUMENT,
           "pixel format 7");
    CHECK(strstr(sds_engine_last_error(engine), "pixel format 7") != NULL);
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGBF32, &w, &h, &size), SDS_OK, NULL);
    CHECK(w == 64 && h == 64 && size == 64 * 64 * 12);
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &w, &h, &size), SDS_OK, NULL);
    CHECK(w == 64 && h == 64 && size == 64 * 64 * 3);

    /* process: argument checks (nothing submitted) */
    enum { ROW = 64 * 3, PAD = 8, STRIDE = ROW + PAD };
    uint8_t *buffer = (uint8_t *)malloc(STRIDE * 64);
    SdsFrame frame = {rgb, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsOutput out = output_to(buffer, 64 * 64 * 3, 0);
    EXPECT(sds_engine_process(engine, NULL, &out), SDS_ERR_NULL, "`frame`");
    EXPECT(sds_engine_process(engine, &frame, NULL), SDS_ERR_NULL, "`out`");
    SdsOutput no_data = output_to(NULL, 100, 0);
    EXPECT(sds_engine_process(engine, &frame, &no_data), SDS_ERR_NULL, "`out->data`");
    SdsFrame null_pixels = {NULL, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8};
    EXPECT(sds_engine_process(engine, &null_pixels, &out), SDS_ERR_NULL, "`frame->data`");
    SdsFrame empty = {rgb, 0, 64, 0, SDS_PIXEL_FORMAT_RGB8};
    EXPECT(sds_engine_process(engine, &empty, &out), SDS_ERR_INVALID_FRAME, "non-zero");
    SdsFrame short_stride = {rgb, 64, 64, 100, SDS_PIXEL_FORMAT_RGB8};
    EXPECT(sds_engine_process(engine, &short_stride, &out), SDS_ERR_INVALID_FRAME, "stride 100");
    SdsFrame bad_format = {rgb, 64, 64, 0, 42};
    EXPECT(sds_engine_process(engine, &bad_format, &out), SDS_ERR_INVALID_ARGUMENT,
           "pixel format 42");
    SdsOutput small = output_to(buffer, 64 * 64 * 3 - 1, 0);
    EXPECT(sds_engine_process(engine, &frame, &small), SDS_ERR_BUFFER_TOO_SMALL, "12288");
    CHECK(small.size == 64 * 64 * 3 && small.width == 64 && small.height == 64 &&
          small.format == SDS_PIXEL_FORMAT_RGB8);
    SdsOutput narrow = output_to(buffer, STRIDE * 64, ROW - 1);
    EXPECT(sds_engine_process(engine, &frame, &narrow), SDS_ERR_BUFFER_TOO_SMALL, "stride 191");
    CHECK(strstr(sds_engine_last_error(engine), "stride 191") != NULL);

    /* process: padded input rows and a padded output buffer; the padding is left alone */
    uint8_t *padded_in = (uint8_t *)malloc(STRIDE * 64);
    for (int y = 0; y < 64; y++) {
        memcpy(padded_in + y * STRIDE, rgb + y * ROW, ROW);
        memset(padded_in + y * STRIDE + ROW, 0x5A, PAD);
    }
    SdsFrame padded = {padded_in, 64, 64, STRIDE, SDS_PIXEL_FORMAT_RGB8};
    memset(buffer, 0xEE, STRIDE * 64);
    SdsOutput wide = output_to(buffer, STRIDE * 63 + ROW, STRIDE);
    EXPECT(sds_engine_process(engine, &padded, &wide), SDS_OK, NULL);
    CHECK(wide.size == STRIDE * 63 + ROW && wide.width == 64 && wide.frame_id == 0);
    int padding_kept = 1, varied = 0;
    for (int y = 0; y < 64; y++) {
        for (int x = ROW; x < STRIDE && y < 63; x++) padding_kept &= buffer[y * STRIDE + x] == 0xEE;
        for (int x = 1; x < ROW; x++) varied |= buffer[y * STRIDE + x] != buffer[y * STRIDE];
    }
    CHECK(padding_kept);
    CHECK(varied);

    /* process with RGBA8 and BGRA8: alpha 255 out, channels in the input's order */
    uint8_t *rgba = (uint8_t *)malloc(64 * 64 * 4), *bgra = (uint8_t *)malloc(64 * 64 * 4);
    for (int i = 0; i < 64 * 64; i++) {
        rgba[i * 4 + 0] = bgra[i * 4 + 2] = rgb[i * 3 + 0];
        rgba[i * 4 + 1] = bgra[i * 4 + 1] = rgb[i * 3 + 1];
        rgba[i * 4 + 2] = bgra[i * 4 + 0] = rgb[i * 3 + 2];
        rgba[i * 4 + 3] = bgra[i * 4 + 3] = 0;
    }
    uint8_t *out4 = (uint8_t *)malloc(64 * 64 * 4);
    SdsFrame frame4 = {rgba, 64, 64, 0, SDS_PIXEL_FORMAT_RGBA8};
    SdsOutput o4 = output_to(out4, 64 * 64 * 3, 0);
    EXPECT(sds_engine_process(engine, &frame4, &o4), SDS_ERR_BUFFER_TOO_SMALL, "16384");
    o4 = output_to(out4, 64 * 64 * 4, 0);
    EXPECT(sds_engine_process(engine, &frame4, &o4), SDS_OK, NULL);
    int alpha = 1;
    for (int i = 0; i < 64 * 64; i++) alpha &= out4[i * 4 + 3] == 255;
    CHECK(alpha && o4.format == SDS_PIXEL_FORMAT_RGBA8);
    frame4.data = bgra;
    frame4.format = SDS_PIXEL_FORMAT_BGRA8;
    EXPECT(sds_engine_process(engine, &frame4, &o4), SDS_OK, NULL);
    CHECK(o4.format == SDS_PIXEL_FORMAT_BGRA8);

    /* submit / poll / recv */
    uint64_t id = 999;
    EXPECT(sds_engine_submit(engine, NULL, &id), SDS_ERR_NULL, "`frame`");
    EXPECT(sds_engine_submit(engine, &short_stride, &id), SDS_ERR_INVALID_FRAME, "stride");
    CHECK(id == 999);
    out = output_to(buffer, 64 * 64 * 3, 0);
    EXPECT(sds_engine_poll(engine, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_poll(engine, &no_data), SDS_ERR_NULL, "`out->data`");
    EXPECT(sds_engine_poll(engine, &out), SDS_ERR_NO_OUTPUT, "`out->data`"); /* not recorded */
    EXPECT(sds_engine_recv(engine, &out, 0), SDS_ERR_NO_OUTPUT, NULL);
    EXPECT(sds_engine_submit_with_timestamp(engine, &frame, 123456789, &id), SDS_OK, NULL);
    CHECK(id == 3);
    /* too small: the output is kept for the next poll */
    small = output_to(buffer, 10, 0);
    EXPECT(poll_wait(engine, &small), SDS_ERR_BUFFER_TOO_SMALL, "needs 12288 bytes");
    CHECK(small.size == 64 * 64 * 3 && small.frame_id == 3);
    EXPECT(sds_engine_poll(engine, &out), SDS_OK, NULL);
    CHECK(out.frame_id == 3 && out.timestamp == 123456789 && out.params_version == 0);
    EXPECT(sds_engine_submit(engine, &frame, NULL), SDS_OK, NULL);
    out = output_to(buffer, 64 * 64 * 3, 0);
    EXPECT(sds_engine_recv(engine, &out, RECV_TIMEOUT_MS), SDS_OK, NULL);
    CHECK(out.frame_id == 4);
    size_t dropped = 99;
    EXPECT(sds_engine_flush(engine, &dropped), SDS_OK, NULL);
    CHECK(dropped == 0);
    EXPECT(sds_engine_flush(engine, NULL), SDS_OK, NULL);

    /* update_params */
    SdsUpdateKind kind = (SdsUpdateKind)77;
    EXPECT(sds_engine_update_params(engine, NULL, &kind), SDS_ERR_NULL, "`params_json`");
    EXPECT(sds_engine_update_params(engine, "{\"prompt\": [", &kind), SDS_ERR_INVALID_JSON, NULL);
    EXPECT(sds_engine_update_params(engine, "{\"promt\": \"typo\"}", &kind),
           SDS_ERR_INVALID_PARAMS, "unknown field `promt`");
    EXPECT(sds_engine_update_params(engine, "{\"delta\": \"much\"}", &kind),
           SDS_ERR_INVALID_PARAMS, "delta");
    EXPECT(sds_engine_update_params(engine, params_missing_model, &kind), SDS_ERR_INVALID_PARAMS,
           "/nonexistent/sdstream-model");
    CHECK(kind == (SdsUpdateKind)77);
    EXPECT(sds_engine_update_params(engine, params, &kind), SDS_OK, NULL);
    CHECK(kind == SDS_UPDATE_UNCHANGED);
    EXPECT(sds_engine_update_params(engine, params_other_prompt, &kind), SDS_OK, NULL);
    CHECK(kind == SDS_UPDATE_HOT);
    EXPECT(sds_engine_update_params(engine, params_other_prompt, NULL), SDS_OK, NULL);
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);
    CHECK(out.params_version == 1);

    /* a reload that fails: the previous pipeline keeps serving */
    EXPECT(sds_engine_update_params(engine, params_bad_model, &kind), SDS_OK, NULL);
    CHECK(kind == SDS_UPDATE_RELOAD);
    int settled = 0;
    for (int i = 0; i < 6000 && !settled; i++) {
        settled = status_has(engine, "\"reload_failures\":1") &&
                  status_has(engine, "\"reloading\":false");
        if (!settled) sleep_ms(10);
    }
    CHECK(settled);
    CHECK(status_has(engine, "the previous pipeline keeps serving"));
    /* the pre-reload pipeline, its parameters accepted again under a new version (3: versions
       never go back, so the failed reload's 2 is not followed by 1) */
    CHECK(status_has(engine, "\"serving_params_version\":3,"));
    CHECK(status_has(engine, "\"params_version\":3,"));
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);
    CHECK(out.params_version == 3); /* still the serving (pre-reload) parameters */
    EXPECT(sds_engine_submit(engine, &frame, &id), SDS_OK, NULL);
    EXPECT(sds_engine_recv(engine, &out, RECV_TIMEOUT_MS), SDS_OK, NULL);
    CHECK(out.frame_id == id);
    EXPECT(sds_engine_update_params(engine, params, &kind), SDS_OK, NULL);
    CHECK(kind == SDS_UPDATE_HOT); /* compared with the accepted (reverted) parameters */
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);

    /* update_params_with_transition: a prompt change gliding over 3 frames */
    const char *glide = "{\"num_steps\": 3, \"temporal_interpolation_method\": \"slerp\"}";
    kind = (SdsUpdateKind)77;
    EXPECT(sds_engine_update_params_with_transition(NULL, params, glide, &kind), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_update_params_with_transition(engine, params_other_prompt, NULL, &kind),
           SDS_ERR_NULL, "`transition_json`");
    EXPECT(sds_engine_update_params_with_transition(engine, params_other_prompt, "{\"num_steps\":",
                                                    &kind),
           SDS_ERR_INVALID_JSON, NULL);
    EXPECT(sds_engine_update_params_with_transition(engine, params_other_prompt,
                                                    "{\"num_steps\": 5000}", &kind),
           SDS_ERR_INVALID_PARAMS, "transition.num_steps");
    EXPECT(sds_engine_update_params_with_transition(engine, params_other_prompt,
                                                    "{\"num_steps\": 3, \"target_prompts\": []}",
                                                    &kind),
           SDS_ERR_INVALID_PARAMS, "transition");
    CHECK(kind == (SdsUpdateKind)77); /* nothing was applied */
    EXPECT(sds_engine_update_params_with_transition(engine, params_other_prompt, glide, &kind),
           SDS_OK, NULL);
    CHECK(kind == SDS_UPDATE_HOT);
    for (int i = 0; i < 3; i++) EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);

    /* status */
    char *json = (char *)&json;
    EXPECT(sds_engine_status_json(engine, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_status_json(engine, &json), SDS_OK, NULL);
    CHECK(json != NULL && json[0] == '{' && strstr(json, "\"frames_processed\":") != NULL);
    sds_string_free(json);

    /* restart builds a new pipeline in the background */
    EXPECT(sds_engine_restart(engine), SDS_OK, NULL);
    EXPECT(sds_engine_wait_ready(engine, -1), SDS_OK, NULL);
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);

    /* an IP-Adapter style picture from the host: copied (or NULL: back to the URL's); a bad
       frame is refused naming the function, and the engine keeps serving */
    EXPECT(sds_engine_set_style_image(engine, &frame), SDS_OK, NULL);
    EXPECT(sds_engine_set_style_image(engine, NULL), SDS_OK, NULL);
    EXPECT(sds_engine_set_style_image(engine, &empty), SDS_ERR_INVALID_FRAME,
           "sds_engine_set_style_image");
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_OK, NULL);

    /* the handle's last error names the function that failed on it */
    EXPECT(sds_engine_submit(engine, &empty, NULL), SDS_ERR_INVALID_FRAME, NULL);
    CHECK(strstr(sds_engine_last_error(engine), "sds_engine_submit") != NULL);

    /* close: submit, process and update fail; status and poll still work */
    EXPECT(sds_engine_close(engine), SDS_OK, NULL);
    EXPECT(sds_engine_close(engine), SDS_OK, NULL);
    EXPECT(sds_engine_submit(engine, &frame, NULL), SDS_ERR_CLOSED, "closed");
    EXPECT(sds_engine_process(engine, &frame, &out), SDS_ERR_CLOSED, "closed");
    EXPECT(sds_engine_update_params(engine, params, NULL), SDS_ERR_CLOSED, "closed");
    EXPECT(sds_engine_recv(engine, &out, 10), SDS_ERR_CLOSED, "closed");
    EXPECT(sds_engine_poll(engine, &out), SDS_ERR_NO_OUTPUT, NULL);
    CHECK(status_has(engine, "\"state\":\"OFFLINE\""));
    EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);

    free(padded_in);
    free(rgba);
    free(bgra);
    free(out4);
    free(buffer);
}

static void test_queue_full(const uint8_t *rgb) {
    SdsEngine *engine = NULL;
    EXPECT(sds_engine_create(params, settings,
                             "{\"drop_policy\": \"lossless\", \"queue_capacity\": 1, "
                             "\"warmup\": false}",
                             &engine),
           SDS_OK, NULL);
    if (!engine) return;
    SdsFrame frame = {rgb, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsStatus st = SDS_OK;
    int accepted = 0;
    for (int i = 0; i < 16 && st == SDS_OK; i++) {
        st = sds_engine_submit(engine, &frame, NULL);
        accepted += st == SDS_OK;
    }
    CHECK(st == SDS_ERR_QUEUE_FULL);
    CHECK(strstr(sds_last_error(), "queue is full") != NULL);
    CHECK(accepted >= 1 && accepted <= 3);
    /* destroy with frames in flight and outputs never collected */
    EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);
}

static void test_async_failed_load(void) {
    SdsEngine *engine = NULL;
    EXPECT(sds_engine_create_async(params_bad_model, settings, NULL, &engine), SDS_OK, NULL);
    if (!engine) return;
    EXPECT(sds_engine_wait_ready(engine, -1), SDS_ERR_MODEL, "tiny-taesd");
    uint8_t px[3] = {0, 0, 0};
    SdsFrame frame = {px, 1, 1, 0, SDS_PIXEL_FORMAT_RGB8};
    EXPECT(sds_engine_submit(engine, &frame, NULL), SDS_ERR_STATE, "no pipeline");
    CHECK(status_has(engine, "\"state\":\"ERROR\""));
    /* a good update builds a pipeline: the engine recovers */
    SdsUpdateKind kind;
    EXPECT(sds_engine_update_params(engine, params, &kind), SDS_OK, NULL);
    EXPECT(sds_engine_wait_ready(engine, -1), SDS_OK, NULL);
    EXPECT(sds_engine_submit(engine, &frame, NULL), SDS_OK, NULL);
    EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);
}

/* Whether two 64x64 RGB8 outputs differ anywhere. */
static int outputs_differ(const uint8_t *a, const uint8_t *b) {
    return memcmp(a, b, 64 * 64 * 3) != 0;
}

/* An `external` ControlNet fed through submit_with_controls / process_with_controls: argument
 * checks, unknown ids, and outputs that differ from a twin engine given no control images. */
static void test_controls(const uint8_t *rgb, const char *net_id, const uint8_t *control_rgb,
                          const char *out_dir) {
    const char *options = "{\"warmup\": false, \"drop_policy\": \"lossless\"}";
    SdsEngine *engine = NULL, *twin = NULL;
    EXPECT(sds_engine_create(params_external_net, settings, options, &engine), SDS_OK, NULL);
    EXPECT(sds_engine_create(params_external_net, settings, options, &twin), SDS_OK, NULL);
    if (!engine || !twin) {
        sds_engine_destroy(engine);
        sds_engine_destroy(twin);
        return;
    }
    enum { SIZE = 64 * 64 * 3 };
    uint8_t *with = (uint8_t *)malloc(3 * SIZE), *without = (uint8_t *)malloc(3 * SIZE);
    SdsFrame frame = {rgb, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8};
    /* the top-left 48x40 window of the control picture: another size, rows 64 pixels apart */
    SdsFrame control_frame = {control_rgb, 48, 40, 64 * 3, SDS_PIXEL_FORMAT_RGB8};
    SdsControlImage control = {net_id, control_frame};
    SdsOutput out = output_to(with, SIZE, 0);

    /* argument checks: each fails before anything is queued */
    uint64_t id = 999;
    EXPECT(sds_engine_submit_with_controls(engine, NULL, &control, 1, NULL, &id), SDS_ERR_NULL,
           "`frame`");
    EXPECT(sds_engine_submit_with_controls(engine, &frame, NULL, 1, NULL, &id), SDS_ERR_NULL,
           "`controls` is NULL but `count` is 1");
    SdsControlImage two[2] = {control, {NULL, control_frame}};
    EXPECT(sds_engine_submit_with_controls(engine, &frame, two, 2, NULL, &id), SDS_ERR_NULL,
           "`controls[1].controlnet_id` is NULL");
    SdsControlImage bad = {"\xff\xfe", control_frame};
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &bad, 1, NULL, &id),
           SDS_ERR_INVALID_ARGUMENT, "`controls[0].controlnet_id` is not valid UTF-8");
    bad = control;
    bad.frame.data = NULL;
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &bad, 1, NULL, &id), SDS_ERR_NULL,
           "`controls[0].frame.data` is NULL");
    bad = control;
    bad.frame.width = 0;
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &bad, 1, NULL, &id),
           SDS_ERR_INVALID_FRAME, "controls[0].frame: ");
    bad = control;
    bad.frame.stride = 10;
    EXPECT(sds_engine_process_with_controls(engine, &frame, &bad, 1, &out),
           SDS_ERR_INVALID_FRAME, "controls[0].frame: ");
    bad = control;
    bad.frame.format = 9;
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &bad, 1, NULL, &id),
           SDS_ERR_INVALID_ARGUMENT, "pixel format 9");
    SdsControlImage unknown = {"no/such-net", control_frame};
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &unknown, 1, NULL, &id),
           SDS_ERR_INVALID_PARAMS, "\"no/such-net\"");
    CHECK(strstr(sds_engine_last_error(engine), "sds_engine_submit_with_controls") != NULL);
    EXPECT(sds_engine_process_with_controls(engine, &frame, &unknown, 1, &out),
           SDS_ERR_INVALID_PARAMS, "\"no/such-net\"");
    SdsOutput small = output_to(with, SIZE - 1, 0);
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control, 1, &small),
           SDS_ERR_BUFFER_TOO_SMALL, "12288");
    EXPECT(sds_engine_process_with_controls(engine, NULL, &control, 1, &out), SDS_ERR_NULL,
           "`frame`");
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control, 1, NULL), SDS_ERR_NULL,
           "`out`");
    CHECK(id == 999);
    CHECK(status_has(engine, "\"frames_submitted\":0,"));

    /* Frame 0 with no control image yet (NULL controls, count 0): the net contributes
     * nothing. Frame 1 with the control image, through process. Frame 2 through submit with
     * a timestamp and no new image: the net keeps using the last one. The twin gets none. */
    EXPECT(sds_engine_process_with_controls(engine, &frame, NULL, 0, &out), SDS_OK, NULL);
    CHECK(out.frame_id == 0);
    out = output_to(with + SIZE, SIZE, 0);
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control, 1, &out), SDS_OK, NULL);
    CHECK(out.frame_id == 1);
    int64_t timestamp = 4242;
    EXPECT(sds_engine_submit_with_controls(engine, &frame, NULL, 0, &timestamp, &id), SDS_OK,
           NULL);
    CHECK(id == 2);
    out = output_to(with + 2 * SIZE, SIZE, 0);
    EXPECT(sds_engine_recv(engine, &out, RECV_TIMEOUT_MS), SDS_OK, NULL);
    CHECK(out.frame_id == 2 && out.timestamp == 4242);
    for (int i = 0; i < 3; i++) {
        SdsOutput o = output_to(without + i * SIZE, SIZE, 0);
        EXPECT(sds_engine_process(twin, &frame, &o), SDS_OK, NULL);
    }
    CHECK(!outputs_differ(with, without));
    CHECK(outputs_differ(with + SIZE, without + SIZE));
    CHECK(outputs_differ(with + 2 * SIZE, without + 2 * SIZE));

    /* the engine keeps working after the refused calls and serves plain submits */
    EXPECT(sds_engine_submit(engine, &frame, &id), SDS_OK, NULL);
    out = output_to(without, SIZE, 0);
    EXPECT(sds_engine_recv(engine, &out, RECV_TIMEOUT_MS), SDS_OK, NULL);
    CHECK(out.frame_id == id && id == 3);
    CHECK(status_has(engine, "\"frames_failed\":0,"));

    for (int i = 0; i < 3; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/control_%d.ppm", out_dir, i);
        CHECK(ppm_write(path, with + i * SIZE, 64, 64, 64 * 3) == 0);
    }
    EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);
    EXPECT(sds_engine_destroy(twin), SDS_OK, NULL);
    free(with);
    free(without);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr,
                "usage: api_test MODEL_DIR VAE_DIR FRAME.ppm CONTROLNET_DIR CONTROL.ppm OUT_DIR\n");
        return 2;
    }
    const char *model = argv[1], *vae = argv[2], *net = argv[4], *out_dir = argv[6];
    uint32_t w = 0, h = 0, cw = 0, ch = 0;
    uint8_t *rgb = ppm_read(argv[3], &w, &h);
    uint8_t *control_rgb = ppm_read(argv[5], &cw, &ch);
    if (!rgb || w != 64 || h != 64 || !control_rgb || cw != 64 || ch != 64) {
        fprintf(stderr, "api_test: %s or %s is not a 64x64 PPM\n", argv[3], argv[5]);
        free(rgb);
        free(control_rgb);
        return 2;
    }
    const char *fmt = "{\"model_id\": \"%s\", \"prompt\": \"%s\", \"width\": 64, \"height\": 64}";
    snprintf(params, sizeof params, fmt, model, "a watercolor of a lighthouse");
    snprintf(params_other_prompt, sizeof params_other_prompt, fmt, model, "a stormy sea");
    snprintf(params_missing_model, sizeof params_missing_model, fmt,
             "/nonexistent/sdstream-model", "a watercolor of a lighthouse");
    /* The TAESD folder exists but holds no StreamDiffusion pipeline. */
    snprintf(params_bad_model, sizeof params_bad_model, fmt, vae, "a watercolor of a lighthouse");
    snprintf(params_external_net, sizeof params_external_net,
             "{\"model_id\": \"%s\", \"prompt\": \"a watercolor of a lighthouse\", "
             "\"width\": 64, \"height\": 64, \"controlnets\": [{\"model_id\": \"%s\", "
             "\"preprocessor\": \"external\"}]}",
             model, net);
    snprintf(settings, sizeof settings, "{\"vae\": \"%s\", \"allow_any_resolution\": true}", vae);

    test_version();
    test_null_handles();
    test_create_errors(model);
    test_engine(rgb);
    test_queue_full(rgb);
    test_async_failed_load();
    test_controls(rgb, net, control_rgb, out_dir);
    free(rgb);
    free(control_rgb);
    printf("api_test: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
