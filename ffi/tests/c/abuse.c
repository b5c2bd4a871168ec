/* A hostile host: every entry point of include/sdstream.h called with NULL for each pointer
 * argument, invalid UTF-8 and malformed JSON, unknown pixel formats, zero and absurd sizes,
 * every call on a closed engine, several handles closed twice, several threads hammering one
 * handle while another closes it, and 3000 random frame descriptions, each valid one backed by
 * exactly the bytes the header says it spans. Built with -fsanitize=address,undefined
 * -fno-sanitize-recover=all and run by ffi/tests/c_api.rs, which fails on any sanitizer report
 * (LeakSanitizer included) or crash.
 *
 *   abuse MODEL_DIR VAE_DIR
 *
 * Every failing call must return a status and leave a message in sds_last_error() that names
 * the function (checked by first setting the thread's message to another function's), except
 * the documented SDS_ERR_NO_OUTPUT of poll and recv, which is not an error and leaves none.
 * Calls whose outcome is fixed (issue #20 items 2 and 3: absurd engine options and frames too
 * large to allocate) must return exactly the expected status with a message naming the cause;
 * frame descriptions point at a 16-byte buffer, so any read of the bytes they describe would be
 * a sanitizer report. Prints its figures; exit status 0 when nothing unexpected happened. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sdstream.h"

static atomic_long calls, failures, with_message, without_message, no_output, panics,
    unexpected, frames_accepted, outputs_taken;

static char params[4096], params_other[4096], settings[4096];

/* Sets this thread's last error to a known message of another function (not counted). */
static void reset_message(void) { (void)sds_engine_restart(NULL); }

/* Length of the function name at the start of a call's source text (`sds_engine_poll(...`). */
static size_t name_length(const char *call) {
    const char *paren = strchr(call, '(');
    return paren ? (size_t)(paren - call) : strlen(call);
}

/* Accounts for one call: a failure must have left a message naming its function. */
static SdsStatus account(const char *call, int line, SdsStatus st) {
    atomic_fetch_add(&calls, 1);
    if (st == SDS_OK) return st;
    atomic_fetch_add(&failures, 1);
    const char *message = sds_last_error();
    size_t n = name_length(call);
    if (st == SDS_ERR_NO_OUTPUT && (strncmp(call, "sds_engine_poll", n) == 0 ||
                                    strncmp(call, "sds_engine_recv", n) == 0)) {
        /* Documented: nothing ready is not an error and replaces no message. */
        atomic_fetch_add(&no_output, 1);
        if (strncmp(message, "sds_engine_restart:", 19) != 0) {
            atomic_fetch_add(&unexpected, 1);
            fprintf(stderr, "abuse.c:%d: %s: SDS_ERR_NO_OUTPUT replaced the message: %s\n", line,
                    call, message);
        }
        return st;
    }
    if (strncmp(message, call, n) == 0 && message[n] == ':' && strlen(message) > n + 2) {
        atomic_fetch_add(&with_message, 1);
    } else {
        atomic_fetch_add(&without_message, 1);
        fprintf(stderr, "abuse.c:%d: %s returned %d with message \"%s\"\n", line, call, (int)st,
                message);
    }
    if (st == SDS_ERR_PANIC) {
        atomic_fetch_add(&panics, 1);
        fprintf(stderr, "abuse.c:%d: %s panicked: %s\n", line, call, message);
    }
    if ((int)st < 0 || st > SDS_ERR_INTERNAL) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: %s returned unknown status %d\n", line, call, (int)st);
    }
    return st;
}

#define CALL(call) account(#call, __LINE__, (reset_message(), (call)))

/* A call whose outcome is fixed: status `want` and, on failure, a message containing `needle`. */
#define EXPECT(call, want, needle) expect(#call, __LINE__, CALL(call), (want), (needle))

static void expect(const char *call, int line, SdsStatus got, SdsStatus want, const char *needle) {
    if (got != want) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: %s returned %d, expected %d: %s\n", line, call, (int)got,
                (int)want, sds_last_error());
    } else if (got != SDS_OK && needle && !strstr(sds_last_error(), needle)) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: %s: message \"%s\" lacks \"%s\"\n", line, call,
                sds_last_error(), needle);
    }
}

/* A call that must fail (any status but OK), with a message (checked by account). */
#define FAILS(call) fails(#call, __LINE__, CALL(call))

static void fails(const char *call, int line, SdsStatus got) {
    if (got == SDS_OK) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: %s succeeded\n", line, call);
    }
}

/* Reads a pointer-returning call's string to its end (as a host logging it would). */
static void read_string(const char *call, int line, const char *s) {
    atomic_fetch_add(&calls, 1);
    if (!s) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: %s returned NULL\n", line, call);
        return;
    }
    volatile size_t n = strlen(s);
    (void)n;
}

