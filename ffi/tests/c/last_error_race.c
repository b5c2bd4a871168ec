/* Regression test for issue #20 item 5: reading sds_engine_last_error(e) on one thread while
 * another thread fails calls on the same handle must be safe (it was a use-after-free: the
 * pointer handed out was the handle's own message, freed by the next failure).
 *
 *   last_error_race MODEL_DIR VAE_DIR
 *
 * One thread fails sds_engine_submit on the handle ITERATIONS times, with messages of two
 * lengths; the reading threads call sds_engine_last_error and sds_engine_last_error_copy
 * ITERATIONS times each and check every message they see is one of the failures' (never torn,
 * never empty after the first failure). Run under AddressSanitizer by ffi/tests/c_api.rs: a
 * read of a freed message is a sanitizer report. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "sdstream.h"

enum { ITERATIONS = 20000 };

static SdsEngine *engine;
static const uint8_t pixels[4] = {0, 0, 0, 0};

/* Whether `message` is one the failing thread can have left: empty before its first failure,
 * then a frame error of sds_engine_submit. */
static int plausible(const char *message) {
    return message[0] == '\0' || strncmp(message, "sds_engine_submit: ", 19) == 0;
}

static void *fail_calls(void *arg) {
    (void)arg;
    /* Two different messages (a zero width, a stride shorter than a row) so that every failure
     * replaces the previous one. */
    SdsFrame empty = {pixels, 0, 1, 0, SDS_PIXEL_FORMAT_RGB8};
    SdsFrame short_stride = {pixels, 1, 1, 1, SDS_PIXEL_FORMAT_RGB8};
    long unexpected = 0;
    for (int i = 0; i < ITERATIONS; i++) {
        SdsStatus st = sds_engine_submit(engine, (i & 1) ? &short_stride : &empty, NULL);
        unexpected += st != SDS_ERR_INVALID_FRAME;
    }
    return (void *)unexpected;
}

static void *read_pointer(void *arg) {
    (void)arg;
    long bad = 0;
    for (int i = 0; i < ITERATIONS; i++) {
        const char *message = sds_engine_last_error(engine);
        /* A host does some work before it logs the message: meanwhile the other thread fails
         * more calls. */
        for (volatile int k = 0; k < 1000; k++) {
        }
        char copy[512];
        /* Reads the whole string, as a host logging it would. */
        size_t n = strlen(message);
        memcpy(copy, message, n < sizeof copy ? n + 1 : sizeof copy);
        copy[sizeof copy - 1] = '\0';
        bad += !plausible(copy);
    }
    return (void *)bad;
}

static void *read_copy(void *arg) {
    (void)arg;
    long bad = 0;
    for (int i = 0; i < ITERATIONS; i++) {
        char buffer[512];
        size_t len = 0;
        SdsStatus st = sds_engine_last_error_copy(engine, buffer, sizeof buffer, &len);
        bad += st != SDS_OK || len != strlen(buffer) || !plausible(buffer);
    }
    return (void *)bad;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: last_error_race MODEL_DIR VAE_DIR\n");
        return 2;
    }
    char params[4096], settings[4096];
    snprintf(params, sizeof params,
             "{\"model_id\": \"%s\", \"prompt\": \"a lighthouse\", \"width\": 64, \"height\": 64}",
             argv[1]);
    snprintf(settings, sizeof settings, "{\"vae\": \"%s\", \"allow_any_resolution\": true}",
             argv[2]);
    /* No frame is ever accepted, so the pipeline need not be loaded. */
    if (sds_engine_create_async(params, settings, NULL, &engine) != SDS_OK) {
        fprintf(stderr, "create failed: %s\n", sds_last_error());
        return 1;
    }
    pthread_t failer, readers[2];
    void *(*read_fns[2])(void *) = {read_pointer, read_copy};
    pthread_create(&failer, NULL, fail_calls, NULL);
    for (int i = 0; i < 2; i++) pthread_create(&readers[i], NULL, read_fns[i], NULL);
    void *unexpected = NULL, *bad[2] = {NULL, NULL};
    pthread_join(failer, &unexpected);
    for (int i = 0; i < 2; i++) pthread_join(readers[i], &bad[i]);
    /* After the last failure, the message is the last one's (a stride error: odd index). */
    int last_ok = strstr(sds_engine_last_error(engine), "stride 1") != NULL;
    sds_engine_destroy(engine);
    printf("last_error_race: %d failing calls, %d reads of each kind, %ld unexpected statuses, "
           "%ld implausible messages (pointer), %ld (copy), last message right: %s\n",
           ITERATIONS, ITERATIONS, (long)unexpected, (long)bad[0], (long)bad[1],
           last_ok ? "yes" : "no");
    return (unexpected || bad[0] || bad[1] || !last_ok) ? 1 : 0;
}
