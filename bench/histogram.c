/* histogram: see histogram.h for the contract. */
#include "bench/histogram.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"

/*
 * Index of value v: below 2^(SUB_BITS+1) the value itself; above, with
 * shift = msb(v) - SUB_BITS, (shift << SUB_BITS) + (v >> shift), where
 * v >> shift lies in [2^SUB_BITS, 2^(SUB_BITS+1)). Indices are contiguous.
 */
#define SUB_BITS 7
#define SUB_HALF (1u << SUB_BITS)

static unsigned hist_index(uint64_t v)
{
	unsigned msb, shift;

	if (v < 2 * SUB_HALF)
		return (unsigned)v;
	msb = 63u - (unsigned)__builtin_clzll(v);
	shift = msb - SUB_BITS;
	return (shift << SUB_BITS) + (unsigned)(v >> shift);
}

/* The highest value that maps to index i. */
static uint64_t hist_highest(unsigned i)
{
	unsigned shift;

	if (i < 2 * SUB_HALF)
		return i;
	shift = (i >> SUB_BITS) - 1;
	/* i = (shift << SUB_BITS) + sub with sub in [SUB_HALF, 2 SUB_HALF) */
	return ((uint64_t)(i - (shift << SUB_BITS)) << shift) + ((1ull << shift) - 1);
}

struct histogram {
	uint64_t count;
	uint64_t min, max;
	long double sum;
	unsigned top; /* highest index with a count, +1 (0 when empty) */
	uint64_t counts[];
};

/* Only indices up to that of HISTOGRAM_MAX_NS are stored. */
static unsigned hist_nbuckets(void)
{
	return hist_index(HISTOGRAM_MAX_NS) + 1;
}

struct histogram *histogram_new(void)
{
	struct histogram *h = calloc(1, sizeof(*h) + hist_nbuckets() * sizeof(uint64_t));
	return h;
}

void histogram_free(struct histogram **h)
{
	if (!h)
		return;
	free(*h);
	*h = NULL;
}

void histogram_reset(struct histogram *h)
{
	memset(h, 0, sizeof(*h) + hist_nbuckets() * sizeof(uint64_t));
}

void histogram_record(struct histogram *h, uint64_t ns)
{
	unsigned i = hist_index(MIN(ns, HISTOGRAM_MAX_NS));

	h->counts[i]++;
	if (i + 1 > h->top)
		h->top = i + 1;
	if (h->count == 0 || ns < h->min)
		h->min = ns;
	if (ns > h->max)
		h->max = ns;
	h->count++;
	h->sum += ns;
}

void histogram_merge(struct histogram *dst, const struct histogram *src)
{
	if (src->count == 0)
		return;
	for (unsigned i = 0; i < src->top; i++)
		dst->counts[i] += src->counts[i];
	if (src->top > dst->top)
		dst->top = src->top;
	if (dst->count == 0 || src->min < dst->min)
		dst->min = src->min;
	if (src->max > dst->max)
		dst->max = src->max;
	dst->count += src->count;
	dst->sum += src->sum;
}

uint64_t histogram_count(const struct histogram *h)
{
	return h->count;
}

uint64_t histogram_min(const struct histogram *h)
{
	return h->min;
}

uint64_t histogram_max(const struct histogram *h)
{
	return h->max;
}

double histogram_mean(const struct histogram *h)
{
	return h->count ? (double)(h->sum / h->count) : 0.0;
}

uint64_t histogram_percentile(const struct histogram *h, double p)
{
	uint64_t rank, seen = 0, v;

	if (h->count == 0)
		return 0;
	if (p >= 100.0)
		return h->max;
	if (p < 0.0)
		p = 0.0;
	/* the nearest rank, ceil(p% of count), without floating-point noise pushing
	   an exact product (99.9% of 1000 = 999.0000000000001) up by one */
	double x = p * (double)h->count / 100.0;
	rank = (uint64_t)x;
	if ((double)rank < x - x * 1e-12)
		rank++;
	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < h->top; i++) {
		seen += h->counts[i];
		if (seen >= rank) {
			v = hist_highest(i);
			return MAX(MIN(v, h->max), h->min);
		}
	}
	return h->max;
}
