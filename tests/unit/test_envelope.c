/*
 * Unit tests of queue/envelope (the RECORD_MESSAGE payload reader) and of
 * queue/spool_scan (the read-only spool walk built on it).
 *
 * The spool's encoder is static in queue/spool.c, so payloads are built here
 * by a small encoder that follows docs/spool.md field by field. Tables of
 * named cases: good envelopes decode back to what was encoded (0 and 1000
 * recipients, the null sender, 65535-octet fields, binary bodies); every
 * truncation of every good payload fails cleanly (decoded from an exact-size
 * heap copy, so ASan sees any read past the end); damaged lengths and counts
 * fail; every octet of the envelope flipped either fails or decodes within
 * the payload. spool_scan is run over a spool directory built on disk.
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

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/compiler.h"
#include "core/log.h"
#include "queue/envelope.h"
#include "queue/record.h"
#include "queue/spool.h"
#include "queue/spool_scan.h"

/* ---- a growable buffer and the local encoder ---- */

struct buf {
	uint8_t *p;
	size_t len, cap;
};

static void buf_put(struct buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		b->cap = (b->len + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
		assert_non_null(b->p);
	}
	if (n)
		memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_le(struct buf *b, uint64_t v, unsigned octets)
{
	uint8_t o[8];
	for (unsigned i = 0; i < octets; i++)
		o[i] = (uint8_t)(v >> (8 * i));
	buf_put(b, o, octets);
}

static void buf_str(struct buf *b, const char *s, size_t len)
{
	buf_le(b, len, 2);
	buf_put(b, s, len);
}

static void put_le(uint8_t *p, uint64_t v, unsigned octets)
{
	for (unsigned i = 0; i < octets; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

struct trcpt {
	char *addr;
	size_t addr_len;
	uint8_t notify;
	char *orcpt;
	size_t orcpt_len;
};

/* What a good case encodes (and must decode back to). */
struct tmsg {
	uint64_t received_ms;
	uint16_t flags;
	char *sender, *helo, *peer, *envid;
	size_t sender_len, helo_len, peer_len, envid_len;
	struct trcpt *rcpts;
	unsigned nrcpts;
	uint8_t *body;
	size_t body_len;
};

/* Offsets of the fields of an encoded payload, for the damage cases. */
struct layout {
	size_t sender, helo, peer, envid, count, first_rcpt, last_rcpt, env_len;
};

/* Encodes m as spool.c's envelope_encode does, then the body. */
static void encode(const struct tmsg *m, struct buf *b, struct layout *lay)
{
	struct layout l;
	b->len = 0;
	buf_le(b, 0, 4); /* patched below */
	buf_le(b, m->received_ms, 8);
	buf_le(b, m->flags, 2);
	buf_le(b, m->body_len, 8);
	l.sender = b->len;
	buf_str(b, m->sender, m->sender_len);
	l.helo = b->len;
	buf_str(b, m->helo, m->helo_len);
	l.peer = b->len;
	buf_str(b, m->peer, m->peer_len);
	l.envid = b->len;
	buf_str(b, m->envid, m->envid_len);
	l.count = b->len;
	buf_le(b, m->nrcpts, 4);
	l.first_rcpt = l.last_rcpt = b->len;
	for (unsigned i = 0; i < m->nrcpts; i++) {
		l.last_rcpt = b->len;
		buf_str(b, m->rcpts[i].addr, m->rcpts[i].addr_len);
		buf_put(b, &m->rcpts[i].notify, 1);
		buf_str(b, m->rcpts[i].orcpt, m->rcpts[i].orcpt_len);
	}
	l.env_len = b->len;
	put_le(b->p, b->len, 4);
	buf_put(b, m->body, m->body_len);
	if (lay)
		*lay = l;
}

/* ---- building the good cases ---- */

static char *dup_mem(const void *p, size_t n)
{
	char *s = malloc(n ? n : 1);
	assert_non_null(s);
	if (n)
		memcpy(s, p, n);
	return s;
}

static char *filled(size_t n, char c)
{
	char *s = malloc(n ? n : 1);
	assert_non_null(s);
	memset(s, c, n);
	return s;
}

static void set_str(char **s, size_t *len, const char *v)
{
	*len = strlen(v);
	*s = dup_mem(v, *len);
}

static void tmsg_free(struct tmsg *m)
{
	free(m->sender);
	free(m->helo);
	free(m->peer);
	free(m->envid);
	for (unsigned i = 0; i < m->nrcpts; i++) {
		free(m->rcpts[i].addr);
		free(m->rcpts[i].orcpt);
	}
	free(m->rcpts);
	free(m->body);
	memset(m, 0, sizeof(*m));
}

static void add_rcpts(struct tmsg *m, unsigned n, bool with_orcpt)
{
	m->rcpts = calloc(n ? n : 1, sizeof(*m->rcpts));
	assert_non_null(m->rcpts);
	m->nrcpts = n;
	for (unsigned i = 0; i < n; i++) {
		char a[64];
		snprintf(a, sizeof(a), "user%u@example.com", i);
		set_str(&m->rcpts[i].addr, &m->rcpts[i].addr_len, a);
		m->rcpts[i].notify = (uint8_t)(i % 16);
		if (with_orcpt && i % 2 == 0) {
			char o[80];
			snprintf(o, sizeof(o), "rfc822;original%u@example.org", i);
			set_str(&m->rcpts[i].orcpt, &m->rcpts[i].orcpt_len, o);
		} else {
			set_str(&m->rcpts[i].orcpt, &m->rcpts[i].orcpt_len, "");
		}
	}
}

static void base(struct tmsg *m, const char *sender, const char *body)
{
	memset(m, 0, sizeof(*m));
	m->received_ms = 1700000000123ull;
	m->flags = SPOOL_ENV_ESMTP | SPOOL_ENV_8BITMIME;
	set_str(&m->sender, &m->sender_len, sender);
	set_str(&m->helo, &m->helo_len, "client.example.net");
	set_str(&m->peer, &m->peer_len, "192.0.2.7");
	set_str(&m->envid, &m->envid_len, "");
	m->body_len = strlen(body);
	m->body = (uint8_t *)dup_mem(body, m->body_len);
}

static void case_minimal(struct tmsg *m)
{
	memset(m, 0, sizeof(*m));
	set_str(&m->sender, &m->sender_len, "");
	set_str(&m->helo, &m->helo_len, "");
	set_str(&m->peer, &m->peer_len, "");
	set_str(&m->envid, &m->envid_len, "");
	m->body = malloc(1);
	assert_non_null(m->body);
}

static void case_typical(struct tmsg *m)
{
	base(m, "alice@example.org", "Subject: hi\r\n\r\nHello.\r\n");
	free(m->envid);
	set_str(&m->envid, &m->envid_len, "QQ314159");
	add_rcpts(m, 1, true);
}

static void case_null_sender(struct tmsg *m)
{
	base(m, "", "Subject: bounce\r\n\r\nundeliverable\r\n");
	m->flags = 0;
	add_rcpts(m, 3, false);
}

static void case_no_rcpts(struct tmsg *m)
{
	base(m, "a@b", "x");
}

static void case_1000_rcpts(struct tmsg *m)
{
	base(m, "list@example.org", "Subject: many\r\n\r\nto all\r\n");
	add_rcpts(m, 1000, true);
}

static void case_long_fields(struct tmsg *m)
{
	base(m, "", "");
	free(m->sender);
	free(m->helo);
	free(m->peer);
	free(m->envid);
	m->sender = filled(m->sender_len = 65535, 's');
	m->helo = filled(m->helo_len = 65535, 'h');
	m->peer = filled(m->peer_len = 65535, 'p');
	m->envid = filled(m->envid_len = 65535, 'e');
	add_rcpts(m, 2, false);
	free(m->rcpts[1].addr);
	free(m->rcpts[1].orcpt);
	m->rcpts[1].addr = filled(m->rcpts[1].addr_len = 65535, 'r');
	m->rcpts[1].orcpt = filled(m->rcpts[1].orcpt_len = 65535, 'o');
	free(m->body);
	m->body_len = 3u << 20;
	m->body = (uint8_t *)filled(m->body_len, 'b');
}

static void case_utf8_binary(struct tmsg *m)
{
	static const uint8_t body[] = {0, 1, 2, '\r', '\n', 0xff, 0xfe, '.', '\r', '\n', 0};
	base(m,
	     "j\xc3\xbcrgen@b\xc3\xbc"
	     "cher.example",
	     "");
	m->flags = 0x3f | 0x8000; /* every known bit and an unknown one */
	add_rcpts(m, 1, false);
	free(m->rcpts[0].addr);
	set_str(&m->rcpts[0].addr, &m->rcpts[0].addr_len,
	        "\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b.cn");
	m->rcpts[0].notify = 0xff;
	free(m->body);
	m->body_len = sizeof(body);
	m->body = (uint8_t *)dup_mem(body, sizeof(body));
	m->received_ms = UINT64_MAX;
}

static const struct good_case {
	const char *name;
	void (*build)(struct tmsg *m);
} good_cases[] = {
    {"minimal: everything empty, no recipients, no body", case_minimal},
    {"typical: one recipient with NOTIFY and ORCPT, ENVID", case_typical},
    {"null sender, three recipients", case_null_sender},
    {"no recipients", case_no_rcpts},
    {"1000 recipients", case_1000_rcpts},
    {"65535-octet fields, 3 MiB body", case_long_fields},
    {"UTF-8 addresses, binary body, all flags, max time", case_utf8_binary},
};

/* Decodes an exact-size heap copy of b (so ASan catches a read past its end). */
static int decode_copy(const uint8_t *p, size_t len, uint8_t **copy_r, struct spool_message *m,
                       char *err, size_t errlen)
{
	uint8_t *copy = malloc(len ? len : 1);
	assert_non_null(copy);
	if (len)
		memcpy(copy, p, len);
	*copy_r = copy;
	return spool_envelope_decode(copy, len, m, err, errlen);
}

static bool within(const uint8_t *buf, size_t len, const void *p, size_t n)
{
	const uint8_t *q = p;
	return q >= buf && q <= buf + len && n <= (size_t)(buf + len - q);
}

/* Every pointer of a decoded message lies within the payload. */
static void check_within(const uint8_t *buf, size_t len, const struct spool_message *m)
{
	assert_true(within(buf, len, m->sender, m->sender_len));
	assert_true(within(buf, len, m->helo, m->helo_len));
	assert_true(within(buf, len, m->peer, m->peer_len));
	assert_true(within(buf, len, m->envid, m->envid_len));
	assert_true(m->env_len >= SPOOL_ENVELOPE_MIN && m->env_len <= len);
	for (uint32_t i = 0; i < m->nrcpts; i++) {
		assert_true(within(buf, m->env_len, m->rcpts[i].addr, m->rcpts[i].addr_len));
		assert_true(within(buf, m->env_len, m->rcpts[i].orcpt, m->rcpts[i].orcpt_len));
	}
	assert_ptr_equal(m->body, buf + m->env_len);
	assert_int_equal(m->body_len, len - m->env_len);
}

static void assert_mem(const void *got, size_t got_len, const void *want, size_t want_len)
{
	assert_int_equal(got_len, want_len);
	if (want_len)
		assert_memory_equal(got, want, want_len);
}

static void test_good(void **state)
{
	(void)state;
	for (size_t c = 0; c < ARRAY_SIZE(good_cases); c++) {
		struct tmsg t;
		struct buf b = {0};
		struct layout l;
		struct spool_message m;
		uint8_t *copy;
		char err[256];

		print_message("good: %s\n", good_cases[c].name);
		good_cases[c].build(&t);
		encode(&t, &b, &l);
		int r = decode_copy(b.p, b.len, &copy, &m, err, sizeof(err));
		if (r != 0)
			fail_msg("%s: %s", good_cases[c].name, err);
		check_within(copy, b.len, &m);
		assert_int_equal(m.received_ms, t.received_ms);
		assert_int_equal(m.flags, t.flags);
		assert_int_equal(m.env_len, l.env_len);
		assert_mem(m.sender, m.sender_len, t.sender, t.sender_len);
		assert_mem(m.helo, m.helo_len, t.helo, t.helo_len);
		assert_mem(m.peer, m.peer_len, t.peer, t.peer_len);
		assert_mem(m.envid, m.envid_len, t.envid, t.envid_len);
		assert_int_equal(m.nrcpts, t.nrcpts);
		for (unsigned i = 0; i < t.nrcpts; i++) {
			assert_mem(m.rcpts[i].addr, m.rcpts[i].addr_len, t.rcpts[i].addr,
			           t.rcpts[i].addr_len);
			assert_int_equal(m.rcpts[i].notify, t.rcpts[i].notify);
			assert_mem(m.rcpts[i].orcpt, m.rcpts[i].orcpt_len, t.rcpts[i].orcpt,
			           t.rcpts[i].orcpt_len);
		}
		assert_mem(m.body, m.body_len, t.body, t.body_len);
		if (!t.nrcpts)
			assert_null(m.rcpts);
		spool_message_free(&m);
		assert_null(m.rcpts);
		spool_message_free(&m); /* twice: harmless */
		free(copy);
		free(b.p);
		tmsg_free(&t);
	}
	spool_message_free(NULL);
}

/* Every proper prefix of every good payload fails with -EBADMSG and a reason. */
static void test_truncations(void **state)
{
	(void)state;
	for (size_t c = 0; c < ARRAY_SIZE(good_cases); c++) {
		struct tmsg t;
		struct buf b = {0};
		struct layout l;

		size_t ncuts = 0;
		good_cases[c].build(&t);
		encode(&t, &b, &l);
		/* every cut; for the big case every cut near a field's start and a sample */
		const size_t marks[] = {0,       14,      l.sender,     l.helo,      l.peer,
		                        l.envid, l.count, l.first_rcpt, l.last_rcpt, l.env_len};
		for (size_t cut = 0; cut < b.len; cut++) {
			bool near = b.len <= (1u << 17) || cut % 4093 == 0;
			for (size_t k = 0; k < ARRAY_SIZE(marks) && !near; k++)
				near = cut + 24 >= marks[k] && cut <= marks[k] + 24;
			if (!near)
				continue;
			ncuts++;
			struct spool_message m;
			uint8_t *copy;
			char err[256] = "";
			int r = decode_copy(b.p, cut, &copy, &m, err, sizeof(err));
			if (r != -EBADMSG)
				fail_msg("%s: cut at %zu of %zu: %d", good_cases[c].name, cut,
				         b.len, r);
			assert_true(err[0] != '\0');
			assert_null(m.rcpts);
			assert_int_equal(m.nrcpts, 0);
			free(copy);
		}
		print_message("truncations: %s: %zu cuts of %zu octets\n", good_cases[c].name,
		              ncuts, b.len);
		free(b.p);
		tmsg_free(&t);
	}
}

/* ---- damaged payloads: a good one, changed in one place ---- */

enum field { F_ENV_LEN, F_BODY_LEN, F_SENDER_LEN, F_ENVID_LEN, F_COUNT, F_RCPT0_LEN, F_APPEND };

static const struct bad_case {
	const char *name;
	enum field field;
	int64_t delta;     /* added to the field's value ... */
	uint64_t absolute; /* ... or, when delta is 0, the value itself */
	const char *why;   /* a word the error must contain */
} bad_cases[] = {
    {"envelope length 0", F_ENV_LEN, 0, 0, "minimum"},
    {"envelope length 33", F_ENV_LEN, 0, 33, "minimum"},
    {"envelope length past the payload", F_ENV_LEN, 0, 0x7fffffff, "past"},
    {"envelope length UINT32_MAX", F_ENV_LEN, 0, UINT32_MAX, "past"},
    {"envelope length one short", F_ENV_LEN, -1, 0, "body length"},
    {"envelope length one long", F_ENV_LEN, 1, 0, "body length"},
    {"body length one more", F_BODY_LEN, 1, 0, "body length"},
    {"body length one less", F_BODY_LEN, -1, 0, "body length"},
    {"body length UINT64_MAX", F_BODY_LEN, 0, UINT64_MAX, "body length"},
    {"an octet after the body", F_APPEND, 0, 0, "body length"},
    {"sender length 65535", F_SENDER_LEN, 0, 65535, "sender"},
    {"sender length one more", F_SENDER_LEN, 1, 0, ""},
    {"ENVID length past the envelope", F_ENVID_LEN, 0, 4000, "ENVID"},
    {"recipient count UINT32_MAX", F_COUNT, 0, UINT32_MAX, "cannot fit"},
    {"recipient count one more", F_COUNT, 1, 0, "recipient"},
    {"recipient count one less", F_COUNT, -1, 0, "unexplained"},
    {"first recipient's length one more", F_RCPT0_LEN, 1, 0, ""},
    {"first recipient's length 65535", F_RCPT0_LEN, 0, 65535, "recipient address"},
};

static uint64_t get_le(const uint8_t *p, unsigned octets)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < octets; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static void test_bad(void **state)
{
	(void)state;
	struct tmsg t;
	struct buf good = {0};
	struct layout l;

	case_null_sender(&t); /* three recipients, a body */
	encode(&t, &good, &l);
	for (size_t c = 0; c < ARRAY_SIZE(bad_cases); c++) {
		const struct bad_case *bc = &bad_cases[c];
		struct buf b = {0};
		size_t at = 0;
		unsigned octets = 0;

		buf_put(&b, good.p, good.len);
		switch (bc->field) {
		case F_ENV_LEN:
			at = 0, octets = 4;
			break;
		case F_BODY_LEN:
			at = 14, octets = 8;
			break;
		case F_SENDER_LEN:
			at = l.sender, octets = 2;
			break;
		case F_ENVID_LEN:
			at = l.envid, octets = 2;
			break;
		case F_COUNT:
			at = l.count, octets = 4;
			break;
		case F_RCPT0_LEN:
			at = l.first_rcpt, octets = 2;
			break;
		case F_APPEND:
			buf_put(&b, "", 1);
			break;
		}
		if (octets) {
			uint64_t v = bc->delta ? get_le(b.p + at, octets) + (uint64_t)bc->delta
			                       : bc->absolute;
			put_le(b.p + at, v, octets);
		}
		struct spool_message m;
		uint8_t *copy;
		char err[256] = "";
		print_message("bad: %s\n", bc->name);
		int r = decode_copy(b.p, b.len, &copy, &m, err, sizeof(err));
		if (r != -EBADMSG)
			fail_msg("%s: decoded (%d)", bc->name, r);
		if (!strstr(err, bc->why))
			fail_msg("%s: error \"%s\" does not say \"%s\"", bc->name, err, bc->why);
		assert_null(m.rcpts);
		/* a NULL error buffer is allowed */
		assert_int_equal(spool_envelope_decode(copy, b.len, &m, NULL, 0), -EBADMSG);
		free(copy);
		free(b.p);
	}
	free(good.p);
	tmsg_free(&t);
}

/* Every octet of a small payload's envelope, set to a few values: fails or stays within. */
static void test_mutate_everywhere(void **state)
{
	(void)state;
	static const uint8_t values[] = {0x00, 0x01, 0x7f, 0x80, 0xff};
	struct tmsg t;
	struct buf b = {0};
	struct layout l;
	unsigned decoded = 0, failed = 0;

	case_typical(&t);
	encode(&t, &b, &l);
	for (size_t i = 0; i < l.env_len; i++) {
		for (size_t v = 0; v < ARRAY_SIZE(values); v++) {
			uint8_t *copy = malloc(b.len);
			assert_non_null(copy);
			memcpy(copy, b.p, b.len);
			copy[i] = values[v];
			struct spool_message m;
			char err[256];
			int r = spool_envelope_decode(copy, b.len, &m, err, sizeof(err));
			if (r == 0) {
				check_within(copy, b.len, &m);
				decoded++;
			} else {
				assert_int_equal(r, -EBADMSG);
				failed++;
			}
			spool_message_free(&m);
			free(copy);
		}
	}
	assert_true(decoded > 0 && failed > 0);
	free(b.p);
	tmsg_free(&t);
}

/* ---- spool_scan over a spool built on disk ---- */

struct seen {
	uint64_t id;
	uint64_t offset;
	char segment[256];
	uint32_t nrcpts;
	size_t body_len;
};

struct scan_log {
	struct seen v[64];
	unsigned n;
	unsigned stop_after; /* 0: never */
};

static int scan_each(void *arg, const struct spool_scan_item *it)
{
	struct scan_log *s = arg;
	assert_true(s->n < ARRAY_SIZE(s->v));
	struct seen *e = &s->v[s->n++];
	e->id = it->queue_id;
	e->offset = it->offset;
	snprintf(e->segment, sizeof(e->segment), "%s", strrchr(it->segment, '/') + 1);
	e->nrcpts = it->msg->nrcpts;
	e->body_len = it->msg->body_len;
	assert_int_equal(it->msg->env_len + it->msg->body_len, it->length);
	return s->stop_after && s->n == s->stop_after ? 7 : 0;
}

static void write_file(const char *path, const struct buf *b)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, b->p, b->len), (ssize_t)b->len);
	close(fd);
}

