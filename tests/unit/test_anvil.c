/*
 * Unit tests of mta/smtp/anvil: the per-client-address table shared by the
 * workers. Time is passed in, so every rate case is exact: the concurrency
 * limit and its release, one address whatever its family (IPv4 and
 * v4-mapped IPv6), connection and message buckets (burst, refill, refused
 * attempts take nothing), a full set admitting untracked, reuse of the
 * emptiest slot, bad tickets, and four threads against one address.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/smtp/anvil.h"

static struct sockaddr_storage addr4(const char *ip)
{
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
	sin->sin_family = AF_INET;
	sin->sin_port = htons(40000);
	assert_int_equal(inet_pton(AF_INET, ip, &sin->sin_addr), 1);
	return ss;
}

static struct sockaddr_storage addr6(const char *ip)
{
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons(40001);
	assert_int_equal(inet_pton(AF_INET6, ip, &sin6->sin6_addr), 1);
	return ss;
}

static struct anvil *new_anvil(const struct anvil_config *cfg)
{
	struct anvil *a = anvil_new(cfg);
	assert_non_null(a);
	return a;
}

static void test_connection_limit(void **state)
{
	struct anvil *a = new_anvil(&(struct anvil_config){.conn_limit = 3});
	struct sockaddr_storage c = addr4("192.0.2.7"), other = addr4("192.0.2.8");
	uint32_t t[4];

	for (int i = 0; i < 3; i++) {
		assert_int_equal(anvil_connect(a, &c, 1000, &t[i]), ANVIL_OK);
		assert_int_not_equal(t[i], 0);
	}
	assert_int_equal(anvil_connections(a, &c), 3);
	assert_int_equal(anvil_connect(a, &c, 1000, &t[3]), ANVIL_CONN_LIMIT);
	assert_int_equal(t[3], 0);
	assert_int_equal(anvil_connections(a, &c), 3); /* a refusal counts nothing */
	/* another address has its own count */
	assert_int_equal(anvil_connect(a, &other, 1000, &t[3]), ANVIL_OK);
	anvil_disconnect(a, t[3]);
	assert_int_equal(anvil_connections(a, &other), 0);
	/* one closes: one more may come */
	anvil_disconnect(a, t[1]);
	assert_int_equal(anvil_connections(a, &c), 2);
	assert_int_equal(anvil_connect(a, &c, 1001, &t[1]), ANVIL_OK);
	assert_int_equal(anvil_connect(a, &c, 1001, &t[3]), ANVIL_CONN_LIMIT);
	for (int i = 0; i < 3; i++)
		anvil_disconnect(a, t[i]);
	assert_int_equal(anvil_connections(a, &c), 0);
	assert_int_equal(anvil_untracked(a), 0);
	anvil_free(&a);
	assert_null(a);
	anvil_free(&a); /* NULL is fine */
}

static void test_families_share_an_entry(void **state)
{
	struct anvil *a = new_anvil(&(struct anvil_config){.conn_limit = 2});
	struct sockaddr_storage v4 = addr4("198.51.100.1"), mapped = addr6("::ffff:198.51.100.1");
	struct sockaddr_storage v6 = addr6("2001:db8::1");
	uint32_t t1, t2, t3;

	assert_int_equal(anvil_connect(a, &v4, 0, &t1), ANVIL_OK);
	assert_int_equal(anvil_connect(a, &mapped, 0, &t2), ANVIL_OK);
	assert_int_equal(anvil_connections(a, &v4), 2);
	assert_int_equal(anvil_connect(a, &v4, 0, &t3), ANVIL_CONN_LIMIT);
	assert_int_equal(anvil_connect(a, &v6, 0, &t3), ANVIL_OK);
	anvil_disconnect(a, t3);
	anvil_disconnect(a, t1);
	anvil_disconnect(a, t2);
	assert_int_equal(anvil_connections(a, &mapped), 0);

	/* not an IP address: admitted, not tracked */
	struct sockaddr_storage un;
	memset(&un, 0, sizeof(un));
	un.ss_family = AF_UNIX;
	for (int i = 0; i < 5; i++) {
		assert_int_equal(anvil_connect(a, &un, 0, &t1), ANVIL_OK);
		assert_int_equal(t1, 0);
	}
	assert_int_equal(anvil_connect(a, NULL, 0, &t1), ANVIL_OK);
	assert_int_equal(anvil_message(a, &un, 0), ANVIL_OK);
	anvil_free(&a);
}

/* One rate's schedule: at ms, want the result of a take. */
struct take {
	uint64_t ms;
	enum anvil_result want;
};

