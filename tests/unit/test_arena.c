/*
 * Unit tests of core/arena: tables of named cases. Every allocation is checked
 * for 8-byte alignment, filled with a pattern of its own and verified at the
 * end of its lifetime, so overlapping allocations or writes past a block show
 * up (and ASan sees any write outside the malloc'ed blocks).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/arena.h"
#include "core/compiler.h"

#define ALIGN 8

static size_t round8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

static void assert_aligned(const void *p)
{
	assert_non_null(p);
	assert_int_equal((uintptr_t)p % ALIGN, 0);
}

/* The byte at offset j of allocation number i. */
static unsigned char pattern(size_t i, size_t j)
{
	return (unsigned char)(i * 131u + j * 7u + 1u);
}

/* ---- table 1: runs of allocations of given sizes ---- */

struct alloc_rec {
	unsigned char *p;
	size_t size;
};

struct alloc_case {
	const char *name;
	size_t block_size; /* 0: the default */
	size_t n;          /* allocations per round */
	size_t min_size, max_size;
	unsigned rounds; /* rounds separated by arena_reset */
};

static const struct alloc_case alloc_cases[] = {
    {"tiny_blocks_1_to_8", 16, 2000, 1, 8, 3},
    {"small_1_to_64_block_256", 256, 5000, 1, 64, 3},
    {"sizes_0_to_24_block_64", 64, 3000, 0, 24, 2},
    {"exact_block_size", 128, 500, 128, 128, 2},
    {"around_block_size", 128, 2000, 120, 136, 2},
    {"mixed_with_large_block_1k", 1024, 2000, 1, 5000, 3},
    {"all_larger_than_block", 64, 300, 65, 4096, 2},
    {"default_block_size", 0, 10000, 1, 100, 3},
    {"odd_block_size_100", 100, 2000, 1, 33, 2},
    {"block_size_1", 1, 1000, 1, 16, 2},
};

static uint32_t lcg(uint32_t *s)
{
	*s = *s * 1103515245u + 12345u;
	return *s >> 8;
}

static int cmp_rec(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)((const struct alloc_rec *)a)->p;
	uintptr_t y = (uintptr_t)((const struct alloc_rec *)b)->p;

	return (x > y) - (x < y);
}

/* One round: n allocations, each written, then all verified and checked for overlap. */
static void alloc_round(struct arena *a, const struct alloc_case *c, struct alloc_rec *rec,
                        uint32_t seed)
{
	size_t total = 0;

	assert_int_equal(a->used_total, 0);
	for (size_t i = 0; i < c->n; i++) {
		size_t size = c->min_size + lcg(&seed) % (c->max_size - c->min_size + 1);
		unsigned char *p = arena_alloc(a, size);

		assert_aligned(p);
		for (size_t j = 0; j < size; j++)
			p[j] = pattern(i, j);
		rec[i].p = p;
		rec[i].size = size;
		total += round8(size);
		assert_int_equal(a->used_total, total);
	}
	for (size_t i = 0; i < c->n; i++) {
		for (size_t j = 0; j < rec[i].size; j++) {
			if (rec[i].p[j] != pattern(i, j)) {
				fail_msg("allocation %zu (size %zu) overwritten at byte %zu", i,
				         rec[i].size, j);
			}
		}
	}
	/* sorted by address, each one ends before the next starts */
	qsort(rec, c->n, sizeof(*rec), cmp_rec);
	for (size_t i = 1; i < c->n; i++) {
		if (rec[i - 1].size == 0 || rec[i].size == 0)
			continue; /* an empty allocation may share its address */
		assert_true(rec[i - 1].p + rec[i - 1].size <= rec[i].p);
	}
}

static void test_alloc(void **state)
{
	const struct alloc_case *c = *state;
	struct alloc_rec *rec = calloc(c->n, sizeof(*rec));
	struct arena a;

	assert_non_null(rec);
	arena_init(&a, c->block_size);
	assert_int_equal(a.block_size, c->block_size ? c->block_size : 4096);
	assert_null(a.head);
	assert_int_equal(a.used_total, 0);
	for (unsigned r = 0; r < c->rounds; r++) {
		alloc_round(&a, c, rec, 42u + r);
		arena_reset(&a);
		assert_int_equal(a.used_total, 0);
	}
	arena_deinit(&a);
	assert_null(a.head);
	assert_int_equal(a.used_total, 0);

	/* deinit then init again: the arena works as new */
	arena_init(&a, c->block_size);
	alloc_round(&a, c, rec, 7u);
	arena_deinit(&a);
	free(rec);
}