/* The segment seg_start began: its seq, and whether it is version 1 (records not bound). */
static uint64_t seg_seq;
static bool seg_v1;

/* Appends a record of type `type` whose payload is p[0..len), with its padding. */
static size_t seg_record(struct buf *seg, uint8_t type, uint64_t id, const uint8_t *p, size_t len)
{
	static const uint8_t zeros[8];
	uint8_t hdr[RECORD_HEADER_SIZE];
	struct iovec iov = {(void *)p, len};
	size_t at = seg->len;
	size_t pad = record_header_encode(hdr, (enum record_type)type, 0, id, &iov, 1);
	if (!seg_v1)
		record_header_bind(hdr, seg_seq);
	buf_put(seg, hdr, sizeof(hdr));
	buf_put(seg, p, len);
	buf_put(seg, zeros, pad);
	return at;
}

static void seg_start(struct buf *seg, uint32_t worker, uint64_t seq)
{
	uint8_t hdr[SEGMENT_HEADER_SIZE];
	seg->len = 0;
	segment_header_encode(hdr, worker, seq, 1700000000);
	seg_seq = seq;
	seg_v1 = false;
	buf_put(seg, hdr, sizeof(hdr));
}

/* The same as an older writer made it: version 1. */
static void seg_start_v1(struct buf *seg, uint32_t worker, uint64_t seq)
{
	seg_start(seg, worker, seq);
	seg->p[8] = SEGMENT_VERSION_V1;
	seg_v1 = true;
}

