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

void state_payload_encode_rec(uint8_t out[STATE_PAYLOAD_SIZE], const struct state_rec *r)
{
	memset(out, 0, STATE_PAYLOAD_SIZE);
	out[0] = (uint8_t)r->state;
	out[1] = r->flags;
	out[2] = (uint8_t)(r->attempts & 0xff);
	out[3] = (uint8_t)(r->attempts >> 8);
	for (int i = 0; i < 4; i++)
		out[4 + i] = (uint8_t)(r->rcpt >> (8 * i));
	for (int i = 0; i < 8; i++)
		out[8 + i] = (uint8_t)(r->until_ms >> (8 * i));
}

void state_payload_encode(uint8_t out[STATE_PAYLOAD_SIZE], enum spool_state st, uint64_t until_ms)
{
	state_payload_encode_rec(out, &(struct state_rec){.state = st, .until_ms = until_ms});
}

int state_payload_decode_rec(const uint8_t *p, size_t len, struct state_rec *r)
{
	if (len < STATE_PAYLOAD_SIZE || p[0] < SPOOL_STATE_HELD || p[0] > SPOOL_STATE_RCPT_DONE)
		return -1;
	r->state = (enum spool_state)p[0];
	r->flags = p[1];
	r->attempts = (uint16_t)(p[2] | p[3] << 8);
	r->rcpt = 0;
	for (int i = 3; i >= 0; i--)
		r->rcpt = r->rcpt << 8 | p[4 + i];
	r->until_ms = 0;
	for (int i = 7; i >= 0; i--)
		r->until_ms = r->until_ms << 8 | p[8 + i];
	return 0;
}

int state_payload_decode(const uint8_t *p, size_t len, enum spool_state *st, uint64_t *until_ms)
{
	struct state_rec r;
	if (state_payload_decode_rec(p, len, &r) < 0)
		return -1;
	*st = r.state;
	if (until_ms)
		*until_ms = r.until_ms;
	return 0;
}

int state_table_add(struct state_table *t, uint64_t id, enum spool_state st)
{
	return state_table_add_rec(t, id, &(struct state_rec){.state = st});
}

int state_table_add_rec(struct state_table *t, uint64_t id, const struct state_rec *r)
{
	if (r->state == SPOOL_STATE_RCPT_DONE)
		return 0;
	if (t->n == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 64;
		struct state_entry *v = realloc(t->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		t->v = v;
		t->cap = cap;
	}
	t->v[t->n] = (struct state_entry){.id = id,
					  .order = t->n,
					  .until_ms = r->until_ms,
					  .attempts = r->attempts,
					  .state = (uint8_t)r->state,
					  .flags = r->flags};
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

const struct state_entry *state_table_find(const struct state_table *t, uint64_t id)
{
	size_t lo = 0, hi = t->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (t->v[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo == t->n || t->v[lo].id != id ? NULL : &t->v[lo];
}

enum spool_state state_table_lookup(const struct state_table *t, uint64_t id)
{
	const struct state_entry *e = state_table_find(t, id);
	if (!e)
		return SPOOL_STATE_QUEUED;
	enum spool_state st = (enum spool_state)e->state;
	return st == SPOOL_STATE_RELEASED || st == SPOOL_STATE_DEFERRED ? SPOOL_STATE_QUEUED : st;
}

void state_table_free(struct state_table *t)
{
	free(t->v);
	*t = (struct state_table){0};
}