#define READS(call) read_string(#call, __LINE__, (call))

static uint8_t tiny[16]; /* what every refused frame description points at */
static uint8_t *pixels;  /* a real 64x64 RGB8 frame */

static SdsFrame frame_of(const void *data, uint32_t w, uint32_t h, uint32_t stride,
                         SdsPixelFormat format) {
    SdsFrame f = {(const uint8_t *)data, w, h, stride, format};
    return f;
}

static SdsOutput output_to(uint8_t *data, size_t capacity, uint32_t stride) {
    SdsOutput out;
    memset(&out, 0xAB, sizeof out);
    out.data = data;
    out.capacity = capacity;
    out.stride = stride;
    return out;
}

/* Any status but SDS_OK (for CREATE_REFUSED). */
#define ANY_FAILURE ((SdsStatus)-1)

/* sds_engine_create_async with texts it must refuse: status `want` (or any failure) with a
 * message containing `needle`, and *out reset to NULL; an engine made by mistake is destroyed. */
static void create_refused(const char *p, const char *s, const char *o, SdsStatus want,
                           const char *needle, int line) {
    SdsEngine *engine = (SdsEngine *)&engine;
    SdsStatus got = account("sds_engine_create_async(...)", line,
                            (reset_message(), sds_engine_create_async(p, s, o, &engine)));
    if (want == ANY_FAILURE)
        fails("sds_engine_create_async", line, got);
    else
        expect("sds_engine_create_async", line, got, want, needle);
    if (engine != NULL) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c:%d: a refused create left *out = %p\n", line, (void *)engine);
        if (engine != (SdsEngine *)&engine) sds_engine_destroy(engine);
    }
}

#define CREATE_REFUSED(p, s, o, want, needle) create_refused(p, s, o, want, needle, __LINE__)