static void test_scan(void **state)
{
	(void)state;
	char dir[] = "/tmp/test_envelope.XXXXXX";
	char path[512];
	struct tmsg t;
	struct buf msg = {0}, seg = {0};
	struct scan_log s;
	char err[256];

	assert_non_null(mkdtemp(dir));
	log_set_level(LOG_ERR); /* the damage below is reported as warnings */

	/* empty spool */
	memset(&s, 0, sizeof(s));
	assert_int_equal(spool_scan(dir, scan_each, &s, err, sizeof(err)), 0);
	assert_int_equal(s.n, 0);

	snprintf(path, sizeof(path), "%s/w0", dir);
	assert_int_equal(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/w1", dir);
	assert_int_equal(mkdir(path, 0700), 0);

	case_null_sender(&t);
	encode(&t, &msg, NULL);

	/* w0/seg 1: three messages, the second with a bad checksum, a state record, a torn tail */
	seg_start(&seg, 0, 1);
	size_t o1 = seg_record(&seg, RECORD_MESSAGE, 0x100, msg.p, msg.len);
	size_t o2 = seg_record(&seg, RECORD_MESSAGE, 0x101, msg.p, msg.len);
	seg.p[o2 + 30] ^= 1; /* in the payload: the crc no longer matches */
	seg_record(&seg, RECORD_STATE, 0x100, (const uint8_t *)"x", 1);
	size_t o3 = seg_record(&seg, RECORD_MESSAGE, 0x102, msg.p, msg.len);
	/* a message whose crc is good but whose envelope is not */
	size_t bad_at = seg.len;
	seg_record(&seg, RECORD_MESSAGE, 0x103, msg.p, msg.len - 1);
	(void)bad_at;
	size_t keep = seg.len;
	seg_record(&seg, RECORD_MESSAGE, 0x104, msg.p, msg.len);
	seg.len = keep + 40; /* torn */
	snprintf(path, sizeof(path), "%s/w0/seg-%016x.log", dir, 1);
	write_file(path, &seg);

	/* w1/seg 2 (newest of w1, version 1): a message, then a torn tail (a write in progress) */
	seg_start_v1(&seg, 1, 2);
	size_t o4 = seg_record(&seg, RECORD_MESSAGE, 0x200, msg.p, msg.len);
	keep = seg.len;
	seg_record(&seg, RECORD_MESSAGE, 0x201, msg.p, msg.len);
	seg.len = keep + 10;
	snprintf(path, sizeof(path), "%s/w1/seg-%016x.log", dir, 2);
	write_file(path, &seg);

	/*
	 * w0/seg 3 (newest of w0): one message, and a compaction copy of 0x102
	 * (the same id again, while its old segment is still there): only the
	 * copy is listed, where it is
	 */
	seg_start(&seg, 0, 3);
	size_t o5 = seg_record(&seg, RECORD_MESSAGE, 0x300, msg.p, msg.len);
	size_t o6 = seg_record(&seg, RECORD_MESSAGE, 0x102, msg.p, msg.len);
	snprintf(path, sizeof(path), "%s/w0/seg-%016x.log", dir, 3);
	write_file(path, &seg);

	/* a spare (a dead segment kept for reuse) is never read, whatever it holds */
	seg_start(&seg, 0, 5);
	seg_record(&seg, RECORD_MESSAGE, 0x500, msg.p, msg.len);
	snprintf(path, sizeof(path), "%s/w0/spare-0.log", dir);
	write_file(path, &seg);
	/* ... and neither is a segment whose header's seq is not its name's (damaged) */
	snprintf(path, sizeof(path), "%s/w0/seg-%016x.log", dir, 6);
	write_file(path, &seg);

	/* not segments: a header-less new file, junk names, the lock */
	snprintf(path, sizeof(path), "%s/w1/seg-%016x.log", dir, 4);
	write_file(path, &(struct buf){(uint8_t *)"PHSP", 4, 4});
	snprintf(path, sizeof(path), "%s/w1/other.txt", dir);
	write_file(path, &msg);
	snprintf(path, sizeof(path), "%s/lock", dir);
	write_file(path, &(struct buf){(uint8_t *)"1\n", 2, 2});

	memset(&s, 0, sizeof(s));
	int r = spool_scan(dir, scan_each, &s, err, sizeof(err));
	if (r != 0)
		fail_msg("spool_scan: %d %s", r, err);
	static const struct {
		uint64_t id;
		const char *seg;
	} want[] = {
	    {0x100, "seg-0000000000000001.log"},
	    {0x200, "seg-0000000000000002.log"},
	    {0x300, "seg-0000000000000003.log"},
	    {0x102, "seg-0000000000000003.log"},
	};
	const size_t offsets[] = {o1, o4, o5, o6};
	(void)o3; /* superseded by its copy */
	assert_int_equal(s.n, ARRAY_SIZE(want));
	for (unsigned i = 0; i < s.n; i++) {
		assert_int_equal(s.v[i].id, want[i].id);
		assert_string_equal(s.v[i].segment, want[i].seg);
		assert_int_equal(s.v[i].offset, offsets[i]);
		assert_int_equal(s.v[i].nrcpts, 3);
		assert_int_equal(s.v[i].body_len, t.body_len);
	}

	/* each stops the scan: its value comes back */
	memset(&s, 0, sizeof(s));
	s.stop_after = 2;
	assert_int_equal(spool_scan(dir, scan_each, &s, err, sizeof(err)), 7);
	assert_int_equal(s.n, 2);

	/* a missing spool: -ENOENT with a reason */
	snprintf(path, sizeof(path), "%s/nonexistent", dir);
	err[0] = '\0';
	assert_int_equal(spool_scan(path, scan_each, &s, err, sizeof(err)), -ENOENT);
	assert_non_null(strstr(err, "nonexistent"));

	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
	free(msg.p);
	free(seg.p);
	tmsg_free(&t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_good), cmocka_unit_test(test_truncations),
	    cmocka_unit_test(test_bad),  cmocka_unit_test(test_mutate_everywhere),
	    cmocka_unit_test(test_scan),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