static void test_connection_rate(void **state)
{
	/* 5 per second: 5 at once, then one every 200 ms */
	struct anvil *a =
	    new_anvil(&(struct anvil_config){.conn_rate_count = 5, .conn_rate_ms = 1000});
	struct sockaddr_storage c = addr4("203.0.113.5");
	static const struct take takes[] = {
	    {10000, ANVIL_OK},
	    {10000, ANVIL_OK},
	    {10000, ANVIL_OK},
	    {10000, ANVIL_OK},
	    {10000, ANVIL_OK},
	    {10000, ANVIL_CONN_RATE},
	    {10100, ANVIL_CONN_RATE},
	    {10199, ANVIL_CONN_RATE},
	    {10200, ANVIL_OK},
	    {10200, ANVIL_CONN_RATE},
	    {10399, ANVIL_CONN_RATE},
	    {10400, ANVIL_OK},
	    /* quiet for a while: a full bucket again, not more */
	    {20000, ANVIL_OK},
	    {20000, ANVIL_OK},
	    {20000, ANVIL_OK},
	    {20000, ANVIL_OK},
	    {20000, ANVIL_OK},
	    {20000, ANVIL_CONN_RATE},
	};
	for (size_t i = 0; i < ARRAY_SIZE(takes); i++) {
		uint32_t t;
		enum anvil_result r = anvil_connect(a, &c, takes[i].ms, &t);
		if (r != takes[i].want)
			fail_msg("take %zu at %llu ms: want %d, got %d", i,
			         (unsigned long long)takes[i].ms, takes[i].want, r);
		anvil_disconnect(a, t); /* the rate is about new connections, not open ones */
	}
	assert_int_equal(anvil_connections(a, &c), 0);
	/* no message rate set: messages are never limited */
	for (int i = 0; i < 100; i++)
		assert_int_equal(anvil_message(a, &c, 20000), ANVIL_OK);
	anvil_free(&a);
}

static void test_limit_before_rate(void **state)
{
	/* at the concurrency limit a refusal takes no token from the rate */
	struct anvil *a = new_anvil(
	    &(struct anvil_config){.conn_limit = 1, .conn_rate_count = 2, .conn_rate_ms = 60000});
	struct sockaddr_storage c = addr4("203.0.113.6");
	uint32_t t1, t2;

	assert_int_equal(anvil_connect(a, &c, 0, &t1), ANVIL_OK);
	for (int i = 0; i < 10; i++)
		assert_int_equal(anvil_connect(a, &c, 0, &t2), ANVIL_CONN_LIMIT);
	anvil_disconnect(a, t1);
	assert_int_equal(anvil_connect(a, &c, 0, &t1), ANVIL_OK); /* the second token */
	anvil_disconnect(a, t1);
	assert_int_equal(anvil_connect(a, &c, 0, &t1), ANVIL_CONN_RATE);
	assert_int_equal(anvil_connect(a, &c, 30000, &t1), ANVIL_OK);
	anvil_disconnect(a, t1);
	anvil_free(&a);
}

static void test_message_rate(void **state)
{
	/* 3 per 250 ms: a burst of 3, then one every 83.33 ms (at 5083.3, 5166.7) */
	struct anvil *a =
	    new_anvil(&(struct anvil_config){.msg_rate_count = 3, .msg_rate_ms = 250});
	struct sockaddr_storage c = addr6("2001:db8::25"), d = addr6("2001:db8::26");
	static const struct take takes[] = {
	    {5000, ANVIL_OK},       {5000, ANVIL_OK},       {5000, ANVIL_OK},
	    {5000, ANVIL_MSG_RATE}, {5083, ANVIL_MSG_RATE}, {5084, ANVIL_OK},
	    {5084, ANVIL_MSG_RATE}, {5166, ANVIL_MSG_RATE}, {5167, ANVIL_OK},
	    {6000, ANVIL_OK},       {6000, ANVIL_OK},       {6000, ANVIL_OK},
	    {6000, ANVIL_MSG_RATE},
	};
	for (size_t i = 0; i < ARRAY_SIZE(takes); i++) {
		enum anvil_result r = anvil_message(a, &c, takes[i].ms);
		if (r != takes[i].want)
			fail_msg("message %zu at %llu ms: want %d, got %d", i,
			         (unsigned long long)takes[i].ms, takes[i].want, r);
	}
	/* another address has its own bucket; connections are not limited */
	assert_int_equal(anvil_message(a, &d, 6000), ANVIL_OK);
	uint32_t t[20];
	for (int i = 0; i < 20; i++)
		assert_int_equal(anvil_connect(a, &c, 6000, &t[i]), ANVIL_OK);
	assert_int_equal(anvil_connections(a, &c), 20);
	for (int i = 0; i < 20; i++)
		anvil_disconnect(a, t[i]);
	anvil_free(&a);
}

