/*
 * Unit tests of queue/crc32c: the RFC 3720 B.4 vectors and others, checked on
 * both implementations and against a bit-at-a-time reference; hardware ==
 * table for every length 0..4096 at every alignment 0..15; chaining and
 * iovec forms equal one call over the concatenation.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "queue/crc32c.h"

static uint32_t lcg(uint32_t *s)
{
	*s = *s * 1103515245u + 12345u;
	return *s >> 8;
}

static void fill_random(unsigned char *p, size_t n, uint32_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)lcg(&seed);
}

/* The definition, one bit at a time. */
static uint32_t crc_ref(uint32_t crc, const unsigned char *p, size_t len)
{
	crc = ~crc;
	while (len--) {
		crc ^= *p++;
		for (int i = 0; i < 8; i++)
			crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
	}
	return ~crc;
}

/* ---- table 1: known vectors ---- */

enum fill { FILL_ZERO, FILL_ONES, FILL_ASC, FILL_DESC, FILL_TEXT };

struct vector_case {
	const char *name;
	enum fill fill;
	size_t len;
	const char *text; /* FILL_TEXT */
	uint32_t expect;
};

static const struct vector_case vector_cases[] = {
    {"rfc3720_32_zeros", FILL_ZERO, 32, NULL, 0x8A9136AAu},
    {"rfc3720_32_ones", FILL_ONES, 32, NULL, 0x62A8AB43u},
    {"rfc3720_ascending", FILL_ASC, 32, NULL, 0x46DD794Eu},
    {"rfc3720_descending", FILL_DESC, 32, NULL, 0x113FDB5Cu},
    {"check_123456789", FILL_TEXT, 9, "123456789", 0xE3069283u},
    {"empty", FILL_TEXT, 0, "", 0x00000000u},
    {"one_a", FILL_TEXT, 1, "a", 0xC1D04330u},
};

static void make_vector(const struct vector_case *c, unsigned char *buf)
{
	for (size_t i = 0; i < c->len; i++) {
		switch (c->fill) {
		case FILL_ZERO:
			buf[i] = 0;
			break;
		case FILL_ONES:
			buf[i] = 0xff;
			break;
		case FILL_ASC:
			buf[i] = (unsigned char)i;
			break;
		case FILL_DESC:
			buf[i] = (unsigned char)(c->len - 1 - i);
			break;
		case FILL_TEXT:
			buf[i] = (unsigned char)c->text[i];
			break;
		}
	}
}

static void test_vector(void **state)
{
	const struct vector_case *c = *state;
	unsigned char buf[64];
	uint32_t crc;

	make_vector(c, buf);
	assert_int_equal(crc_ref(0, buf, c->len), c->expect);
	assert_int_equal(crc32c(0, buf, c->len), c->expect);
	assert_int_equal(crc32c_sw(0, buf, c->len), c->expect);
	/* one octet at a time, through both */
	crc = 0;
	for (size_t i = 0; i < c->len; i++)
		crc = crc32c(crc, buf + i, 1);
	assert_int_equal(crc, c->expect);
	crc = 0;
	for (size_t i = 0; i < c->len; i++)
		crc = crc32c_sw(crc, buf + i, 1);
	assert_int_equal(crc, c->expect);
	/* at an odd address */
	unsigned char odd[65];
	memcpy(odd + 1, buf, c->len);
	assert_int_equal(crc32c(0, odd + 1, c->len), c->expect);
	assert_int_equal(crc32c_sw(0, odd + 1, c->len), c->expect);
}

/* ---- fixed tests ---- */

#define MAXLEN   4096
#define MAXALIGN 16

/* Hardware (or whatever crc32c picked) == table == reference, all lengths and alignments. */
static void test_hw_equals_sw(void **state)
{
	unsigned char *buf = malloc(MAXLEN + MAXALIGN);
	unsigned char *src = malloc(MAXLEN);

	assert_non_null(buf);
	assert_non_null(src);
	if (!crc32c_hw())
		print_message("no SSE4.2: crc32c uses the table path; comparing it with itself\n");
	fill_random(src, MAXLEN, 7);
	for (size_t align = 0; align < MAXALIGN; align++) {
		memcpy(buf + align, src, MAXLEN);
		for (size_t len = 0; len <= MAXLEN; len++) {
			uint32_t seed = (uint32_t)(len * 31 + align);
			uint32_t init = len % 3 == 0 ? 0 : lcg(&seed);
			uint32_t sw = crc32c_sw(init, buf + align, len);
			assert_int_equal(crc32c(init, buf + align, len), sw);
			if (len <= 300 || len % 97 == 0)
				assert_int_equal(crc_ref(init, buf + align, len), sw);
		}
	}
	free(buf);
	free(src);
}

/* A few long random buffers: both paths against the reference. */
static void test_long_random(void **state)
{
	/* around the three-stream rounds (3 x 4096 and 3 x 256 octets) too */
	static const size_t lens[] = {767,   768,   769,   1536,  12287, 12288, 12289,
	                              13056, 13057, 24583, 65536, 65537, 1000003};
	for (size_t i = 0; i < ARRAY_SIZE(lens); i++) {
		unsigned char *p = malloc(lens[i]);
		assert_non_null(p);
		fill_random(p, lens[i], (uint32_t)i + 100);
		uint32_t ref = crc_ref(0, p, lens[i]);
		assert_int_equal(crc32c(0, p, lens[i]), ref);
		assert_int_equal(crc32c_sw(0, p, lens[i]), ref);
		free(p);
	}
}

