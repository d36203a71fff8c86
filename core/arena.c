#include "core/arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct arena_block {
	struct arena_block *next;
	size_t size;
	size_t used;
	_Alignas(16) char data[];
};

void arena_init(struct arena *a, size_t block_size)
{
	a->head = NULL;
	a->block_size = block_size ? block_size : 4096;
	a->used_total = 0;
}

void *arena_alloc(struct arena *a, size_t size)
{
	if (size > SIZE_MAX - 7 - sizeof(struct arena_block))
		return NULL; /* rounding or the block header would wrap */
	size = (size + 7) & ~(size_t)7;
	struct arena_block *b = a->head;
	if (!b || b->size - b->used < size) {
		size_t bs = size > a->block_size ? size : a->block_size;
		struct arena_block *nb = malloc(sizeof(*nb) + bs);
		if (!nb)
			return NULL;
		nb->size = bs;
		nb->used = 0;
		nb->next = b;
		a->head = b = nb;
	}
	void *p = b->data + b->used;
	b->used += size;
	a->used_total += size;
	return p;
}

char *arena_strndup(struct arena *a, const char *s, size_t len)
{
	if (len == SIZE_MAX)
		return NULL;
	char *p = arena_alloc(a, len + 1);
	if (!p)
		return NULL;
	memcpy(p, s, len);
	p[len] = '\0';
	return p;
}

void arena_reset(struct arena *a)
{
	/* keep one block of the usual size for the next transaction; free the rest */
	struct arena_block *b, *keep = NULL;
	for (b = a->head; b; b = b->next)
		if (b->size == a->block_size)
			keep = b; /* the oldest such block: the one a transaction starts in */
	b = a->head;
	while (b) {
		struct arena_block *n = b->next;
		if (b != keep)
			free(b);
		b = n;
	}
	if (keep) {
		keep->used = 0;
		keep->next = NULL;
	}
	a->head = keep;
	a->used_total = 0;
}

void arena_deinit(struct arena *a)
{
	struct arena_block *b = a->head;
	while (b) {
		struct arena_block *n = b->next;
		free(b);
		b = n;
	}
	a->head = NULL;
	a->used_total = 0;
}
