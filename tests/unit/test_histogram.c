/*
 * Unit tests of bench/histogram: tables of named cases. The contract checked
 * (histogram.h): a reported percentile of a value x lies in [x, x + x/128]
 * (exact below 256 ns), clamped to [min, max]; values above HISTOGRAM_MAX_NS
 * fall in the top bucket; percentile 100 is the exact maximum; the rank of
 * percentile p of n values is ceil(p/100 * n); merging equals recording the
 * union.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "bench/histogram.h"
#include "core/compiler.h"

#define US 1000ull
#define MS 1000000ull
#define S  1000000000ull

/* ---- helpers ---- */

/* Fails unless got is a valid report of the exact value x of a histogram whose maximum is max. */
static void check_near(uint64_t got, uint64_t x, uint64_t max, const char *what)
{
	uint64_t lo = x, hi;

	if (x > HISTOGRAM_MAX_NS) {
		/* in the top bucket: anything from its start to the maximum */
		lo = HISTOGRAM_MAX_NS;
		hi = max;
	} else {
		hi = x + x / 128;
		if (hi > max)
			hi = max;
	}
	if (got < lo || got > hi) {
		fail_msg("%s: got %llu, exact %llu, allowed [%llu, %llu]", what,
		         (unsigned long long)got, (unsigned long long)x, (unsigned long long)lo,
		         (unsigned long long)hi);
	}
}

static void check_mean(double got, long double want, const char *what)
{
	long double tol = fabsl(want) * 1e-12L + 1e-9L;

	if (fabsl((long double)got - want) > tol) {
		fail_msg("%s: mean %.17g, want %.17Lg", what, got, want);
	}
}

static void check_empty(const struct histogram *h)
{
	assert_int_equal(histogram_count(h), 0);
	assert_int_equal(histogram_min(h), 0);
	assert_int_equal(histogram_max(h), 0);
	assert_true(histogram_mean(h) == 0.0);
	assert_int_equal(histogram_percentile(h, 0.001), 0);
	assert_int_equal(histogram_percentile(h, 50.0), 0);
	assert_int_equal(histogram_percentile(h, 99.9), 0);
	assert_int_equal(histogram_percentile(h, 100.0), 0);
}

/* Percentiles checked everywhere: p, and p * 1000 as an integer for the exact rank. */
static const struct {
	double p;
	uint64_t p_e3;
} pcts[] = {
    {0.001, 1},    {0.1, 100},    {1.0, 1000},    {10.0, 10000},   {25.0, 25000},
    {50.0, 50000}, {75.0, 75000}, {90.0, 90000},  {95.0, 95000},   {99.0, 99000},
    {99.5, 99500}, {99.9, 99900}, {99.99, 99990}, {99.999, 99999}, {100.0, 100000},
};

/* ceil(p_e3 / 100000 * n) in integers, at least 1 */
static uint64_t exact_rank(uint64_t p_e3, uint64_t n)
{
	uint64_t r = (p_e3 * n + 99999) / 100000;

	return r ? r : 1;
}

/* ---- distributions: a list of arithmetic runs of values ---- */

struct run {
	uint64_t start, step, count; /* values start, start + step, ... (count of them) */
};

#define MAX_RUNS 4

struct values {
	uint64_t *v; /* sorted */
	size_t n;
	long double sum;
};

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static size_t runs_count(const struct run *runs)
{
	size_t n = 0;

	for (size_t i = 0; i < MAX_RUNS; i++)
		n += runs[i].count;
	return n;
}

/* Records the runs in h (interleaved, so not in sorted order) and appends them to vals. */
static void runs_record(struct histogram *h, const struct run *runs, struct values *vals)
{
	bool more = true;

	for (uint64_t k = 0; more; k++) {
		more = false;
		for (size_t i = 0; i < MAX_RUNS; i++) {
			uint64_t x;

			if (k >= runs[i].count)
				continue;
			more = true;
			x = runs[i].start + k * runs[i].step;
			histogram_record(h, x);
			vals->v[vals->n++] = x;
			vals->sum += (long double)x;
		}
	}
}

