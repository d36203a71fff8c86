/*
 * arena: a bump allocator for short-lived objects (one SMTP transaction's
 * envelope). Allocation is a pointer bump; arena_reset frees everything at
 * once and keeps the first block for the next transaction.
 *
 * Not thread-safe: an arena belongs to one connection on one worker.
 */
#ifndef POSTHASTE_CORE_ARENA_H
#define POSTHASTE_CORE_ARENA_H

#include <stddef.h>

struct arena_block;

struct arena {
	struct arena_block *head; /* current block; older ones chained behind it */
	size_t block_size;
	size_t used_total; /* bytes handed out since the last reset */
};

/* block_size: the usual block (larger requests get their own block). */
void arena_init(struct arena *a, size_t block_size);
/* Returns 8-byte-aligned memory, or NULL when out of memory. */
void *arena_alloc(struct arena *a, size_t size);
/* Copies len bytes and appends a NUL. NULL when out of memory. */
char *arena_strndup(struct arena *a, const char *s, size_t len);
/* Frees all allocations but keeps one block. */
void arena_reset(struct arena *a);
/* Frees everything. */
void arena_deinit(struct arena *a);

#endif