static void test_huge_and_slow_rates(void **state)
{
	/* more tokens than nanoseconds in the period, and the longest period */
	struct anvil *a = new_anvil(&(struct anvil_config){.msg_rate_count = UINT32_MAX,
	                                                   .msg_rate_ms = 1,
	                                                   .conn_rate_count = 1,
	                                                   .conn_rate_ms = 365ull * 86400000});
	struct sockaddr_storage c = addr4("192.0.2.99");
	uint32_t t;

	for (int i = 0; i < 10000; i++)
		assert_int_equal(anvil_message(a, &c, 1), ANVIL_OK);
	assert_int_equal(anvil_connect(a, &c, 1, &t), ANVIL_OK);
	anvil_disconnect(a, t);
	assert_int_equal(anvil_connect(a, &c, 364ull * 86400000, &t), ANVIL_CONN_RATE);
	assert_int_equal(anvil_connect(a, &c, 365ull * 86400000 + 1, &t), ANVIL_OK);
	anvil_disconnect(a, t);
	anvil_free(&a);

	errno = 0;
	assert_null(anvil_new(&(struct anvil_config){.conn_rate_count = 1}));
	assert_int_equal(errno, EINVAL);
	assert_null(anvil_new(&(struct anvil_config){.msg_rate_count = 1}));
}

static void test_full_set_admits_untracked(void **state)
{
	/* one set of ANVIL_WAYS slots: every address shares it */
	struct anvil *a = new_anvil(&(struct anvil_config){.conn_limit = 1, .slots = 1});
	struct sockaddr_storage c[ANVIL_WAYS + 1];
	uint32_t t[ANVIL_WAYS + 1], t2;
	char ip[32];

	for (unsigned i = 0; i <= ANVIL_WAYS; i++) {
		snprintf(ip, sizeof(ip), "10.0.0.%u", i + 1);
		c[i] = addr4(ip);
	}
	for (unsigned i = 0; i < ANVIL_WAYS; i++)
		assert_int_equal(anvil_connect(a, &c[i], 0, &t[i]), ANVIL_OK);
	/* no slot without connections: the new address goes in untracked, unlimited */
	for (int k = 0; k < 3; k++) {
		assert_int_equal(anvil_connect(a, &c[ANVIL_WAYS], 0, &t2), ANVIL_OK);
		assert_int_equal(t2, 0);
		anvil_disconnect(a, t2);
	}
	assert_int_equal(anvil_untracked(a), 3);
	assert_int_equal(anvil_message(a, &c[ANVIL_WAYS], 0), ANVIL_OK);
	/* the tracked ones are still limited */
	assert_int_equal(anvil_connect(a, &c[0], 0, &t2), ANVIL_CONN_LIMIT);
	/* one closes: its slot may be taken */
	anvil_disconnect(a, t[3]);
	assert_int_equal(anvil_connect(a, &c[ANVIL_WAYS], 0, &t[ANVIL_WAYS]), ANVIL_OK);
	assert_int_not_equal(t[ANVIL_WAYS], 0);
	assert_int_equal(anvil_connect(a, &c[ANVIL_WAYS], 0, &t2), ANVIL_CONN_LIMIT);
	assert_int_equal(anvil_connections(a, &c[3]), 0);
	/* c[3] cannot come back now: every slot has a connection again */
	assert_int_equal(anvil_connect(a, &c[3], 0, &t2), ANVIL_OK);
	assert_int_equal(t2, 0);
	for (unsigned i = 0; i <= ANVIL_WAYS; i++)
		if (i != 3)
			anvil_disconnect(a, t[i]);
	for (unsigned i = 0; i <= ANVIL_WAYS; i++)
		assert_int_equal(anvil_connections(a, &c[i]), 0);
	anvil_free(&a);
}