/* crc(a ++ b) == crc(crc(a), b) for every split of 0..300 octets, on both paths. */
static void test_chaining_every_split(void **state)
{
	unsigned char buf[300];

	fill_random(buf, sizeof(buf), 3);
	for (size_t len = 0; len <= sizeof(buf); len++) {
		uint32_t whole = crc32c(0, buf, len);
		assert_int_equal(crc32c_sw(0, buf, len), whole);
		for (size_t cut = 0; cut <= len; cut++) {
			assert_int_equal(crc32c(crc32c(0, buf, cut), buf + cut, len - cut), whole);
			assert_int_equal(crc32c_sw(crc32c_sw(0, buf, cut), buf + cut, len - cut),
			                 whole);
			/* the two paths mix */
			assert_int_equal(crc32c_sw(crc32c(0, buf, cut), buf + cut, len - cut),
			                 whole);
		}
	}
}

/* Random splits of a long buffer into many pieces. */
static void test_chaining_random_pieces(void **state)
{
	enum { LEN = 200000 };
	unsigned char *p = malloc(LEN);
	uint32_t seed = 11;

	assert_non_null(p);
	fill_random(p, LEN, 5);
	uint32_t whole = crc32c(0, p, LEN);
	for (int round = 0; round < 50; round++) {
		uint32_t crc = 0;
		size_t off = 0;
		while (off < LEN) {
			size_t n = lcg(&seed) % (round < 25 ? 20 : 5000);
			if (n > LEN - off)
				n = LEN - off;
			crc = crc32c(crc, p + off, n);
			off += n;
		}
		assert_int_equal(crc, whole);
	}
	free(p);
}

/* crc32c_iov == crc32c over the concatenation, empty iovecs included. */
static void test_iov(void **state)
{
	enum { LEN = 10000, MAXIOV = 40 };
	unsigned char *p = malloc(LEN);
	struct iovec iov[MAXIOV];
	uint32_t seed = 21;

	assert_non_null(p);
	fill_random(p, LEN, 9);
	assert_int_equal(crc32c_iov(0, NULL, 0), 0);
	assert_int_equal(crc32c_iov(0x12345678u, NULL, 0), 0x12345678u);
	for (int round = 0; round < 500; round++) {
		size_t total = lcg(&seed) % (LEN + 1);
		unsigned n = 0;
		size_t off = 0;
		while (off < total && n < MAXIOV - 1) {
			size_t k = lcg(&seed) % 3 == 0 ? 0 : lcg(&seed) % (total / 4 + 2);
			if (k > total - off)
				k = total - off;
			iov[n++] = (struct iovec){p + off, k};
			off += k;
		}
		iov[n++] = (struct iovec){p + off, total - off};
		uint32_t init = round % 2 ? lcg(&seed) : 0;
		assert_int_equal(crc32c_iov(init, iov, n), crc32c(init, p, total));
		assert_int_equal(crc32c_iov(init, iov, n), crc32c_sw(init, p, total));
	}
	free(p);
}

/* Not a check: prints the throughput of both paths (64 MiB, best of 3). */
static void test_throughput_report(void **state)
{
	enum { LEN = 64 << 20 };
	unsigned char *p = malloc(LEN);
	double best_hw = 1e9, best_sw = 1e9;
	volatile uint32_t sink = 0;

	assert_non_null(p);
	fill_random(p, LEN, 1);
	for (int i = 0; i < 3; i++) {
		struct timespec a, b, c;
		clock_gettime(CLOCK_MONOTONIC, &a);
		sink ^= crc32c(0, p, LEN);
		clock_gettime(CLOCK_MONOTONIC, &b);
		sink ^= crc32c_sw(0, p, LEN);
		clock_gettime(CLOCK_MONOTONIC, &c);
		double t1 = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
		double t2 = (double)(c.tv_sec - b.tv_sec) + (double)(c.tv_nsec - b.tv_nsec) / 1e9;
		best_hw = t1 < best_hw ? t1 : best_hw;
		best_sw = t2 < best_sw ? t2 : best_sw;
	}
	print_message("crc32c %s: %.2f GB/s; table: %.2f GB/s\n", crc32c_hw() ? "sse4.2" : "table",
	              LEN / best_hw / 1e9, LEN / best_sw / 1e9);
	free(p);
	(void)sink;
}

/* ---- main: one named cmocka test per table row ---- */

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
	    cmocka_unit_test(test_hw_equals_sw),
	    cmocka_unit_test(test_long_random),
	    cmocka_unit_test(test_chaining_every_split),
	    cmocka_unit_test(test_chaining_random_pieces),
	    cmocka_unit_test(test_iov),
	    cmocka_unit_test(test_throughput_report),
	};
	struct CMUnitTest tests[ARRAY_SIZE(vector_cases) + ARRAY_SIZE(fixed)];
	size_t k = 0;

	ADD_CASES(vector_cases, test_vector);
	for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
		tests[k++] = fixed[i];
	return _cmocka_run_group_tests("crc32c", tests, k, NULL, NULL);
}
