/* scratch.h: one thread's scratch buffer, kept from call to call.
 *
 * A decode step calls every layer once a token, inside the forward pass's
 * thread team; each thread prepares its own copy of the layer's input (cheaper
 * than a barrier and a shared buffer), and a malloc and free per call would
 * make every thread wait on the allocator. The buffer grows to the largest
 * request and is given back after a call that needed more than
 * SCRATCH_KEPT_BYTES, so a long prefill does not pin its memory.
 *
 * Every module including this has its own buffer per thread (static). */
#ifndef QINFER_SCRATCH_H
#define QINFER_SCRATCH_H

#include <stdlib.h>

#define SCRATCH_KEPT_BYTES (1u << 20)

typedef struct {
    void *memory;     /* 64-byte aligned, or NULL */
    size_t bytes;     /* what memory holds */
} scratch;

static __thread scratch thread_scratch = {NULL, 0};

/* At least `bytes` bytes, 64-byte aligned, or NULL when out of memory. */
static void *scratch_take(size_t bytes)
{
    scratch *s = &thread_scratch;
    if (bytes > s->bytes) {
        free(s->memory);
        s->bytes = 0;
        s->memory = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        if (!s->memory)
            return NULL;
        s->bytes = bytes;
    }
    return s->memory;
}

/* The call is done with the buffer: keep it unless it is large. */
static void scratch_done(void)
{
    scratch *s = &thread_scratch;
    if (s->bytes > SCRATCH_KEPT_BYTES) {
        free(s->memory);
        s->memory = NULL;
        s->bytes = 0;
    }
}

#endif