/* Checks count, min, max, mean and every percentile of h against the sorted exact values. */
static void check_against(const struct histogram *h, const struct values *vals)
{
	char what[64];

	assert_int_equal(histogram_count(h), vals->n);
	if (vals->n == 0) {
		check_empty(h);
		return;
	}
	assert_int_equal(histogram_min(h), vals->v[0]);
	assert_int_equal(histogram_max(h), vals->v[vals->n - 1]);
	check_mean(histogram_mean(h), vals->sum / (long double)vals->n, "mean");
	for (size_t i = 0; i < ARRAY_SIZE(pcts); i++) {
		uint64_t rank = exact_rank(pcts[i].p_e3, vals->n);
		uint64_t got = histogram_percentile(h, pcts[i].p);

		snprintf(what, sizeof(what), "p%g (rank %llu of %zu)", pcts[i].p,
		         (unsigned long long)rank, vals->n);
		check_near(got, vals->v[rank - 1], vals->v[vals->n - 1], what);
		assert_true(got >= histogram_min(h));
		assert_true(got <= histogram_max(h));
	}
	assert_int_equal(histogram_percentile(h, 100.0), vals->v[vals->n - 1]);
}

/* ---- table 1: precision at single values ---- */

struct value_case {
	const char *name;      /* for test_one_value */
	const char *prec_name; /* for test_value_precision */
	uint64_t v;
};

static const struct value_case value_cases[] = {
    {"one_value_0ns", "precision_0ns", 0},
    {"one_value_1ns", "precision_1ns", 1},
    {"one_value_255ns", "precision_255ns", 255},
    {"one_value_256ns", "precision_256ns", 256},
    {"one_value_257ns", "precision_257ns", 257},
    {"one_value_1us", "precision_1us", 1 * US},
    {"one_value_1us_plus_1", "precision_1us_plus_1", 1 * US + 1},
    {"one_value_1ms", "precision_1ms", 1 * MS},
    {"one_value_1ms_minus_1", "precision_1ms_minus_1", 1 * MS - 1},
    {"one_value_1s", "precision_1s", 1 * S},
    {"one_value_1s_plus_1", "precision_1s_plus_1", 1 * S + 1},
    {"one_value_2pow32", "precision_2pow32", 1ull << 32},
    {"one_value_2pow32_minus_1", "precision_2pow32_minus_1", (1ull << 32) - 1},
    {"one_value_100s", "precision_100s", 100 * S},
    {"one_value_100s_minus_1", "precision_100s_minus_1", 100 * S - 1},
    {"one_value_100s_plus_1", "precision_100s_plus_1", 100 * S + 1},
    {"one_value_above_max_200s", "precision_above_max_200s", 200 * S},
    {"one_value_above_max_u64max", "precision_above_max_u64max", UINT64_MAX},
};

/* One value alone: every statistic is exact. */
static void test_one_value(void **state)
{
	const struct value_case *c = *state;
	struct histogram *h = histogram_new();

	assert_non_null(h);
	histogram_record(h, c->v);
	assert_int_equal(histogram_count(h), 1);
	assert_int_equal(histogram_min(h), c->v);
	assert_int_equal(histogram_max(h), c->v);
	check_mean(histogram_mean(h), (long double)c->v, c->name);
	for (size_t i = 0; i < ARRAY_SIZE(pcts); i++)
		assert_int_equal(histogram_percentile(h, pcts[i].p), c->v);
	histogram_free(&h);
	assert_null(h);
}

/*
 * The value with a larger one beside it, so the clamp to max does not hide the
 * bucket: p50 (rank 1 of 2) is within 1/128 above the value, and a value
 * 1/64 higher lands in a later bucket.
 */
static void test_value_precision(void **state)
{
	const struct value_case *c = *state;
	struct histogram *h = histogram_new();
	uint64_t big = UINT64_MAX, got;

	assert_non_null(h);
	if (c->v == UINT64_MAX)
		big = c->v; /* nothing larger: both in the top bucket */
	histogram_record(h, c->v);
	histogram_record(h, big);
	got = histogram_percentile(h, 50.0);
	check_near(got, c->v, big, c->prec_name);
	assert_int_equal(histogram_percentile(h, 100.0), big);
	assert_int_equal(histogram_min(h), c->v);

	if (c->v < HISTOGRAM_MAX_NS / 2) {
		uint64_t far = c->v + c->v / 64 + 1;

		histogram_reset(h);
		histogram_record(h, c->v);
		histogram_record(h, far);
		histogram_record(h, big);
		got = histogram_percentile(h, 50.0); /* rank 2: far */
		check_near(got, far, big, c->prec_name);
		got = histogram_percentile(h, 1.0); /* rank 1: v, distinguished from far */
		check_near(got, c->v, big, c->prec_name);
		assert_true(got < far);
	}
	histogram_free(&h);
}

