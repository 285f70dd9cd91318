/* Per-thread scratch that outlives a kernel call.
 *
 * A kernel call needs about a megabyte of scratch per thread (the score tile).  malloc'ing it
 * per call maps fresh pages that the kernel must fault in and zero every time (several
 * percent of a call here).  Each thread keeps its largest buffer instead; a thread's buffer
 * is freed when the thread exits (pthread key destructor).  A thread runs one kernel call at
 * a time, so the buffer is never shared.
 *
 * The buffer is 64-byte aligned: malloc returns large blocks 16 bytes past a page boundary,
 * and with the query rows there every other 32-byte load of them straddled two cache lines
 * (the streaming Q·Kᵀ kernel for four rows ran 1.3x slower in cache, C harness).
 */
#ifndef FASTATTN_SCRATCH_H
#define FASTATTN_SCRATCH_H

#include <pthread.h>
#include <stdlib.h>

typedef struct { size_t size; void *ptr; } fa_scratch_t;

static pthread_key_t fa_scratch_key;
static pthread_once_t fa_scratch_once = PTHREAD_ONCE_INIT;
static int fa_scratch_key_ok = 0;

static void fa_scratch_release(void *p) {
    fa_scratch_t *s = (fa_scratch_t *)p;
    free(s->ptr);
    free(s);
}

static void fa_scratch_make_key(void) {
    fa_scratch_key_ok = pthread_key_create(&fa_scratch_key, fa_scratch_release) == 0;
}

/* A buffer of at least `bytes` owned by the calling thread, or NULL when out of memory. */
static void *fa_scratch(size_t bytes) {
    pthread_once(&fa_scratch_once, fa_scratch_make_key);
    if (!fa_scratch_key_ok) return NULL;
    fa_scratch_t *s = (fa_scratch_t *)pthread_getspecific(fa_scratch_key);
    if (!s) {
        s = (fa_scratch_t *)calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(fa_scratch_key, s) != 0) { free(s); return NULL; }
    }
    if (s->size < bytes) {
        free(s->ptr);
        if (posix_memalign(&s->ptr, 64, bytes) != 0) s->ptr = NULL;
        s->size = s->ptr ? bytes : 0;
    }
    return s->ptr;
}

#endif  /* FASTATTN_SCRATCH_H */