/* Every pointer argument NULL, one at a time, on a live handle and without one. */
static void null_arguments(SdsEngine *engine) {
    SdsFrame frame = frame_of(pixels, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
    SdsFrame no_data = frame_of(NULL, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
    uint8_t buffer[64 * 64 * 3];
    SdsOutput out = output_to(buffer, sizeof buffer, 0);
    SdsOutput out_no_data = output_to(NULL, sizeof buffer, 0);
    SdsControlImage control = {"net", frame};
    SdsControlImage control_null_id = {NULL, frame};
    SdsControlImage control_null_data = {"net", no_data};
    int64_t ts = 1;
    uint64_t id;
    uint32_t w, h;
    size_t size;
    char *json;
    SdsUpdateKind kind;
    char text[64];
    SdsEngine *made = NULL;

    EXPECT(sds_engine_create(NULL, settings, NULL, &made), SDS_ERR_NULL, "`params_json`");
    EXPECT(sds_engine_create(params, NULL, NULL, &made), SDS_ERR_NULL, "`settings_json`");
    EXPECT(sds_engine_create(params, settings, NULL, NULL), SDS_ERR_NULL, "`out`");
    CREATE_REFUSED(NULL, settings, NULL, SDS_ERR_NULL, "`params_json`");
    CREATE_REFUSED(params, NULL, NULL, SDS_ERR_NULL, "`settings_json`");
    EXPECT(sds_engine_create_async(params, settings, NULL, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_create_async(NULL, NULL, NULL, NULL), SDS_ERR_NULL, NULL);

    EXPECT(sds_engine_wait_ready(NULL, 0), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_destroy(NULL), SDS_OK, NULL);
    EXPECT(sds_engine_close(NULL), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_restart(NULL), SDS_ERR_NULL, "`engine`");

    EXPECT(sds_engine_process(NULL, &frame, &out), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_process(engine, NULL, &out), SDS_ERR_NULL, "`frame`");
    EXPECT(sds_engine_process(engine, &frame, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_process(engine, &frame, &out_no_data), SDS_ERR_NULL, "`out->data`");
    EXPECT(sds_engine_process(engine, &no_data, &out), SDS_ERR_NULL, "`frame->data`");
    EXPECT(sds_engine_process(NULL, NULL, NULL), SDS_ERR_NULL, "`engine`");

    EXPECT(sds_engine_process_with_controls(NULL, &frame, &control, 1, &out), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_process_with_controls(engine, NULL, &control, 1, &out), SDS_ERR_NULL,
           "`frame`");
    EXPECT(sds_engine_process_with_controls(engine, &frame, NULL, 1, &out), SDS_ERR_NULL,
           "`controls` is NULL");
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control_null_id, 1, &out),
           SDS_ERR_NULL, "`controls[0].controlnet_id`");
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control_null_data, 1, &out),
           SDS_ERR_NULL, "`controls[0].frame.data`");
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control, 1, NULL), SDS_ERR_NULL,
           "`out`");
    EXPECT(sds_engine_process_with_controls(engine, &frame, &control, 1, &out_no_data),
           SDS_ERR_NULL, "`out->data`");

    EXPECT(sds_engine_submit(NULL, &frame, &id), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_submit(engine, NULL, &id), SDS_ERR_NULL, "`frame`");
    EXPECT(sds_engine_submit(engine, &no_data, NULL), SDS_ERR_NULL, "`frame->data`");
    EXPECT(sds_engine_submit_with_timestamp(NULL, &frame, 1, &id), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_submit_with_timestamp(engine, NULL, 1, &id), SDS_ERR_NULL, "`frame`");
    EXPECT(sds_engine_submit_with_timestamp(engine, &no_data, 1, NULL), SDS_ERR_NULL,
           "`frame->data`");
    EXPECT(sds_engine_submit_with_controls(NULL, &frame, &control, 1, &ts, &id), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_submit_with_controls(engine, NULL, &control, 1, &ts, &id), SDS_ERR_NULL,
           "`frame`");
    EXPECT(sds_engine_submit_with_controls(engine, &frame, NULL, 3, &ts, &id), SDS_ERR_NULL,
           "`count` is 3");
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &control_null_id, 1, NULL, NULL),
           SDS_ERR_NULL, "`controls[0].controlnet_id`");
    EXPECT(sds_engine_submit_with_controls(engine, &frame, &control_null_data, 1, NULL, NULL),
           SDS_ERR_NULL, "`controls[0].frame.data`");

    EXPECT(sds_engine_poll(NULL, &out), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_poll(engine, NULL), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_poll(engine, &out_no_data), SDS_ERR_NULL, "`out->data`");
    EXPECT(sds_engine_recv(NULL, &out, 1), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_recv(engine, NULL, 1), SDS_ERR_NULL, "`out`");
    EXPECT(sds_engine_recv(engine, &out_no_data, 1), SDS_ERR_NULL, "`out->data`");
    EXPECT(sds_engine_flush(NULL, &size), SDS_ERR_NULL, "`engine`");

    EXPECT(sds_engine_output_size(NULL, SDS_PIXEL_FORMAT_RGB8, &w, &h, &size), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, NULL, &h, &size), SDS_ERR_NULL,
           "`width`");
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &w, NULL, &size), SDS_ERR_NULL,
           "`height`");
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &w, &h, NULL), SDS_ERR_NULL,
           "`size`");

    EXPECT(sds_engine_update_params(NULL, params, &kind), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_update_params(engine, NULL, &kind), SDS_ERR_NULL, "`params_json`");
    EXPECT(sds_engine_status_json(NULL, &json), SDS_ERR_NULL, "`engine`");
    EXPECT(sds_engine_status_json(engine, NULL), SDS_ERR_NULL, "`out`");

    READS(sds_engine_last_error(NULL));
    EXPECT(sds_engine_last_error_copy(NULL, text, sizeof text, &size), SDS_ERR_NULL,
           "`engine`");
    EXPECT(sds_engine_last_error_copy(engine, NULL, 8, &size), SDS_ERR_NULL, "`buf`");
    /* NULL buffer with cap 0: asks for the length only */
    EXPECT(sds_engine_last_error_copy(engine, NULL, 0, NULL), SDS_ERR_BUFFER_TOO_SMALL, "cap");
    sds_string_free(NULL);
    atomic_fetch_add(&calls, 1);
    READS(sds_version());
    READS(sds_last_error());
}