/* ---- table 2: strndup ---- */

struct strndup_case {
	const char *name;
	const char *s;
	size_t len;        /* bytes copied */
	size_t block_size; /* 0: the default */
	size_t prefill;    /* bytes allocated first (misaligns nothing, shifts the offset) */
};

#define LONG_STR                                                                                   \
	"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"                         \
	"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

static const struct strndup_case strndup_cases[] = {
    {"strndup_empty", "", 0, 0, 0},
    {"strndup_empty_of_nonempty", "abc", 0, 0, 0},
    {"strndup_one", "x", 1, 0, 0},
    {"strndup_whole", "hello", 5, 0, 0},
    {"strndup_prefix", "hello world", 5, 0, 0},
    {"strndup_len_7", "1234567", 7, 0, 0},
    {"strndup_len_8_needs_16", "12345678", 8, 0, 0},
    {"strndup_not_nul_terminated_src", "abcdefXYZ", 6, 0, 0},
    {"strndup_embedded_nul", "ab\0cd", 5, 0, 0},
    {"strndup_fills_block", "0123456789abcdef0123456789abcde", 31, 32, 0},
    {"strndup_larger_than_block", LONG_STR, 128, 32, 0},
    {"strndup_after_prefill_spills", LONG_STR, 40, 64, 40},
    {"strndup_after_odd_prefill", "mail from", 9, 0, 3},
};

static void test_strndup(void **state)
{
	const struct strndup_case *c = *state;
	struct arena a;
	unsigned char *pre = NULL;
	char *d, *d2;

	arena_init(&a, c->block_size);
	if (c->prefill) {
		pre = arena_alloc(&a, c->prefill);
		assert_aligned(pre);
		memset(pre, 0xa5, c->prefill);
	}
	d = arena_strndup(&a, c->s, c->len);
	assert_aligned(d);
	assert_memory_equal(d, c->s, c->len);
	assert_int_equal(d[c->len], '\0');
	assert_int_equal(a.used_total, round8(c->prefill) + round8(c->len + 1));

	/* a second copy is separate and leaves the first intact */
	d2 = arena_strndup(&a, c->s, c->len);
	assert_aligned(d2);
	assert_true(d2 != d);
	assert_memory_equal(d2, c->s, c->len);
	assert_int_equal(d2[c->len], '\0');
	memset(d2, 'Z', c->len);
	assert_memory_equal(d, c->s, c->len);
	assert_int_equal(d[c->len], '\0');
	for (size_t j = 0; j < c->prefill; j++)
		assert_int_equal(pre[j], 0xa5);
	arena_deinit(&a);
}

/* ---- table 3: allocations larger than block_size ---- */

struct large_case {
	const char *name;
	size_t block_size;
	size_t before; /* a small allocation first (0: none) */
	size_t large;
	size_t after; /* a small allocation afterwards (0: none) */
};

static const struct large_case large_cases[] = {
    {"large_first", 64, 0, 1000, 16},
    {"large_after_small", 64, 8, 1000, 16},
    {"large_block_plus_1", 64, 8, 65, 8},
    {"large_exact_block", 64, 8, 64, 8},
    {"large_1mib", 4096, 100, 1 << 20, 100},
    {"large_16mib", 4096, 0, 16 << 20, 0},
    {"large_twice_in_a_row", 128, 0, 4000, 4000},
};

static void test_large(void **state)
{
	const struct large_case *c = *state;
	struct arena a;
	unsigned char *b = NULL, *l, *f = NULL, *l2;

	arena_init(&a, c->block_size);
	if (c->before) {
		b = arena_alloc(&a, c->before);
		assert_aligned(b);
		memset(b, 0x11, c->before);
	}
	l = arena_alloc(&a, c->large);
	assert_aligned(l);
	memset(l, 0x22, c->large);
	if (c->after) {
		f = arena_alloc(&a, c->after);
		assert_aligned(f);
		memset(f, 0x33, c->after);
	}
	assert_int_equal(a.used_total, round8(c->before) + round8(c->large) + round8(c->after));
	for (size_t j = 0; j < c->before; j++)
		assert_int_equal(b[j], 0x11);
	for (size_t j = 0; j < c->large; j++)
		assert_int_equal(l[j], 0x22);
	for (size_t j = 0; j < c->after; j++)
		assert_int_equal(f[j], 0x33);

	/* after a reset the same sizes work again (and ASan checks the extents) */
	arena_reset(&a);
	assert_int_equal(a.used_total, 0);
	l2 = arena_alloc(&a, c->large);
	assert_aligned(l2);
	memset(l2, 0x44, c->large);
	b = arena_alloc(&a, c->block_size);
	assert_aligned(b);
	memset(b, 0x55, c->block_size);
	for (size_t j = 0; j < c->large; j++)
		assert_int_equal(l2[j], 0x44);
	arena_deinit(&a);
}