/* Every bucket boundary region from 1 ns to above the maximum, and monotonicity. */
static void test_precision_sweep(void **state)
{
	struct histogram *h = histogram_new();
	uint64_t prev = 0, last_v = 0;
	unsigned steps = 0;

	assert_non_null(h);
	for (uint64_t x = 0; x <= 120 * S; x += MAX(1, x / 97), steps++) {
		/* x and its two successors (each value once, increasing) */
		for (uint64_t d = 0; d < 3; d++) {
			uint64_t v = x + d, got;

			if (v < last_v || (v == last_v && v != 0))
				continue;
			last_v = v;
			histogram_reset(h);
			histogram_record(h, v);
			histogram_record(h, UINT64_MAX);
			got = histogram_percentile(h, 50.0);
			check_near(got, v, UINT64_MAX, "sweep");
			if (v < 256)
				assert_int_equal(got, v);
			assert_true(got >= prev);
			prev = got;
		}
	}
	assert_true(steps > 2000);
	histogram_free(&h);
}

/* ---- table 2: distributions ---- */

struct dist_case {
	const char *name;
	struct run runs[MAX_RUNS];
};

static const struct dist_case dist_cases[] = {
    {"dist_empty", {{0}}},
    {"dist_one_1ms", {{1 * MS, 0, 1}}},
    {"dist_uniform_1us_to_100000us", {{1 * US, 1 * US, 100000}}},
    {"dist_uniform_1ns_to_1000ns", {{1, 1, 1000}}},
    {"dist_exact_region_0_to_255", {{0, 1, 256}}},
    {"dist_constant_5ms_x1000", {{5 * MS, 0, 1000}}},
    {"dist_zeros", {{0, 0, 10}}},
    /* p99.9 must not see the slow tail: rank 999 of 1000 is fast */
    {"dist_999_fast_1_slow", {{1 * US, 0, 999}, {1 * S, 0, 1}}},
    /* 0.1 % outliers as a benchmark sees them: p99.9 is 1 ms, p99.99 is 1 s */
    {"dist_99900_fast_100_slow", {{1 * MS, 0, 99900}, {1 * S, 0, 100}}},
    {"dist_bimodal_1ms_1s", {{1 * MS, 1, 5000}, {1 * S, 1000, 5000}}},
    {"dist_geometric_spread", {{1, 7, 1000}, {10 * US, 997, 1000}, {10 * MS, 999983, 1000}}},
    {"dist_above_max", {{1 * S, 0, 10}, {100 * S, 50 * S, 5}}},
    {"dist_above_max_only", {{200 * S, 1, 3}, {UINT64_MAX - 2, 1, 3}}},
    {"dist_straddle_max", {{100 * S - 2, 1, 5}}},
};

static void test_dist(void **state)
{
	const struct dist_case *c = *state;
	struct histogram *h = histogram_new();
	struct values vals = {0};

	assert_non_null(h);
	vals.v = calloc(runs_count(c->runs) + 1, sizeof(*vals.v));
	assert_non_null(vals.v);
	runs_record(h, c->runs, &vals);
	qsort(vals.v, vals.n, sizeof(*vals.v), cmp_u64);
	check_against(h, &vals);

	/* reset empties it; recording again gives the same answers */
	histogram_reset(h);
	check_empty(h);
	vals.n = 0;
	vals.sum = 0;
	runs_record(h, c->runs, &vals);
	qsort(vals.v, vals.n, sizeof(*vals.v), cmp_u64);
	check_against(h, &vals);

	free(vals.v);
	histogram_free(&h);
}

/* The textbook answers for 1..100000 µs, each value once. */
struct known_case {
	const char *name;
	double p;
	uint64_t exact; /* the ceil(p/100 * n)-th smallest value */
};

static const struct known_case known_cases[] = {
    {"uniform_p50", 50.0, 50000 * US},     {"uniform_p90", 90.0, 90000 * US},
    {"uniform_p99", 99.0, 99000 * US},     {"uniform_p99.9", 99.9, 99900 * US},
    {"uniform_p99.99", 99.99, 99990 * US}, {"uniform_max", 100.0, 100000 * US},
    {"uniform_p0.001", 0.001, 1 * US},
};