/* Strings that are not UTF-8, not JSON, not the right JSON. */
static void bad_strings(SdsEngine *engine) {
    static const char *not_utf8[] = {"\xff", "{\"prompt\": \"\xc3\"}",
                                     "{\"prompt\": \"\xed\xa0\x80\"}", /* a surrogate */
                                     "{\"prompt\": \"\xc0\xaf\"}"};       /* overlong */
    static const char *not_json[] = {
        "", " ", "{", "}", "{\"prompt\": \"a lighthouse", "{\"prompt\": }", "{}{}", "{} x",
        "nul", "[", "{\"prompt\": \"\\ud800\"}", "{\"prompt\": \"\\x41\"}",
        "{\"guidance_scale\": 1e999}", "{\"seed\": 0x10}", "{'prompt': 'single quotes'}",
        "{\"prompt\": \"a\",}", "\xef\xbb\xbf{}" /* a byte order mark */};
    static const char *wrong_json[] = {
        "null", "42", "\"a string\"", "[]", "[1, 2]", "true",
        "{\"prompt\": 42}", "{\"prompt\": [[\"a\", \"heavy\"]]}", "{\"seed\": -1.5}",
        "{\"width\": 1e10}", "{\"t_index_list\": [\"one\"]}", "{\"controlnets\": {}}",
        "{\"controlnets\": [[1, 2]]}", "{\"no_such_field\": 1}", "{\"delta\": \"much\"}",
        "{\"model_id\": \"\"}", "{\"model_id\": \"/nonexistent/sdstream-model\"}",
        "{\"ip_adapter\": 5}", "{\"lora_dict\": []}"};
    SdsUpdateKind kind;
    for (size_t i = 0; i < sizeof not_utf8 / sizeof *not_utf8; i++) {
        CREATE_REFUSED(not_utf8[i], settings, NULL, SDS_ERR_INVALID_ARGUMENT, "UTF-8");
        CREATE_REFUSED(params, not_utf8[i], NULL, SDS_ERR_INVALID_ARGUMENT, "UTF-8");
        CREATE_REFUSED(params, settings, not_utf8[i], SDS_ERR_INVALID_ARGUMENT, "UTF-8");
        EXPECT(sds_engine_update_params(engine, not_utf8[i], &kind), SDS_ERR_INVALID_ARGUMENT,
               "UTF-8");
        SdsFrame frame = frame_of(pixels, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
        SdsControlImage control = {not_utf8[i], frame};
        EXPECT(sds_engine_submit_with_controls(engine, &frame, &control, 1, NULL, NULL),
               SDS_ERR_INVALID_ARGUMENT, "UTF-8");
    }
    for (size_t i = 0; i < sizeof not_json / sizeof *not_json; i++) {
        CREATE_REFUSED(not_json[i], settings, NULL, SDS_ERR_INVALID_JSON, NULL);
        CREATE_REFUSED(params, not_json[i], NULL, SDS_ERR_INVALID_JSON, NULL);
        CREATE_REFUSED(params, settings, not_json[i], SDS_ERR_INVALID_JSON, "engine options");
        EXPECT(sds_engine_update_params(engine, not_json[i], &kind), SDS_ERR_INVALID_JSON, NULL);
    }
    for (size_t i = 0; i < sizeof wrong_json / sizeof *wrong_json; i++) {
        CREATE_REFUSED(wrong_json[i], settings, NULL, ANY_FAILURE, NULL);
        CREATE_REFUSED(params, wrong_json[i], NULL, ANY_FAILURE, NULL);
        CREATE_REFUSED(params, settings, wrong_json[i], ANY_FAILURE, NULL);
        FAILS(sds_engine_update_params(engine, wrong_json[i], &kind));
    }
    /* One MiB texts: nesting far past any limit, an unterminated string, a huge number. */
    enum { BIG = 1 << 20 };
    char *big = (char *)malloc(BIG + 1);
    const char fills[] = {'[', '{', '"', '9', ' '};
    for (size_t f = 0; f < sizeof fills; f++) {
        memset(big, fills[f], BIG);
        big[BIG] = '\0';
        if (fills[f] == '"') memcpy(big, "{\"prompt\": ", 11);
        CREATE_REFUSED(big, settings, NULL, ANY_FAILURE, NULL);
        CREATE_REFUSED(params, settings, big, ANY_FAILURE, NULL);
        FAILS(sds_engine_update_params(engine, big, &kind));
    }
    free(big);
}

/* Issue #20 item 2: options that would size a queue of 10^9 frames, or overflow, are refused. */
static void absurd_options(void) {
    static const char *ranges[][2] = {
        {"{\"queue_capacity\": 1000000000}", "queue_capacity"},
        {"{\"queue_capacity\": 18446744073709551615}", "queue_capacity"},
        {"{\"output_capacity\": 1000000000}", "output_capacity"},
        {"{\"output_capacity\": 18446744073709551615}", "output_capacity"},
        {"{\"queue_capacity\": 0}", "queue_capacity"},
        {"{\"output_capacity\": 1025}", "output_capacity"},
        {"{\"input_timeout_ms\": 18446744073709551615}", "input_timeout_ms"},
        {"{\"fps_window_ms\": 0}", "fps_window_ms"},
        {"{\"fps_window_ms\": 3600001}", "fps_window_ms"}};
    for (size_t i = 0; i < sizeof ranges / sizeof *ranges; i++)
        CREATE_REFUSED(params, settings, ranges[i][0], SDS_ERR_INVALID_PARAMS, ranges[i][1]);
    /* Not representable at all: a JSON error naming the option. */
    static const char *types[][2] = {
        {"{\"queue_capacity\": 18446744073709551616}", "queue_capacity"},
        {"{\"queue_capacity\": -1}", "queue_capacity"},
        {"{\"output_capacity\": 1e20}", "output_capacity"},
        {"{\"output_capacity\": \"8\"}", "output_capacity"},
        {"{\"input_timeout_ms\": -5}", "input_timeout_ms"},
        {"{\"fps_window_ms\": 2.5}", "fps_window_ms"},
        {"{\"drop_policy\": \"sometimes\"}", "drop_policy"},
        {"{\"warmup\": 1}", "warmup"},
        {"{\"queue_depth\": 3}", "queue_depth"},
        {"[2, 8]", "object"}};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        CREATE_REFUSED(params, settings, types[i][0], SDS_ERR_INVALID_JSON, types[i][1]);
}

/* Issue #20 item 3 and friends: frame descriptions too large to allocate, zero sizes, strides
 * that wrap, unknown formats. Each points at a 16-byte buffer: refused before any byte is read. */
static void absurd_frames(SdsEngine *engine) {
    struct {
        uint32_t w, h, stride;
        SdsPixelFormat format;
        SdsStatus want;
        const char *needle;
    } cases[] = {
        {1u << 30, 1u << 30, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "at most 16384"},
        {65536, 65536, 0, SDS_PIXEL_FORMAT_RGBA8, SDS_ERR_INVALID_FRAME, "at most 16384"},
        {1u << 28, 1, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "at most 16384"},
        {1, 1u << 28, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "at most 16384"},
        {16385, 1, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "at most 16384"},
        {UINT32_MAX, UINT32_MAX, 0, SDS_PIXEL_FORMAT_RGBF32, SDS_ERR_INVALID_FRAME, "16384"},
        {UINT32_MAX, 1, UINT32_MAX, SDS_PIXEL_FORMAT_RGBF32, SDS_ERR_INVALID_FRAME, "16384"},
        {16384, 16384, UINT32_MAX, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "spans more"},
        {1, 2, UINT32_MAX, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "spans more"},
        {16384, 16384, 1u << 20, SDS_PIXEL_FORMAT_RGBF32, SDS_ERR_INVALID_FRAME, "spans more"},
        {0, 64, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "non-zero"},
        {64, 0, 0, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "non-zero"},
        {0, 0, 0, SDS_PIXEL_FORMAT_RGBA8, SDS_ERR_INVALID_FRAME, "non-zero"},
        {64, 64, 1, SDS_PIXEL_FORMAT_RGB8, SDS_ERR_INVALID_FRAME, "stride 1 "},
        {16384, 2, 16384 * 4 - 1, SDS_PIXEL_FORMAT_BGRA8, SDS_ERR_INVALID_FRAME, "stride"},
        {64, 64, 0, 4, SDS_ERR_INVALID_ARGUMENT, "pixel format 4"},
        {64, 64, 0, 0x80000000u, SDS_ERR_INVALID_ARGUMENT, "pixel format 2147483648"},
        {1u << 30, 1u << 30, 0, UINT32_MAX, SDS_ERR_INVALID_ARGUMENT, "pixel format"},
    };
    uint8_t buffer[64 * 64 * 4];
    SdsFrame good = frame_of(pixels, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        SdsFrame bad = frame_of(tiny, cases[i].w, cases[i].h, cases[i].stride, cases[i].format);
        SdsControlImage control = {"net", bad};
        SdsOutput out = output_to(buffer, sizeof buffer, 0);
        uint64_t id = 77;
        int64_t ts = 5;
        EXPECT(sds_engine_submit(engine, &bad, &id), cases[i].want, cases[i].needle);
        EXPECT(sds_engine_submit_with_timestamp(engine, &bad, 9, &id), cases[i].want,
               cases[i].needle);
        EXPECT(sds_engine_process(engine, &bad, &out), cases[i].want, cases[i].needle);
        EXPECT(sds_engine_submit_with_controls(engine, &good, &control, 1, &ts, &id),
               cases[i].want, "controls[0].frame");
        EXPECT(sds_engine_process_with_controls(engine, &bad, NULL, 0, &out), cases[i].want,
               cases[i].needle);
        if (id != 77) {
            atomic_fetch_add(&unexpected, 1);
            fprintf(stderr, "abuse.c: frame case %zu: a refused submit wrote an id\n", i);
        }
    }
    /* Control image counts that cannot be arrays. */
    SdsControlImage control = {"net", good};
    SdsOutput out = output_to(buffer, sizeof buffer, 0);
    EXPECT(sds_engine_submit_with_controls(engine, &good, &control, SIZE_MAX, NULL, NULL),
           SDS_ERR_INVALID_ARGUMENT, "`count`");
    EXPECT(sds_engine_process_with_controls(engine, &good, &control, SIZE_MAX / 2, &out),
           SDS_ERR_INVALID_ARGUMENT, "`count`");
    /* A control image for a net the parameters do not have. */
    EXPECT(sds_engine_submit_with_controls(engine, &good, &control, 1, NULL, NULL),
           SDS_ERR_INVALID_PARAMS, "\"net\"");
    /* Output buffers: zero, one byte short, strides that are too short or span past 4 GiB. */
    uint32_t w = 0, h = 0;
    size_t size = 0;
    EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGB8, &w, &h, &size), SDS_OK, NULL);
    struct {
        size_t capacity;
        uint32_t stride;
        const char *needle;
    } outs[] = {{0, 0, "needs"}, {1, 0, "needs"}, {size - 1, 0, "needs"},
                {sizeof buffer, 1, "stride 1 "}, {sizeof buffer, UINT32_MAX, "spans more"},
                {sizeof buffer, 64 * 3 * 64, "needs"}};
    for (size_t i = 0; i < sizeof outs / sizeof *outs; i++) {
        out = output_to(buffer, outs[i].capacity, outs[i].stride);
        EXPECT(sds_engine_process(engine, &good, &out), SDS_ERR_BUFFER_TOO_SMALL,
               outs[i].needle);
        if (out.size == 0 || out.width != w || out.height != h) {
            atomic_fetch_add(&unexpected, 1);
            fprintf(stderr, "abuse.c: output case %zu: size %zu, %ux%u\n", i, out.size,
                    out.width, out.height);
        }
        out = output_to(buffer, outs[i].capacity, outs[i].stride);
        FAILS(sds_engine_poll(engine, &out)); /* nothing is ready, or the buffer is refused */
    }
    static const SdsPixelFormat formats[] = {4, 5, 255, 0x80000000u, UINT32_MAX};
    for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
        EXPECT(sds_engine_output_size(engine, formats[i], &w, &h, &size),
               SDS_ERR_INVALID_ARGUMENT, "pixel format");
    /* Timeouts at their extremes on a live engine: immediate answers. */
    FAILS(sds_engine_recv(engine, &out, 0));
    size_t len = 0;
    char small[4];
    EXPECT(sds_engine_last_error_copy(engine, small, sizeof small, &len),
           SDS_ERR_BUFFER_TOO_SMALL, "needs");
    if (len < sizeof small || strlen(small) != sizeof small - 1) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c: last_error_copy into 4 bytes: len %zu, \"%s\"\n", len, small);
    }
}