/* ---- fixed cases ---- */

/* reset keeps the first block: the first allocation after a reset reuses its memory */
static void test_reset_reuses_memory(void **state)
{
	struct arena a;
	void *first, *again;

	arena_init(&a, 256);
	first = arena_alloc(&a, 24);
	assert_aligned(first);
	for (int i = 0; i < 100; i++)
		memset(arena_alloc(&a, 40), 0x77, 40); /* spills over many blocks */
	for (int r = 0; r < 5; r++) {
		arena_reset(&a);
		assert_int_equal(a.used_total, 0);
		assert_non_null(a.head);
		again = arena_alloc(&a, 24);
		assert_ptr_equal(again, first);
		memset(again, 0x66, 24);
		for (int i = 0; i < 50; i++)
			memset(arena_alloc(&a, 40), 0x77, 40);
	}
	arena_deinit(&a);
}

/* reset and deinit of an arena that never allocated; double deinit; reset after deinit */
static void test_idle_lifecycle(void **state)
{
	struct arena a;
	char *s;

	arena_init(&a, 64);
	arena_reset(&a);
	assert_null(a.head);
	arena_deinit(&a);
	arena_deinit(&a);
	assert_null(a.head);
	arena_reset(&a);
	s = arena_strndup(&a, "ok", 2);
	assert_string_equal(s, "ok");
	arena_deinit(&a);
	assert_null(a.head);
}

/* zero-size allocations are aligned, non-NULL and do not break later ones */
static void test_zero_size(void **state)
{
	struct arena a;
	unsigned char *z, *p;

	arena_init(&a, 32);
	z = arena_alloc(&a, 0);
	assert_aligned(z);
	assert_int_equal(a.used_total, 0);
	p = arena_alloc(&a, 32);
	assert_aligned(p);
	memset(p, 0x5a, 32);
	z = arena_alloc(&a, 0);
	assert_aligned(z);
	p = arena_alloc(&a, 1);
	assert_aligned(p);
	*p = 1;
	arena_deinit(&a);
}

/* requests that cannot be met return NULL instead of a short block */
static void test_impossible_size(void **state)
{
	struct arena a;

	arena_init(&a, 64);
	assert_non_null(arena_alloc(&a, 8));
	assert_null(arena_alloc(&a, SIZE_MAX));      /* rounding up to 8 overflows */
	assert_null(arena_alloc(&a, SIZE_MAX - 16)); /* block header + size overflows */
	assert_int_equal(a.used_total, 8);
	arena_deinit(&a);
}

/* ---- main: one named cmocka test per table row ---- */

/* Appends one test per row of table arr, named by the row's name. */
#define ADD_CASES(arr, fn)                                                                         \
	do {                                                                                       \
		for (size_t i_ = 0; i_ < ARRAY_SIZE(arr); i_++)                                    \
			tests[k++] = (struct CMUnitTest){.name = (arr)[i_].name,                   \
			                                 .test_func = (fn),                        \
			                                 .initial_state = (void *)&(arr)[i_]};     \
	} while (0)

int main(void)
{
	static const struct CMUnitTest fixed[] = {
	    cmocka_unit_test(test_reset_reuses_memory),
	    cmocka_unit_test(test_idle_lifecycle),
	    cmocka_unit_test(test_zero_size),
	    cmocka_unit_test(test_impossible_size),
	};
	struct CMUnitTest tests[ARRAY_SIZE(fixed) + ARRAY_SIZE(alloc_cases) +
	                        ARRAY_SIZE(strndup_cases) + ARRAY_SIZE(large_cases)];
	size_t k = 0;

	for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
		tests[k++] = fixed[i];
	ADD_CASES(alloc_cases, test_alloc);
	ADD_CASES(strndup_cases, test_strndup);
	ADD_CASES(large_cases, test_large);
	return _cmocka_run_group_tests("arena", tests, k, NULL, NULL);
}
