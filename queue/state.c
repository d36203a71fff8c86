/* State records and their table: see state.h. */
#include "queue/state.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

bool spool_state_final(enum spool_state st)
{
	return st == SPOOL_STATE_DELETED || st == SPOOL_STATE_DELIVERED ||
	       st == SPOOL_STATE_BOUNCED;
}

void state_payload_encode(uint8_t out[STATE_PAYLOAD_SIZE], enum spool_state st, uint64_t until_ms)
{
	memset(out, 0, STATE_PAYLOAD_SIZE);
	out[0] = (uint8_t)st;
	for (int i = 0; i < 8; i++)
		out[8 + i] = (uint8_t)(until_ms >> (8 * i));
}

int state_payload_decode(const uint8_t *p, size_t len, enum spool_state *st, uint64_t *until_ms)
{
	if (len < STATE_PAYLOAD_SIZE || p[0] < SPOOL_STATE_HELD || p[0] > SPOOL_STATE_BOUNCED)
		return -1;
	*st = (enum spool_state)p[0];
	if (until_ms) {
		uint64_t v = 0;
		for (int i = 7; i >= 0; i--)
			v = v << 8 | p[8 + i];
		*until_ms = v;
	}
	return 0;
}

int state_table_add(struct state_table *t, uint64_t id, enum spool_state st)
{
	if (t->n == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 64;
		struct state_entry *v = realloc(t->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		t->v = v;
		t->cap = cap;
	}
	t->v[t->n] = (struct state_entry){.id = id, .order = t->n, .state = (uint8_t)st};
	t->n++;
	t->sorted = false;
	return 0;
}

static int entry_cmp(const void *a, const void *b)
{
	const struct state_entry *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return x->order < y->order ? -1 : x->order > y->order;
}

void state_table_finish(struct state_table *t)
{
	if (t->n > 1)
		qsort(t->v, t->n, sizeof(*t->v), entry_cmp);
	/* keep the last entry of each run of equal ids */
	size_t k = 0;
	for (size_t i = 0; i < t->n; i++) {
		if (i + 1 < t->n && t->v[i + 1].id == t->v[i].id)
			continue;
		t->v[k++] = t->v[i];
	}
	t->n = k;
	t->sorted = true;
}

enum spool_state state_table_lookup(const struct state_table *t, uint64_t id)
{
	size_t lo = 0, hi = t->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (t->v[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == t->n || t->v[lo].id != id)
		return SPOOL_STATE_QUEUED;
	enum spool_state st = (enum spool_state)t->v[lo].state;
	return st == SPOOL_STATE_RELEASED ? SPOOL_STATE_QUEUED : st;
}

void state_table_free(struct state_table *t)
{
	free(t->v);
	*t = (struct state_table){0};
}