/* xorshift64*: the same descriptions on every run. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* Random frame descriptions, each backed by exactly the bytes the header says it spans (a
 * malloc of that size, when valid and at most 1 MiB): AddressSanitizer sees any read past them,
 * also inside the library's copies. Invalid ones point at 16 bytes and must be refused. */
enum { RANDOM_FRAMES = 3000 };
static long random_copied, random_refused;

static void random_frames(void) {
    SdsEngine *engine = NULL;
    EXPECT(sds_engine_create_async(params, settings, "{\"warmup\": false}", &engine), SDS_OK,
           NULL);
    if (!engine) return;
    /* Closed: a valid frame is still copied in full, then refused as closed (no inference). */
    EXPECT(sds_engine_close(engine), SDS_OK, NULL);
    static const uint32_t sides[] = {0, 1, 2, 63, 64, 65, 16383, 16384, 16385, 65536,
                                     1u << 28, 1u << 30, UINT32_MAX};
    static const uint64_t bpp_of[] = {3, 4, 4, 12};
    for (int i = 0; i < RANDOM_FRAMES; i++) {
        uint64_t r = rng_next();
        uint32_t format = (r & 7) == 0 ? (uint32_t)(r >> 32) | 4u : (uint32_t)(r % 4);
        uint32_t w = (r >> 8) % 4 ? 1 + (uint32_t)(rng_next() % 300)
                                  : sides[rng_next() % (sizeof sides / sizeof *sides)];
        uint32_t h = (r >> 12) % 4 ? 1 + (uint32_t)(rng_next() % 300)
                                   : sides[rng_next() % (sizeof sides / sizeof *sides)];
        uint64_t bpp = format < 4 ? bpp_of[format] : 4;
        uint64_t row = (uint64_t)w * bpp;
        uint32_t stride;
        switch (rng_next() % 5) {
        case 0: stride = 0; break;
        case 1: stride = row <= UINT32_MAX ? (uint32_t)row : UINT32_MAX; break;
        case 2: stride = row + 64 <= UINT32_MAX ? (uint32_t)(row + rng_next() % 64) : 7; break;
        case 3: stride = row > 0 && row <= UINT32_MAX ? (uint32_t)(row - 1) : 1; break;
        default: stride = (uint32_t)rng_next(); break;
        }
        uint64_t used = stride ? stride : row;
        int valid = format < 4 && w >= 1 && w <= 16384 && h >= 1 && h <= 16384 && used >= row &&
                    used * (h - 1) + row <= (4ull << 30);
        uint64_t spans = valid ? used * (h - 1) + row : 0;
        if (valid && spans > (1u << 20)) continue; /* not backed here */
        uint8_t *data = valid ? (uint8_t *)malloc(spans) : tiny;
        if (valid) memset(data, 0x5A, spans);
        SdsFrame frame = frame_of(data, w, h, stride, format);
        SdsStatus want = valid ? SDS_ERR_CLOSED
                               : format >= 4 ? SDS_ERR_INVALID_ARGUMENT : SDS_ERR_INVALID_FRAME;
        uint64_t id = 0;
        SdsStatus got = i % 2 ? CALL(sds_engine_submit(engine, &frame, &id))
                              : CALL(sds_engine_submit_with_controls(engine, &frame, NULL, 0,
                                                                     NULL, &id));
        if (got != want) {
            atomic_fetch_add(&unexpected, 1);
            fprintf(stderr, "abuse.c: random frame %d: %ux%u stride %u format %u: %d, want %d: %s\n",
                    i, w, h, stride, format, (int)got, (int)want, sds_last_error());
        }
        if (valid) {
            random_copied++;
            free(data);
        } else {
            random_refused++;
        }
    }
    EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);
}