static struct histogram *uniform_h;

static int uniform_setup(void **state)
{
	uniform_h = histogram_new();
	if (!uniform_h)
		return -1;
	for (uint64_t i = 1; i <= 100000; i++)
		histogram_record(uniform_h, i * US);
	return 0;
}

static int uniform_teardown(void **state)
{
	histogram_free(&uniform_h);
	return 0;
}

static void test_known(void **state)
{
	const struct known_case *c = *state;
	uint64_t got = histogram_percentile(uniform_h, c->p);

	check_near(got, c->exact, 100000 * US, c->name);
	if (c->p == 100.0)
		assert_int_equal(got, 100000 * US);
	assert_int_equal(histogram_count(uniform_h), 100000);
	assert_int_equal(histogram_min(uniform_h), 1 * US);
	assert_int_equal(histogram_max(uniform_h), 100000 * US);
	check_mean(histogram_mean(uniform_h), 50000.5L * US, c->name);
}

/* ---- table 3: merge equals the histogram of the union ---- */

struct merge_case {
	const char *name;
	struct run a[MAX_RUNS], b[MAX_RUNS];
};

static const struct merge_case merge_cases[] = {
    {"merge_both_empty", {{0}}, {{0}}},
    {"merge_into_empty", {{0}}, {{1 * US, 3, 1000}}},
    {"merge_empty_src", {{1 * US, 3, 1000}}, {{0}}},
    {"merge_disjoint_low_high", {{1 * US, 1 * US, 5000}}, {{1 * S, 1 * MS, 5000}}},
    {"merge_disjoint_high_low", {{1 * S, 1 * MS, 5000}}, {{1 * US, 1 * US, 5000}}},
    {"merge_overlapping", {{1 * US, 7, 20000}}, {{1 * US + 3, 11, 20000}}},
    {"merge_identical", {{1 * MS, 1 * US, 3000}}, {{1 * MS, 1 * US, 3000}}},
    {"merge_small_into_large", {{1, 1, 100000}}, {{0, 0, 1}}},
    {"merge_src_above_max", {{1 * MS, 0, 100}}, {{150 * S, 1 * S, 10}, {UINT64_MAX, 0, 1}}},
    {"merge_dst_above_max", {{150 * S, 1 * S, 10}}, {{1 * MS, 0, 100}}},
    {"merge_src_has_smaller_min", {{1 * S, 1, 10}}, {{0, 1, 10}}},
    {"merge_src_has_larger_top", {{1, 1, 10}}, {{99 * S, 1, 10}}},
};

static void test_merge(void **state)
{
	const struct merge_case *c = *state;
	struct histogram *a = histogram_new(), *b = histogram_new(), *u = histogram_new();
	struct values va = {0}, vb = {0}, vu = {0};
	uint64_t b_count, b_min, b_max, b_p50;

	assert_non_null(a);
	assert_non_null(b);
	assert_non_null(u);
	va.v = calloc(runs_count(c->a) + 1, sizeof(*va.v));
	vb.v = calloc(runs_count(c->b) + 1, sizeof(*vb.v));
	vu.v = calloc(runs_count(c->a) + runs_count(c->b) + 1, sizeof(*vu.v));
	assert_non_null(va.v);
	assert_non_null(vb.v);
	assert_non_null(vu.v);

	runs_record(a, c->a, &va);
	runs_record(b, c->b, &vb);
	runs_record(u, c->a, &vu);
	runs_record(u, c->b, &vu);
	b_count = histogram_count(b);
	b_min = histogram_min(b);
	b_max = histogram_max(b);
	b_p50 = histogram_percentile(b, 50.0);

	histogram_merge(a, b);

	/* the same histogram as recording the union in one */
	assert_int_equal(histogram_count(a), histogram_count(u));
	assert_int_equal(histogram_min(a), histogram_min(u));
	assert_int_equal(histogram_max(a), histogram_max(u));
	check_mean(histogram_mean(a), (long double)histogram_mean(u), "merged mean");
	for (size_t i = 0; i < ARRAY_SIZE(pcts); i++)
		assert_int_equal(histogram_percentile(a, pcts[i].p),
		                 histogram_percentile(u, pcts[i].p));
	for (double p = 0.5; p <= 100.0; p += 0.5)
		assert_int_equal(histogram_percentile(a, p), histogram_percentile(u, p));

	/* and right against the exact values */
	qsort(vu.v, vu.n, sizeof(*vu.v), cmp_u64);
	check_against(a, &vu);

	/* src is unchanged */
	assert_int_equal(histogram_count(b), b_count);
	assert_int_equal(histogram_min(b), b_min);
	assert_int_equal(histogram_max(b), b_max);
	assert_int_equal(histogram_percentile(b, 50.0), b_p50);

	free(va.v);
	free(vb.v);
	free(vu.v);
	histogram_free(&a);
	histogram_free(&b);
	histogram_free(&u);
}