static void test_reuse_takes_the_emptiest_slot(void **state)
{
	/* 1 message per second; one set; address i takes its message at i*100 ms */
	struct anvil *a = new_anvil(
	    &(struct anvil_config){.msg_rate_count = 1, .msg_rate_ms = 1000, .slots = ANVIL_WAYS});
	struct sockaddr_storage c[ANVIL_WAYS + 1];
	char ip[32];

	for (unsigned i = 0; i <= ANVIL_WAYS; i++) {
		snprintf(ip, sizeof(ip), "10.1.0.%u", i + 1);
		c[i] = addr4(ip);
	}
	for (unsigned i = 0; i < ANVIL_WAYS; i++)
		assert_int_equal(anvil_message(a, &c[i], 100 * i), ANVIL_OK);
	/* at 850 ms every bucket is still empty; the newcomer replaces c[0], whose
	   bucket fills first (at 1000 ms) */
	assert_int_equal(anvil_message(a, &c[ANVIL_WAYS], 850), ANVIL_OK);
	assert_int_equal(anvil_message(a, &c[ANVIL_WAYS], 850), ANVIL_MSG_RATE);
	for (unsigned i = 1; i < ANVIL_WAYS; i++)
		assert_int_equal(anvil_message(a, &c[i], 850), ANVIL_MSG_RATE);
	/* c[0] was forgotten: it starts with a full bucket (in c[1]'s old slot, the next
	   to fill) */
	assert_int_equal(anvil_message(a, &c[0], 850), ANVIL_OK);
	assert_int_equal(anvil_message(a, &c[0], 850), ANVIL_MSG_RATE);
	/* a slot with an open connection is never the one reused */
	struct anvil *b = new_anvil(&(struct anvil_config){.conn_limit = 5, .slots = ANVIL_WAYS});
	uint32_t t0, t;
	assert_int_equal(anvil_connect(b, &c[0], 0, &t0), ANVIL_OK);
	for (unsigned round = 0; round < 4; round++)
		for (unsigned i = 1; i <= ANVIL_WAYS; i++) {
			assert_int_equal(anvil_connect(b, &c[i], round, &t), ANVIL_OK);
			anvil_disconnect(b, t);
		}
	assert_int_equal(anvil_connections(b, &c[0]), 1);
	anvil_disconnect(b, t0);
	assert_int_equal(anvil_connections(b, &c[0]), 0);
	anvil_free(&b);
	anvil_free(&a);
}

static void test_bad_tickets(void **state)
{
	struct anvil *a = new_anvil(&(struct anvil_config){.conn_limit = 1, .slots = 64});
	struct sockaddr_storage c = addr4("192.0.2.1");
	uint32_t t;

	assert_int_equal(anvil_connect(a, &c, 0, &t), ANVIL_OK);
	anvil_disconnect(a, 0);
	anvil_disconnect(a, 65);
	anvil_disconnect(a, UINT32_MAX);
	assert_int_equal(anvil_connections(a, &c), 1);
	anvil_disconnect(a, t);
	anvil_disconnect(a, t); /* a second time: the count stays at 0 */
	assert_int_equal(anvil_connections(a, &c), 0);
	assert_int_equal(anvil_connect(a, &c, 0, &t), ANVIL_OK);
	anvil_disconnect(a, t);
	anvil_free(&a);
}

/* ---- threads: four "workers" share one address ---- */

#define THREADS 4
#define ROUNDS  20000
#define LIMIT   3

struct worker_arg {
	struct anvil *a;
	struct sockaddr_storage addr;
	unsigned admitted, refused, over;
};

static void *worker(void *p)
{
	struct worker_arg *w = p;
	for (unsigned i = 0; i < ROUNDS; i++) {
		uint32_t t;
		if (anvil_connect(w->a, &w->addr, i, &t) != ANVIL_OK) {
			w->refused++;
			continue;
		}
		w->admitted++;
		if (anvil_connections(w->a, &w->addr) > LIMIT)
			w->over++;
		anvil_disconnect(w->a, t);
	}
	return NULL;
}

static void test_threads_share_the_count(void **state)
{
	struct anvil *a = new_anvil(&(struct anvil_config){.conn_limit = LIMIT});
	struct worker_arg args[THREADS];
	pthread_t th[THREADS];
	unsigned admitted = 0;

	for (int i = 0; i < THREADS; i++) {
		args[i] = (struct worker_arg){.a = a, .addr = addr4("192.0.2.50")};
		assert_int_equal(pthread_create(&th[i], NULL, worker, &args[i]), 0);
	}
	for (int i = 0; i < THREADS; i++) {
		assert_int_equal(pthread_join(th[i], NULL), 0);
		assert_int_equal(args[i].over, 0);
		assert_int_equal(args[i].admitted + args[i].refused, ROUNDS);
		admitted += args[i].admitted;
	}
	assert_true(admitted > 0);
	assert_int_equal(anvil_connections(a, &args[0].addr), 0);
	anvil_free(&a);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_connection_limit),
	    cmocka_unit_test(test_families_share_an_entry),
	    cmocka_unit_test(test_connection_rate),
	    cmocka_unit_test(test_limit_before_rate),
	    cmocka_unit_test(test_message_rate),
	    cmocka_unit_test(test_huge_and_slow_rates),
	    cmocka_unit_test(test_full_set_admits_untracked),
	    cmocka_unit_test(test_reuse_takes_the_emptiest_slot),
	    cmocka_unit_test(test_bad_tickets),
	    cmocka_unit_test(test_threads_share_the_count),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