/* Every entry point on a closed engine, and close twice, on several distinct handles. */
static void closed_engines(void) {
    enum { HANDLES = 3 };
    SdsEngine *engines[HANDLES] = {NULL, NULL, NULL};
    for (int i = 0; i < HANDLES; i++)
        EXPECT(sds_engine_create_async(params, settings, "{\"warmup\": false}", &engines[i]),
               SDS_OK, NULL);
    SdsFrame frame = frame_of(pixels, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
    uint8_t buffer[64 * 64 * 3];
    SdsOutput out = output_to(buffer, sizeof buffer, 0);
    SdsControlImage control = {"net", frame};
    for (int i = 0; i < HANDLES; i++) {
        SdsEngine *engine = engines[i];
        if (!engine) continue;
        /* The first closes while loading, the others once ready. */
        if (i > 0) EXPECT(sds_engine_wait_ready(engine, -1), SDS_OK, NULL);
        EXPECT(sds_engine_close(engine), SDS_OK, NULL);
        EXPECT(sds_engine_close(engine), SDS_OK, NULL);
        EXPECT(sds_engine_submit(engine, &frame, NULL), SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_submit_with_timestamp(engine, &frame, 3, NULL), SDS_ERR_CLOSED,
               "closed");
        EXPECT(sds_engine_submit_with_controls(engine, &frame, NULL, 0, NULL, NULL),
               SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_process(engine, &frame, &out), SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_process_with_controls(engine, &frame, NULL, 0, &out), SDS_ERR_CLOSED,
               "closed");
        EXPECT(sds_engine_update_params(engine, params_other, NULL), SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_recv(engine, &out, UINT32_MAX), SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_poll(engine, &out), SDS_ERR_NO_OUTPUT, NULL);
        /* Closed comes first for a control image no net takes; a text that is not JSON is
         * refused as such. */
        EXPECT(sds_engine_submit_with_controls(engine, &frame, &control, 1, NULL, NULL),
               SDS_ERR_CLOSED, "closed");
        EXPECT(sds_engine_update_params(engine, "{", NULL), SDS_ERR_INVALID_JSON, NULL);
        FAILS(sds_engine_restart(engine));
        FAILS(sds_engine_wait_ready(engine, 0));
        FAILS(sds_engine_wait_ready(engine, -1));
        size_t dropped = 99;
        EXPECT(sds_engine_flush(engine, &dropped), SDS_OK, NULL);
        uint32_t w, h;
        size_t size;
        EXPECT(sds_engine_output_size(engine, SDS_PIXEL_FORMAT_RGBA8, &w, &h, &size), SDS_OK,
               NULL);
        char *json = NULL;
        EXPECT(sds_engine_status_json(engine, &json), SDS_OK, NULL);
        if (json && !strstr(json, "\"state\":\"OFFLINE\"")) {
            atomic_fetch_add(&unexpected, 1);
            fprintf(stderr, "abuse.c: closed engine %d status: %s\n", i, json);
        }
        sds_string_free(json);
        READS(sds_engine_last_error(engine));
        char text[256];
        EXPECT(sds_engine_last_error_copy(engine, text, sizeof text, NULL), SDS_OK, NULL);
    }
    /* Destroyed in another order than made; the strings last_error returned outlive them. */
    const char *kept = sds_engine_last_error(engines[1]);
    for (int i = HANDLES - 1; i >= 0; i--) EXPECT(sds_engine_destroy(engines[i]), SDS_OK, NULL);
    READS(kept);
}

/* Several threads on one loaded engine, one of them closing it three quarters of the way. */
enum { THREADS = 6, ROUNDS = 160 };
static SdsEngine *shared;

static void *hammer(void *arg) {
    int me = (int)(intptr_t)arg;
    uint8_t buffer[64 * 64 * 4];
    SdsFrame frame = frame_of(pixels, 64, 64, 0, SDS_PIXEL_FORMAT_RGB8);
    SdsFrame bad = frame_of(tiny, 1u << 30, 1u << 30, 0, SDS_PIXEL_FORMAT_RGB8);
    for (int round = 0; round < ROUNDS; round++) {
        SdsOutput out = output_to(buffer, sizeof buffer, 0);
        uint64_t id;
        SdsUpdateKind kind;
        switch ((me + round) % 8) {
        case 0:
            if (CALL(sds_engine_submit(shared, &frame, &id)) == SDS_OK)
                atomic_fetch_add(&frames_accepted, 1);
            CALL(sds_engine_submit_with_timestamp(shared, &bad, round, &id));
            break;
        case 1:
            if (CALL(sds_engine_poll(shared, &out)) == SDS_OK) atomic_fetch_add(&outputs_taken, 1);
            out = output_to(buffer, sizeof buffer, 0);
            if (CALL(sds_engine_recv(shared, &out, 1)) == SDS_OK)
                atomic_fetch_add(&outputs_taken, 1);
            break;
        case 2:
            CALL(sds_engine_update_params(shared, (round & 1) ? params : params_other, &kind));
            CALL(sds_engine_update_params(shared, "{\"guidance_scale\": \"x\"}", &kind));
            break;
        case 3: {
            char *json = NULL;
            if (CALL(sds_engine_status_json(shared, &json)) == SDS_OK) sds_string_free(json);
            break;
        }
        case 4: {
            READS(sds_engine_last_error(shared));
            char text[32];
            size_t len;
            CALL(sds_engine_last_error_copy(shared, text, sizeof text, &len));
            break;
        }
        case 5: {
            uint32_t w, h;
            size_t size, dropped;
            CALL(sds_engine_output_size(shared, SDS_PIXEL_FORMAT_BGRA8, &w, &h, &size));
            CALL(sds_engine_flush(shared, &dropped));
            break;
        }
        case 6:
            if (round % 16 == 6) {
                if (CALL(sds_engine_process(shared, &frame, &out)) == SDS_OK)
                    atomic_fetch_add(&outputs_taken, 1);
            } else CALL(sds_engine_submit_with_controls(shared, &bad, NULL, 0, NULL, &id));
            break;
        default:
            CALL(sds_engine_wait_ready(shared, 0));
            /* A rebuild in the background now and then (each one pauses the outputs). */
            if (round % 64 == 7) CALL(sds_engine_restart(shared));
            break;
        }
        if (me == 0 && round == ROUNDS * 3 / 4) CALL(sds_engine_close(shared));
        /* Paced like a host's frame loop, so that a few frames are processed (each takes a
         * few hundred ms here) before the close. */
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void concurrent(void) {
    EXPECT(sds_engine_create(params, settings, "{\"warmup\": false}", &shared), SDS_OK, NULL);
    if (!shared) return;
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&threads[i], NULL, hammer, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    char *json = NULL;
    EXPECT(sds_engine_status_json(shared, &json), SDS_OK, NULL);
    if (json && !strstr(json, "\"state\":\"OFFLINE\"")) {
        atomic_fetch_add(&unexpected, 1);
        fprintf(stderr, "abuse.c: the hammered engine was not closed: %s\n", json);
    }
    sds_string_free(json);
    EXPECT(sds_engine_destroy(shared), SDS_OK, NULL);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: abuse MODEL_DIR VAE_DIR\n");
        return 2;
    }
    const char *fmt = "{\"model_id\": \"%s\", \"prompt\": \"%s\", \"width\": 64, \"height\": 64}";
    snprintf(params, sizeof params, fmt, argv[1], "a lighthouse");
    snprintf(params_other, sizeof params_other, fmt, argv[1], "a stormy sea");
    snprintf(settings, sizeof settings, "{\"vae\": \"%s\", \"allow_any_resolution\": true}",
             argv[2]);
    pixels = (uint8_t *)malloc(64 * 64 * 3);
    for (int i = 0; i < 64 * 64 * 3; i++) pixels[i] = (uint8_t)(i * 7);

    SdsEngine *engine = NULL;
    EXPECT(sds_engine_create_async(params, settings, "{\"warmup\": false}", &engine), SDS_OK,
           NULL);
    if (engine) {
        null_arguments(engine);
        bad_strings(engine);
        absurd_frames(engine);
        EXPECT(sds_engine_destroy(engine), SDS_OK, NULL);
    }
    absurd_options();
    random_frames();
    closed_engines();
    concurrent();
    free(pixels);

    printf("abuse: calls %ld, failing calls %ld, errors with messages %ld, errors without "
           "messages %ld, no-output answers %ld, panics %ld, unexpected outcomes %ld; threads "
           "%d: frames accepted %ld, outputs taken %ld; random frames: copied %ld, refused %ld\n",
           (long)calls, (long)failures, (long)with_message, (long)without_message,
           (long)no_output, (long)panics, (long)unexpected, THREADS, (long)frames_accepted,
           (long)outputs_taken, random_copied, random_refused);
    return (without_message || panics || unexpected || !engine) ? 1 : 0;
}