/* ---- fixed cases ---- */

static void test_empty(void **state)
{
	struct histogram *h = histogram_new(), *e = histogram_new();

	assert_non_null(h);
	assert_non_null(e);
	check_empty(h);
	histogram_merge(h, e);
	check_empty(h);
	histogram_reset(h);
	check_empty(h);

	/* filled then reset: empty again, and merging it changes nothing */
	histogram_record(h, 5 * MS);
	histogram_record(h, 500 * S);
	histogram_reset(h);
	check_empty(h);
	histogram_merge(e, h);
	check_empty(e);
	histogram_free(&h);
	histogram_free(&e);
}

static void test_free_null(void **state)
{
	struct histogram *h = NULL;

	histogram_free(NULL);
	histogram_free(&h);
	assert_null(h);
}

/* Far above the maximum: counted, reported exactly as the maximum, mean stays exact-ish. */
static void test_above_max(void **state)
{
	struct histogram *h = histogram_new();
	uint64_t got;

	assert_non_null(h);
	histogram_record(h, 1 * US);
	histogram_record(h, 200 * S);
	histogram_record(h, 300 * S);
	assert_int_equal(histogram_count(h), 3);
	assert_int_equal(histogram_min(h), 1 * US);
	assert_int_equal(histogram_max(h), 300 * S);
	assert_int_equal(histogram_percentile(h, 100.0), 300 * S);
	got = histogram_percentile(h, 50.0); /* rank 2: 200 s, in the top bucket */
	assert_true(got >= HISTOGRAM_MAX_NS && got <= 300 * S);
	check_near(histogram_percentile(h, 30.0), 1 * US, 300 * S, "p30");
	check_mean(histogram_mean(h), (1.0L * US + 200.0L * S + 300.0L * S) / 3, "mean");

	/* p above 100 is the maximum too */
	assert_int_equal(histogram_percentile(h, 150.0), 300 * S);
	histogram_free(&h);
}

/* ---- main: one named cmocka test per table row ---- */

/* Appends one test per row of table arr, named by the row's field name. */
#define ADD_CASES(dst, arr, field, fn)                                                             \
	do {                                                                                       \
		for (size_t i_ = 0; i_ < ARRAY_SIZE(arr); i_++)                                    \
			(dst)[k++] = (struct CMUnitTest){.name = (arr)[i_].field,                  \
			                                 .test_func = (fn),                        \
			                                 .initial_state = (void *)&(arr)[i_]};     \
	} while (0)

int main(void)
{
	static const struct CMUnitTest fixed[] = {
	    cmocka_unit_test(test_empty),
	    cmocka_unit_test(test_free_null),
	    cmocka_unit_test(test_above_max),
	    cmocka_unit_test(test_precision_sweep),
	};
	struct CMUnitTest tests[ARRAY_SIZE(fixed) + 2 * ARRAY_SIZE(value_cases) +
	                        ARRAY_SIZE(dist_cases) + ARRAY_SIZE(merge_cases)];
	struct CMUnitTest known[ARRAY_SIZE(known_cases)];
	size_t k = 0;
	int failed;

	for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
		tests[k++] = fixed[i];
	ADD_CASES(tests, value_cases, name, test_one_value);
	ADD_CASES(tests, value_cases, prec_name, test_value_precision);
	ADD_CASES(tests, dist_cases, name, test_dist);
	ADD_CASES(tests, merge_cases, name, test_merge);
	failed = _cmocka_run_group_tests("histogram", tests, k, NULL, NULL);

	k = 0;
	ADD_CASES(known, known_cases, name, test_known);
	failed += _cmocka_run_group_tests("histogram_uniform_1us_to_100000us", known, k,
	                                  uniform_setup, uniform_teardown);
	return failed;
}
