/*
 * Unit tests of queue/record: tables of named cases. Segments are built with
 * the encoder (header + payload slices + zero padding, as the spool writes
 * them), then decoded whole, damaged case by case, cut at every offset,
 * grown one octet at a time, and bit-flipped at every bit. The tables are
 * version-1 segments (still read); the version-2 tests at the end add
 * records bound to their segment and recycled files (an earlier
 * incarnation's octets after the data).
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

#include "core/compiler.h"
#include "queue/crc32c.h"
#include "queue/record.h"

/* ---- a segment under construction, and what it should decode to ---- */

#define MAX_RECS 64

struct expect_rec {
	uint8_t raw_type;
	uint8_t flags;
	uint64_t queue_id;
	size_t offset; /* of the header */
	size_t length; /* payload octets */
};

struct seg {
	uint8_t *buf;
	size_t len, cap;
	struct expect_rec rec[MAX_RECS];
	unsigned n;
	bool v2;      /* records bound to seq */
	uint64_t seq; /* the header's */
};

static void seg_put(struct seg *s, const void *p, size_t n)
{
	if (s->len + n > s->cap) {
		s->cap = (s->len + n) * 2 + 64;
		s->buf = realloc(s->buf, s->cap);
		assert_non_null(s->buf);
	}
	if (n)
		memcpy(s->buf + s->len, p, n);
	s->len += n;
}

/* A version-1 segment (seq 42): the header as an older writer made it. */
static void seg_init(struct seg *s)
{
	uint8_t hdr[SEGMENT_HEADER_SIZE];

	memset(s, 0, sizeof(*s));
	segment_header_encode(hdr, 3, 42, 1700000000);
	hdr[8] = SEGMENT_VERSION_V1;
	s->seq = 42;
	seg_put(s, hdr, sizeof(hdr));
}

/* A version-2 segment of sequence seq: its records are bound to it. */
static void seg_init_v2(struct seg *s, uint64_t seq)
{
	uint8_t hdr[SEGMENT_HEADER_SIZE];

	memset(s, 0, sizeof(*s));
	segment_header_encode(hdr, 3, seq, 1700000000);
	s->v2 = true;
	s->seq = seq;
	seg_put(s, hdr, sizeof(hdr));
}

/* A reader for s as the spool makes one: from its header. */
static void seg_reader(struct record_reader *rr, const struct seg *s, uint64_t offset)
{
	struct segment_header h;

	assert_int_equal(segment_header_decode(s->buf, s->len, &h), 0);
	assert_int_equal(h.version, s->v2 ? SEGMENT_VERSION : SEGMENT_VERSION_V1);
	record_reader_init_segment(rr, &h, offset);
}

static void seg_free(struct seg *s)
{
	free(s->buf);
	s->buf = NULL;
}

/* The payload octet j of a record with queue id id: a pattern of its own. */
static uint8_t pattern(uint64_t id, size_t j)
{
	return (uint8_t)(id * 131u + j * 7u + 1u);
}

/* Appends a record whose payload is `total` pattern octets given as pieces of the sizes listed. */
static void seg_add_pieces(struct seg *s, unsigned raw_type, uint8_t flags, uint64_t id,
                           const size_t *pieces, unsigned npieces)
{
	static const uint8_t zeros[8];
	struct iovec iov[8];
	size_t total = 0;
	uint8_t *data;

	assert_true(npieces <= ARRAY_SIZE(iov));
	assert_true(s->n < MAX_RECS);
	for (unsigned i = 0; i < npieces; i++)
		total += pieces[i];
	data = malloc(total ? total : 1);
	assert_non_null(data);
	for (size_t j = 0; j < total; j++)
		data[j] = pattern(id, j);
	size_t off = 0;
	for (unsigned i = 0; i < npieces; i++) {
		/* each piece in its own block, so ASan sees any read past one */
		uint8_t *piece = malloc(pieces[i] ? pieces[i] : 1);
		assert_non_null(piece);
		memcpy(piece, data + off, pieces[i]);
		iov[i] = (struct iovec){piece, pieces[i]};
		off += pieces[i];
	}

	uint8_t hdr[RECORD_HEADER_SIZE];
	size_t pad = record_header_encode(hdr, (enum record_type)raw_type, flags, id, iov, npieces);
	if (s->v2)
		record_header_bind(hdr, s->seq);
	assert_int_equal(pad, record_encoded_size(total) - RECORD_HEADER_SIZE - total);
	assert_true(pad < 8);
	s->rec[s->n++] = (struct expect_rec){raw_type, flags, id, s->len, total};
	seg_put(s, hdr, sizeof(hdr));
	for (unsigned i = 0; i < npieces; i++) {
		seg_put(s, iov[i].iov_base, iov[i].iov_len);
		free(iov[i].iov_base);
	}
	seg_put(s, zeros, pad);
	assert_int_equal(s->len % 8, 0);
	free(data);
}

static void seg_add(struct seg *s, unsigned raw_type, uint64_t id, size_t len)
{
	seg_add_pieces(s, raw_type, (uint8_t)id, id, &len, 1);
}

/* The end of record i (header + payload, without padding). */
static size_t rec_end(const struct seg *s, unsigned i)
{
	return s->rec[i].offset + RECORD_HEADER_SIZE + s->rec[i].length;
}

static void check_record(const struct record *r, const struct expect_rec *e, const uint8_t *buf)
{
	enum record_type t =
	    e->raw_type >= 1 && e->raw_type <= 3 ? (enum record_type)e->raw_type : RECORD_UNKNOWN;
	assert_int_equal(r->error, RECORD_OK);
	assert_int_equal(r->offset, e->offset);
	assert_int_equal(r->type, t);
	assert_int_equal(r->raw_type, e->raw_type);
	assert_int_equal(r->flags, e->flags);
	assert_true(r->queue_id == e->queue_id);
	assert_int_equal(r->length, e->length);
	assert_ptr_equal(r->payload, buf + e->offset + RECORD_HEADER_SIZE);
	for (size_t j = 0; j < e->length; j++)
		if (r->payload[j] != pattern(e->queue_id, j))
			fail_msg("payload octet %zu of record at %zu differs", j, e->offset);
}

/* Decodes records [from, to) of s, in order, from the reader's offset. */
static void expect_records(struct record_reader *rr, const struct seg *s, const uint8_t *buf,
                           size_t len, unsigned from, unsigned to)
{
	struct record r;

	for (unsigned i = from; i < to; i++) {
		int rc = record_next(rr, buf, len, &r);
		if (rc != 1)
			fail_msg("record %u at %zu: rc %d (%s at %llu)", i, s->rec[i].offset, rc,
			         record_error_str(r.error), (unsigned long long)r.offset);
		check_record(&r, &s->rec[i], buf);
	}
}

static void expect_end(struct record_reader *rr, const uint8_t *buf, size_t len, uint64_t offset)
{
	struct record r;

	assert_int_equal(record_next(rr, buf, len, &r), 0);
	assert_int_equal(r.offset, offset);
	assert_int_equal(r.error, RECORD_OK);
	assert_null(r.payload);
	/* 0 again: the reader did not move */
	assert_int_equal(record_next(rr, buf, len, &r), 0);
	assert_int_equal(record_reader_offset(rr), offset);
}

/* ---- table 1: round trips ---- */

struct roundtrip_case {
	const char *name;
	unsigned raw_type;
	uint8_t flags;
	uint64_t queue_id;
	size_t pieces[6];
	unsigned npieces;
};

static const struct roundtrip_case roundtrip_cases[] = {
    {"empty_no_iovec", RECORD_MESSAGE, 0, 1, {0}, 0},
    {"empty_iovec", RECORD_MESSAGE, 0, 2, {0}, 1},
    {"len_1", RECORD_MESSAGE, 0, 3, {1}, 1},
    {"len_7", RECORD_MESSAGE, 0, 4, {7}, 1},
    {"len_8", RECORD_MESSAGE, 0, 5, {8}, 1},
    {"len_9", RECORD_MESSAGE, 0, 6, {9}, 1},
    {"len_15", RECORD_STATE, 1, 7, {15}, 1},
    {"len_16", RECORD_STATE, 2, 8, {16}, 1},
    {"len_17", RECORD_STATE, 3, 9, {17}, 1},
    {"large_1MiB_plus_5", RECORD_MESSAGE, 0, 10, {(1u << 20) + 5}, 1},
    {"multi_iovec_small", RECORD_MESSAGE, 0, 11, {3, 0, 5, 8, 1}, 5},
    {"multi_iovec_large", RECORD_MESSAGE, 0, 12, {100000, 7, 65536, 0, 1, 4095}, 6},
    {"pad_type", RECORD_PAD, 0, 0, {40}, 1},
    {"unknown_type_4", 4, 0, 13, {12}, 1},
    {"unknown_type_77", 77, 0x80, 14, {3}, 1},
    {"unknown_type_255", 255, 0xff, 15, {0}, 0},
    {"all_ones_id_and_flags", RECORD_MESSAGE, 0xff, UINT64_MAX, {10}, 1},
};

static void test_roundtrip(void **state)
{
	const struct roundtrip_case *c = *state;
	struct record_reader rr;
	struct seg s;

	seg_init(&s);
	seg_add(&s, RECORD_STATE, 100, 3); /* before: the case starts at a later offset */
	seg_add_pieces(&s, c->raw_type, c->flags, c->queue_id, c->pieces, c->npieces);
	seg_add(&s, RECORD_STATE, 101, 5); /* after: the padding was skipped right */
	/* the padding is zero octets */
	for (size_t j = rec_end(&s, 1); j < s.rec[2].offset; j++)
		assert_int_equal(s.buf[j], 0);
	assert_int_equal(s.rec[2].offset - s.rec[1].offset, record_encoded_size(s.rec[1].length));

	record_reader_init(&rr, SEGMENT_HEADER_SIZE);
	assert_int_equal(record_reader_offset(&rr), SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, s.buf, s.len, 0, 3);
	expect_end(&rr, s.buf, s.len, s.len);

	/* the header bytes as specified: magic, crc over length..queue_id and the payload */
	const uint8_t *h = s.buf + s.rec[1].offset;
	assert_memory_equal(h, "PSHR", 4);
	uint32_t crc = crc32c_sw(0, h + 8, 16 + s.rec[1].length);
	assert_int_equal(h[4] | h[5] << 8 | h[6] << 16 | (uint32_t)h[7] << 24, crc);
	assert_int_equal(h[14] | h[15], 0); /* reserved */
	seg_free(&s);
}

/* ---- table 2: sizes ---- */

struct size_case {
	const char *name;
	size_t len, size;
};

static const struct size_case size_cases[] = {
    {"size_0", 0, 24},
    {"size_1", 1, 32},
    {"size_7", 7, 32},
    {"size_8", 8, 32},
    {"size_9", 9, 40},
    {"size_16", 16, 40},
    {"size_1000", 1000, 1024},
    {"size_max", RECORD_MAX_PAYLOAD, RECORD_MAX_PAYLOAD + 24},
    {"size_max_minus_1", RECORD_MAX_PAYLOAD - 1, RECORD_MAX_PAYLOAD + 24},
};

static void test_size(void **state)
{
	const struct size_case *c = *state;

	assert_int_equal(record_encoded_size(c->len), c->size);
}

/* ---- table 3: damage, hand-made ---- */

/*
 * The base segment: records 0 (5 octets), 1 (16), 2 (13, 3 of padding). A case
 * damages it, then expects records [0, good) to decode, then -1 with `err` at
 * record `good`'s offset (or `at` when not 0), then resync to record
 * `resync_to` (-1: none) and the records after it, then 0. err RECORD_OK:
 * all records [0, good) decode and then 0 at `end` (0: the segment's end).
 */
struct damage_case {
	const char *name;
	void (*damage)(struct seg *s);
	unsigned good;
	enum record_error err;
	uint64_t need; /* RECORD_E_TORN */
	int resync_to;
	size_t at;
	size_t end;
};

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Rewrites the crc of record i after a deliberate change of its header or payload. */
static void fix_crc(struct seg *s, unsigned i)
{
	uint8_t *h = s->buf + s->rec[i].offset;
	uint32_t len = h[8] | h[9] << 8 | h[10] << 16 | (uint32_t)h[11] << 24;
	put32(h + 4, crc32c(0, h + 8, 16 + len));
}

static void d_none(struct seg *s)
{
}

static void d_magic_1(struct seg *s)
{
	s->buf[s->rec[1].offset] ^= 0x01;
}

static void d_payload_1(struct seg *s)
{
	s->buf[s->rec[1].offset + RECORD_HEADER_SIZE + 7] ^= 0x40;
}

static void d_crc_field_1(struct seg *s)
{
	s->buf[s->rec[1].offset + 5] ^= 0x10;
}

static void d_queue_id_1(struct seg *s)
{
	s->buf[s->rec[1].offset + 20] ^= 0x02;
}

static void d_length_over_max_1(struct seg *s)
{
	put32(s->buf + s->rec[1].offset + 8, RECORD_MAX_PAYLOAD + 1);
}

static void d_length_all_ones_1(struct seg *s)
{
	put32(s->buf + s->rec[1].offset + 8, UINT32_MAX);
}

static void d_length_max_2(struct seg *s)
{
	put32(s->buf + s->rec[2].offset + 8, RECORD_MAX_PAYLOAD);
}

static void d_length_grown_0(struct seg *s)
{
	put32(s->buf + s->rec[0].offset + 8, 1u << 20);
}

static void d_length_shrunk_0(struct seg *s)
{
	put32(s->buf + s->rec[0].offset + 8, 4);
}

static void d_cut_header_2(struct seg *s)
{
	s->len = s->rec[2].offset + 10;
}

static void d_cut_after_magic_2(struct seg *s)
{
	s->len = s->rec[2].offset + 4;
}

static void d_cut_payload_2(struct seg *s)
{
	s->len = s->rec[2].offset + RECORD_HEADER_SIZE + 1;
}

static void d_cut_padding_2(struct seg *s)
{
	s->len = rec_end(s, 2);
}

static void d_cut_padding_partly_2(struct seg *s)
{
	s->len = rec_end(s, 2) + 1;
}

static void d_zero_tail_100(struct seg *s)
{
	static const uint8_t z[100];
	seg_put(s, z, sizeof(z));
}

static void d_zero_tail_5(struct seg *s)
{
	static const uint8_t z[5];
	seg_put(s, z, sizeof(z));
}

static void d_zero_tail_4096(struct seg *s)
{
	static const uint8_t z[4096];
	seg_put(s, z, sizeof(z));
}

static void d_zero_hole_1(struct seg *s)
{
	memset(s->buf + s->rec[1].offset, 0, s->rec[2].offset - s->rec[1].offset);
}

static void d_zeros_then_one_octet(struct seg *s)
{
	static const uint8_t z[100];
	seg_put(s, z, sizeof(z));
	seg_put(s, "x", 1);
}

static void d_garbage_tail_short(struct seg *s)
{
	seg_put(s, "hello", 5);
}

static void d_garbage_tail_long(struct seg *s)
{
	uint8_t g[40];
	memset(g, 0xaa, sizeof(g));
	seg_put(s, g, sizeof(g));
}

static void d_reserved_set_1(struct seg *s)
{
	s->buf[s->rec[1].offset + 14] = 0x5a;
	fix_crc(s, 1);
}

static void d_type_0_1(struct seg *s)
{
	s->buf[s->rec[1].offset + 12] = 0;
	fix_crc(s, 1);
	s->rec[1].raw_type = 0;
}

static void d_padding_garbage_2(struct seg *s)
{
	memset(s->buf + rec_end(s, 2), 0xee, s->len - rec_end(s, 2));
}

static void d_zero_crc_1(struct seg *s)
{
	/* a crc field of zeros */
	put32(s->buf + s->rec[1].offset + 4, 0);
}

static const struct damage_case damage_cases[] = {
    {"intact", d_none, 3, RECORD_OK, 0, -1, 0, 0},
    {"bad_magic_middle", d_magic_1, 1, RECORD_E_MAGIC, 0, 2, 0, 0},
    {"bad_payload_middle", d_payload_1, 1, RECORD_E_CHECKSUM, 0, 2, 0, 0},
    {"bad_crc_field_middle", d_crc_field_1, 1, RECORD_E_CHECKSUM, 0, 2, 0, 0},
    {"bad_queue_id_middle", d_queue_id_1, 1, RECORD_E_CHECKSUM, 0, 2, 0, 0},
    {"zero_crc_middle", d_zero_crc_1, 1, RECORD_E_CHECKSUM, 0, 2, 0, 0},
    {"length_over_max", d_length_over_max_1, 1, RECORD_E_LENGTH, 0, 2, 0, 0},
    {"length_all_ones", d_length_all_ones_1, 1, RECORD_E_LENGTH, 0, 2, 0, 0},
    {"length_max_last_is_torn", d_length_max_2, 2, RECORD_E_TORN, RECORD_MAX_PAYLOAD + 24, -1, 0,
     0},
    {"length_grown_first_torn_then_resync", d_length_grown_0, 0, RECORD_E_TORN, (1u << 20) + 24, 1,
     0, 0},
    {"length_shrunk_first", d_length_shrunk_0, 0, RECORD_E_CHECKSUM, 0, 1, 0, 0},
    {"cut_in_header", d_cut_header_2, 2, RECORD_E_TORN, 24, -1, 0, 0},
    {"cut_after_magic", d_cut_after_magic_2, 2, RECORD_E_TORN, 24, -1, 0, 0},
    {"cut_in_payload", d_cut_payload_2, 2, RECORD_E_TORN, 24 + 13, -1, 0, 0},
    {"cut_whole_padding", d_cut_padding_2, 3, RECORD_OK, 0, -1, 0, 0},
    {"cut_part_of_padding", d_cut_padding_partly_2, 3, RECORD_OK, 0, -1, 0, 0},
    {"zero_tail_100", d_zero_tail_100, 3, RECORD_OK, 0, -1, 0, 1},
    {"zero_tail_5", d_zero_tail_5, 3, RECORD_OK, 0, -1, 0, 1},
    {"zero_tail_4096", d_zero_tail_4096, 3, RECORD_OK, 0, -1, 0, 1},
    {"zero_hole_then_record", d_zero_hole_1, 1, RECORD_E_MAGIC, 0, 2, 0, 0},
    {"zeros_then_one_octet", d_zeros_then_one_octet, 3, RECORD_E_MAGIC, 0, -1, 1, 0},
    {"garbage_tail_short", d_garbage_tail_short, 3, RECORD_E_TORN, 24, -1, 1, 0},
    {"garbage_tail_long", d_garbage_tail_long, 3, RECORD_E_MAGIC, 0, -1, 1, 0},
    {"reserved_nonzero_ignored", d_reserved_set_1, 3, RECORD_OK, 0, -1, 0, 0},
    {"type_0_is_unknown", d_type_0_1, 3, RECORD_OK, 0, -1, 0, 0},
    {"padding_not_looked_at", d_padding_garbage_2, 3, RECORD_OK, 0, -1, 0, 0},
};

static void test_damage(void **state)
{
	const struct damage_case *c = *state;
	struct record_reader rr;
	struct record r;
	struct seg s;

	seg_init(&s);
	seg_add(&s, RECORD_MESSAGE, 1, 5);
	seg_add(&s, RECORD_STATE, 2, 16);
	seg_add(&s, RECORD_MESSAGE, 3, 13);
	size_t intact_end = s.len;
	c->damage(&s);
	/* decode from an exact-size copy, so ASan catches any read past the end */
	uint8_t *buf = malloc(s.len ? s.len : 1);
	assert_non_null(buf);
	memcpy(buf, s.buf, s.len);

	record_reader_init(&rr, SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, buf, s.len, 0, c->good);
	if (c->err == RECORD_OK) {
		/* "end" 1: the records' end, before the appended zeros */
		expect_end(&rr, buf, s.len,
		           c->end ? intact_end
		                  : s.rec[2].offset + record_encoded_size(s.rec[2].length));
		free(buf);
		seg_free(&s);
		return;
	}
	size_t at = c->at ? intact_end : s.rec[c->good].offset;
	assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
	assert_int_equal(r.error, c->err);
	assert_int_equal(r.offset, at);
	assert_int_equal(r.need, c->err == RECORD_E_TORN ? c->need : 0);
	assert_null(r.payload);
	assert_string_not_equal(record_error_str(r.error), record_error_str(RECORD_OK));
	/* -1 again: the reader did not move */
	assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
	assert_int_equal(record_reader_offset(&rr), at);
	uint64_t q = record_resync(&rr, buf, s.len);
	if (c->resync_to < 0) {
		assert_int_equal(q, 0);
		assert_int_equal(record_reader_offset(&rr), at);
	} else {
		assert_int_equal(q, s.rec[c->resync_to].offset);
		expect_records(&rr, &s, buf, s.len, (unsigned)c->resync_to, s.n);
		expect_end(&rr, buf, s.len, s.len);
	}
	free(buf);
	seg_free(&s);
}

/* ---- table 4: segment headers ---- */

struct seghdr_case {
	const char *name;
	size_t len;
	int patch_at; /* -1: none */
	uint8_t patch;
	int rc;
	uint32_t version;
	bool filled; /* the magic matched: the fields are read */
};

static const struct seghdr_case seghdr_cases[] = {
    {"seghdr_roundtrip", 32, -1, 0, 0, 2, true},
    {"seghdr_longer_buffer", 100, -1, 0, 0, 2, true},
    {"seghdr_short", 31, -1, 0, -1, 0, false},
    {"seghdr_empty", 0, -1, 0, -1, 0, false},
    {"seghdr_bad_magic_first", 32, 0, 'X', -1, 0, false},
    {"seghdr_bad_magic_last", 32, 7, '2', -1, 0, false},
    {"seghdr_version_1", 32, 8, 1, 0, 1, true},
    {"seghdr_version_3", 32, 8, 3, -1, 3, true},
    {"seghdr_version_0", 32, 8, 0, -1, 0, true},
};

static void test_seghdr(void **state)
{
	const struct seghdr_case *c = *state;
	uint8_t buf[100];
	struct segment_header h;

	memset(buf, 0x77, sizeof(buf));
	segment_header_encode(buf, 0xdeadbeefu, 0x0102030405060708ull, 1700000000u);
	assert_memory_equal(buf, "PHSPOOL1\x02\x00\x00\x00\xef\xbe\xad\xde", 16);
	if (c->patch_at >= 0)
		buf[c->patch_at] = c->patch;
	uint8_t *copy = malloc(c->len ? c->len : 1);
	assert_non_null(copy);
	memcpy(copy, buf, c->len);
	assert_int_equal(segment_header_decode(copy, c->len, &h), c->rc);
	assert_int_equal(h.version, c->version);
	if (c->filled) {
		assert_int_equal(h.worker, 0xdeadbeefu);
		assert_true(h.seq == 0x0102030405060708ull);
		assert_true(h.created == 1700000000u);
	} else {
		assert_int_equal(h.worker, 0);
		assert_true(h.seq == 0 && h.created == 0);
	}
	free(copy);
}

/* ---- fixed tests: every cut, every length, every bit ---- */

/* ~20 records of varied sizes and types. */
#define V2_SEQ 0x123456789abull /* the version-2 runs' segment */

static void build_big_v(struct seg *s, bool v2)
{
	static const size_t lens[] = {0,  1,  7, 8, 9,   23, 24, 25, 100, 3,
	                              64, 65, 0, 2, 300, 17, 5,  16, 31,  4};
	if (v2)
		seg_init_v2(s, V2_SEQ);
	else
		seg_init(s);
	for (size_t i = 0; i < ARRAY_SIZE(lens); i++) {
		unsigned type = i % 7 == 6 ? 200 : i % 5 == 4 ? RECORD_PAD : 1 + (unsigned)(i % 2);
		seg_add(s, type, 1000 + i, lens[i]);
	}
}

/* How many records lie wholly (header + payload) before cut. */
static unsigned whole_before(const struct seg *s, size_t cut)
{
	unsigned k = 0;

	while (k < s->n && rec_end(s, k) <= cut)
		k++;
	return k;
}

/* Cut at every offset: the whole records decode, then 0 or a torn record, never another. */
static void truncate_everywhere(bool v2)
{
	struct record_reader rr;
	struct record r;
	struct seg s;

	build_big_v(&s, v2);
	for (size_t cut = 0; cut <= s.len; cut++) {
		uint8_t *buf = malloc(cut ? cut : 1);
		assert_non_null(buf);
		memcpy(buf, s.buf, cut);
		struct segment_header h;
		assert_int_equal(segment_header_decode(buf, cut, &h), cut >= 32 ? 0 : -1);

		unsigned k = whole_before(&s, cut);
		seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
		expect_records(&rr, &s, buf, cut, 0, k);
		int rc = record_next(&rr, buf, cut, &r);
		/* where the next record would start: after record k-1's padding */
		size_t next = k ? s.rec[k - 1].offset + record_encoded_size(s.rec[k - 1].length)
		                : SEGMENT_HEADER_SIZE;
		if (cut <= next) {
			assert_int_equal(rc, 0);
			assert_int_equal(r.offset, next);
		} else {
			if (rc != -1 || r.error != RECORD_E_TORN)
				fail_msg("cut %zu: rc %d error %s", cut, rc,
				         record_error_str(r.error));
			assert_int_equal(r.offset, next);
			assert_int_equal(r.need, cut - next < RECORD_HEADER_SIZE
			                             ? RECORD_HEADER_SIZE
			                             : RECORD_HEADER_SIZE + s.rec[k].length);
			assert_int_equal(record_resync(&rr, buf, cut), 0);
		}
		free(buf);
	}
	seg_free(&s);
}

/* One reader over a "file" that grows one octet at a time: each record exactly once, in order. */
static void growing_buffer(bool v2)
{
	struct record_reader rr;
	struct record r;
	struct seg s;
	unsigned got = 0;

	build_big_v(&s, v2);
	seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
	for (size_t len = 0; len <= s.len; len++) {
		int rc;
		while ((rc = record_next(&rr, s.buf, len, &r)) == 1) {
			assert_true(got < s.n);
			assert_true(rec_end(&s, got) <= len);
			check_record(&r, &s.rec[got], s.buf);
			got++;
		}
		assert_true(rc == 0 || (rc == -1 && r.error == RECORD_E_TORN));
		assert_int_equal(got, whole_before(&s, len));
	}
	assert_int_equal(got, s.n);
	seg_free(&s);
}

/* Zero tails of every length 1..80 after the records: a clean end where the records end. */
static void zero_tails(bool v2)
{
	struct record_reader rr;
	struct seg s;

	build_big_v(&s, v2);
	size_t end = s.len;
	for (size_t z = 1; z <= 80; z++) {
		uint8_t zero = 0;
		seg_put(&s, &zero, 1);
		seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
		expect_records(&rr, &s, s.buf, s.len, 0, s.n);
		expect_end(&rr, s.buf, s.len, end);
	}
	seg_free(&s);
}

/*
 * Every single-bit flip of a small segment: in a record's header or payload
 * it is reported at that record and resync recovers every later record; in
 * padding it changes nothing; in the segment header only magic and version
 * are detected.
 */
static void bitflip_everywhere(bool v2)
{
	struct record_reader rr;
	struct record r;
	struct seg s;
	unsigned counts[6] = {0};

	if (v2)
		seg_init_v2(&s, V2_SEQ);
	else
		seg_init(&s);
	seg_add(&s, RECORD_MESSAGE, 1, 5);
	seg_add(&s, RECORD_STATE, 2, 0);
	seg_add(&s, RECORD_MESSAGE, 3, 16);
	seg_add(&s, 9, 4, 3);
	seg_add(&s, RECORD_STATE, 5, 9);
	uint8_t *buf = malloc(s.len);
	assert_non_null(buf);

	for (size_t bit = 0; bit < s.len * 8; bit++) {
		size_t at = bit / 8;
		memcpy(buf, s.buf, s.len);
		buf[at] ^= (uint8_t)(1u << (bit % 8));

		struct segment_header h;
		int hrc = segment_header_decode(buf, s.len, &h);
		assert_int_equal(hrc, at < 12 ? -1 : 0);

		/* which record holds the flipped octet (s.n: none, or padding) */
		unsigned hit = s.n;
		for (unsigned i = 0; i < s.n; i++)
			if (at >= s.rec[i].offset && at < rec_end(&s, i))
				hit = i;
		seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
		if (hit == s.n) {
			expect_records(&rr, &s, buf, s.len, 0, s.n);
			expect_end(&rr, buf, s.len, s.len);
			continue;
		}
		expect_records(&rr, &s, buf, s.len, 0, hit);
		assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
		assert_int_equal(r.offset, s.rec[hit].offset);
		if (r.error != RECORD_E_CHECKSUM && r.error != RECORD_E_MAGIC &&
		    r.error != RECORD_E_LENGTH && r.error != RECORD_E_TORN &&
		    !(v2 && r.error == RECORD_E_TAG))
			fail_msg("bit %zu: error %d", bit, r.error);
		counts[r.error]++;
		uint64_t q = record_resync(&rr, buf, s.len);
		if (hit + 1 < s.n) {
			assert_int_equal(q, s.rec[hit + 1].offset);
			expect_records(&rr, &s, buf, s.len, hit + 1, s.n);
			expect_end(&rr, buf, s.len, s.len);
		} else {
			assert_int_equal(q, 0);
		}
	}
	/* every kind of report came up */
	assert_true(counts[RECORD_E_CHECKSUM] > 0 && counts[RECORD_E_MAGIC] > 0 &&
	            counts[RECORD_E_LENGTH] > 0 && counts[RECORD_E_TORN] > 0);
	assert_true(v2 ? counts[RECORD_E_TAG] > 0 : counts[RECORD_E_TAG] == 0);
	free(buf);
	seg_free(&s);
}

static void test_truncate_everywhere(void **state)
{
	truncate_everywhere(false);
}

static void test_truncate_everywhere_v2(void **state)
{
	truncate_everywhere(true);
}

static void test_growing_buffer(void **state)
{
	growing_buffer(false);
}

static void test_growing_buffer_v2(void **state)
{
	growing_buffer(true);
}

static void test_zero_tails(void **state)
{
	zero_tails(false);
}

static void test_zero_tails_v2(void **state)
{
	zero_tails(true);
}

static void test_bitflip_everywhere(void **state)
{
	bitflip_everywhere(false);
}

/* The same in version 2, the reader made from the intact header (the spool checks its seq). */
static void test_bitflip_everywhere_v2(void **state)
{
	bitflip_everywhere(true);
}

static void build_big(struct seg *s)
{
	build_big_v(s, false);
}

/* A reader started past a damaged region, and a segment without its header (offset 0). */
static void test_reader_offsets(void **state)
{
	struct record_reader rr;
	struct seg s;

	build_big(&s);
	record_reader_init(&rr, s.rec[5].offset);
	expect_records(&rr, &s, s.buf, s.len, 5, s.n);
	expect_end(&rr, s.buf, s.len, s.len);
	/* records only, from offset 0 */
	size_t first = s.rec[0].offset;
	record_reader_init(&rr, 0);
	for (unsigned i = 0; i < s.n; i++)
		s.rec[i].offset -= first;
	expect_records(&rr, &s, s.buf + first, s.len - first, 0, s.n);
	expect_end(&rr, s.buf + first, s.len - first, s.len - first);
	/* nothing at all */
	record_reader_init(&rr, 0);
	expect_end(&rr, NULL, 0, 0);
	seg_free(&s);
}

static void test_error_strings(void **state)
{
	static const enum record_error all[] = {RECORD_OK,      RECORD_E_TORN,   RECORD_E_CHECKSUM,
	                                        RECORD_E_MAGIC, RECORD_E_LENGTH, RECORD_E_TAG};
	for (size_t i = 0; i < ARRAY_SIZE(all); i++) {
		assert_non_null(record_error_str(all[i]));
		assert_true(record_error_str(all[i])[0] != '\0');
		for (size_t j = 0; j < i; j++)
			assert_string_not_equal(record_error_str(all[i]), record_error_str(all[j]));
	}
	assert_non_null(record_error_str((enum record_error)99));
}

/* ---- version 2: records bound to the segment, recycled files ---- */

static uint32_t le32_at(const uint8_t *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The salt as record.h and docs/spool.md give it, independently of record.c. */
static uint32_t salt_of(uint64_t seq)
{
	return (uint32_t)seq ^ (uint32_t)(seq >> 32) ^ 0x32565350u;
}

static void test_v2_roundtrip(void **state)
{
	struct record_reader rr;
	struct record r;
	struct seg s;

	build_big_v(&s, true);
	seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, s.buf, s.len, 0, s.n);
	expect_end(&rr, s.buf, s.len, s.len);
	/* the header octets as specified: tag, crc over a zero tag xor the salt */
	assert_int_equal(record_tag(V2_SEQ), (uint16_t)V2_SEQ);
	for (unsigned i = 0; i < s.n; i++) {
		const uint8_t *h = s.buf + s.rec[i].offset;
		uint8_t copy[RECORD_HEADER_SIZE];
		assert_int_equal(h[14] | h[15] << 8, (uint16_t)V2_SEQ);
		memcpy(copy, h, sizeof(copy));
		copy[14] = copy[15] = 0;
		uint32_t crc = crc32c_sw(0, copy + 8, 16);
		crc = crc32c_sw(crc, h + RECORD_HEADER_SIZE, s.rec[i].length);
		assert_int_equal(le32_at(h + 4), crc ^ salt_of(V2_SEQ));
	}
	/* a version-1 reader finds no record in it */
	record_reader_init(&rr, SEGMENT_HEADER_SIZE);
	assert_int_equal(record_next(&rr, s.buf, s.len, &r), -1);
	assert_int_equal(r.error, RECORD_E_CHECKSUM);
	assert_int_equal(record_resync(&rr, s.buf, s.len), 0);
	/* nor does one for another seq: to it they are an earlier incarnation's, the end */
	struct segment_header other = {SEGMENT_VERSION, 3, V2_SEQ + 1, 0};
	record_reader_init_segment(&rr, &other, SEGMENT_HEADER_SIZE);
	expect_end(&rr, s.buf, s.len, SEGMENT_HEADER_SIZE);
	assert_int_equal(record_resync(&rr, s.buf, s.len), 0);
	/* a version-1 header makes a version-1 reader */
	other.version = SEGMENT_VERSION_V1;
	record_reader_init_segment(&rr, &other, SEGMENT_HEADER_SIZE);
	assert_int_equal(record_next(&rr, s.buf, s.len, &r), -1);
	seg_free(&s);
}

/*
 * A recycled file: nw's header and records written over the start of old
 * (an earlier incarnation), then `zeros` zero octets (direct I/O's padding),
 * the rest old's. The reader takes nw's records, then returns want_rc at
 * nw's end: 0 (and resync finds nothing) or -1 with want_err.
 */
static void overlay_read(const struct seg *old, const struct seg *nw, size_t zeros, int want_rc,
                         enum record_error want_err)
{
	struct record_reader rr;
	struct record r;
	size_t len = MAX(old->len, nw->len + zeros);
	uint8_t *buf = calloc(1, len);

	assert_non_null(buf);
	memcpy(buf, old->buf, old->len);
	memcpy(buf, nw->buf, nw->len);
	memset(buf + nw->len, 0, zeros);
	seg_reader(&rr, nw, SEGMENT_HEADER_SIZE);
	expect_records(&rr, nw, buf, len, 0, nw->n);
	int rc = record_next(&rr, buf, len, &r);
	if (rc != want_rc)
		fail_msg("new end %zu (+%zu zeros) over an old segment of %zu: rc %d (%s)", nw->len,
		         zeros, old->len, rc, record_error_str(r.error));
	assert_int_equal(r.offset, nw->len);
	if (rc == 0) {
		assert_int_equal(r.error, RECORD_OK);
		assert_int_equal(record_resync(&rr, buf, len), 0);
	} else {
		assert_int_equal(r.error, want_err);
	}
	free(buf);
}

/* nw: a version-2 segment of seq whose first k records have the sizes and types of old's. */
static void mimic(struct seg *nw, const struct seg *old, unsigned k, uint64_t seq)
{
	seg_init_v2(nw, seq);
	for (unsigned i = 0; i < k; i++)
		seg_add(nw, old->rec[i].raw_type, 700 + i, old->rec[i].length);
}

/* Stale data of an older incarnation after the end: a clean end, wherever the end falls. */
static void test_v2_recycled_tails(void **state)
{
	static const size_t lens[] = {5, 40, 3, 17, 0, 64, 200, 9, 1000};
	static const size_t zeros[] = {0, 8, 16, 24, 100, 4096};
	struct seg old[2], nw;

	build_big_v(&old[0], false); /* version 1, seq 42 */
	build_big_v(&old[1], true);  /* version 2, seq V2_SEQ */
	for (unsigned o = 0; o < 2; o++) {
		/* other sizes: the end falls in the middle of old records */
		for (unsigned k = 0; k <= ARRAY_SIZE(lens); k++) {
			seg_init_v2(&nw, V2_SEQ + 4);
			for (unsigned i = 0; i < k; i++)
				seg_add(&nw, RECORD_MESSAGE, 500 + i, lens[i]);
			for (size_t z = 0; z < ARRAY_SIZE(zeros); z++)
				overlay_read(&old[o], &nw, zeros[z], 0, RECORD_OK);
			seg_free(&nw);
		}
		/* the same sizes: the end falls on an old record's header (magic right, tag not) */
		for (unsigned k = 0; k <= old[o].n; k++) {
			mimic(&nw, &old[o], k, V2_SEQ + 4);
			overlay_read(&old[o], &nw, 0, 0, RECORD_OK);
			seg_free(&nw);
		}
	}
	seg_free(&old[0]);
	seg_free(&old[1]);
}

/*
 * The tag is only 16 bits: an older incarnation whose tag is the same (its
 * seq 65536 before, or version 1's 0 when the new seq's low bits are 0) is
 * told apart by the crc only, and reads as damage, not as records or as the
 * end. The spool does not reuse a file whose last incarnation has the tag.
 */
static void test_v2_tag_collision_is_damage(void **state)
{
	struct seg old[2], nw;

	build_big_v(&old[0], false);
	build_big_v(&old[1], true);
	const uint64_t seqs[2] = {0x7ull << 16, V2_SEQ + 65536};
	for (unsigned o = 0; o < 2; o++) {
		assert_int_equal(record_tag(seqs[o]), o ? record_tag(V2_SEQ) : 0);
		for (unsigned k = 0; k < old[o].n; k++) {
			mimic(&nw, &old[o], k, seqs[o]);
			overlay_read(&old[o], &nw, 0, -1, RECORD_E_CHECKSUM);
			seg_free(&nw);
		}
	}
	seg_free(&old[0]);
	seg_free(&old[1]);
}

/* Damage in a version-2 segment is reported as in version 1, also in its last record. */
static void test_v2_damage(void **state)
{
	static const size_t lens[] = {5, 16, 13, 30};
	struct record_reader rr;
	struct record r;
	struct seg s, o;

	seg_init_v2(&s, 77);
	for (unsigned i = 0; i < ARRAY_SIZE(lens); i++)
		seg_add(&s, i == 1 ? RECORD_STATE : RECORD_MESSAGE, 10 + i, lens[i]);
	uint8_t *buf = malloc(s.len + 8);
	assert_non_null(buf);
	struct {
		size_t at;     /* octet flipped (0x04) */
		unsigned good; /* records before the problem */
		enum record_error err;
	} flips[] = {
	    {s.rec[3].offset, 3, RECORD_E_MAGIC},         /* the last one's magic */
	    {s.rec[3].offset + 15, 3, RECORD_E_TAG},      /* its tag */
	    {s.rec[3].offset + 30, 3, RECORD_E_CHECKSUM}, /* its payload: tag right, crc wrong */
	    {s.rec[3].offset + 9, 3, RECORD_E_TORN},      /* its length */
	    {s.rec[1].offset + 2, 1, RECORD_E_MAGIC},     /* a magic in the middle */
	    {s.rec[1].offset + 14, 1, RECORD_E_TAG},      /* a tag in the middle */
	};
	for (size_t f = 0; f < ARRAY_SIZE(flips); f++) {
		memcpy(buf, s.buf, s.len);
		buf[flips[f].at] ^= 0x04;
		seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
		expect_records(&rr, &s, buf, s.len, 0, flips[f].good);
		assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
		assert_int_equal(r.error, flips[f].err);
		assert_int_equal(r.offset, s.rec[flips[f].good].offset);
		if (flips[f].good + 1 < s.n) {
			assert_int_equal(record_resync(&rr, buf, s.len),
			                 s.rec[flips[f].good + 1].offset);
			expect_records(&rr, &s, buf, s.len, flips[f].good + 1, s.n);
			expect_end(&rr, buf, s.len, s.len);
		} else {
			assert_int_equal(record_resync(&rr, buf, s.len), 0);
		}
	}
	/* an older incarnation's record (same size) in the middle: damage, then ours again */
	seg_init_v2(&o, 76);
	seg_add(&o, RECORD_STATE, 11, lens[1]);
	memcpy(buf, s.buf, s.len);
	memcpy(buf + s.rec[1].offset, o.buf + o.rec[0].offset, record_encoded_size(lens[1]));
	seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, buf, s.len, 0, 1);
	assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
	assert_int_equal(r.error, RECORD_E_TAG);
	assert_int_equal(record_resync(&rr, buf, s.len), s.rec[2].offset);
	expect_records(&rr, &s, buf, s.len, 2, s.n);
	expect_end(&rr, buf, s.len, s.len);
	/* a zeroed hole, then ours: damage as in version 1 */
	memcpy(buf, s.buf, s.len);
	memset(buf + s.rec[1].offset, 0, s.rec[2].offset - s.rec[1].offset);
	seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, buf, s.len, 0, 1);
	assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
	assert_int_equal(r.error, RECORD_E_MAGIC);
	assert_int_equal(record_resync(&rr, buf, s.len), s.rec[2].offset);
	/* a short tail: not ours is the end, a header of ours cut short is torn */
	memcpy(buf, s.buf, s.len);
	memcpy(buf + s.len, "hello", 5);
	seg_reader(&rr, &s, SEGMENT_HEADER_SIZE);
	expect_records(&rr, &s, buf, s.len + 5, 0, s.n);
	expect_end(&rr, buf, s.len + 5, s.len);
	memcpy(buf + s.len, "PSHR", 4);
	assert_int_equal(record_next(&rr, buf, s.len + 4, &r), -1);
	assert_int_equal(r.error, RECORD_E_TORN);
	free(buf);
	seg_free(&o);
	seg_free(&s);
}

/* record_header_bind: the tag, and a salt that differs for every seq below 2^32 tried. */
static void test_v2_bind(void **state)
{
	static const uint64_t seqs[] = {
	    0, 1, 2, 4096, 65535, 65536, 0xffffffffull, 1ull << 32, 0x32565350ull};
	uint8_t payload[3] = {1, 2, 3};
	struct iovec iov = {payload, sizeof(payload)};

	for (size_t i = 0; i < ARRAY_SIZE(seqs); i++) {
		uint8_t h[RECORD_HEADER_SIZE], b[RECORD_HEADER_SIZE];
		record_header_encode(h, RECORD_MESSAGE, 0, 9, &iov, 1);
		memcpy(b, h, sizeof(b));
		record_header_bind(b, seqs[i]);
		assert_int_equal(b[14] | b[15] << 8, (uint16_t)seqs[i]);
		assert_int_equal(le32_at(b + 4), le32_at(h + 4) ^ salt_of(seqs[i]));
		assert_memory_equal(b + 8, h + 8, 6); /* the rest as encoded */
		assert_memory_equal(b + 16, h + 16, 8);
		/* never version 1's crc, except at the one seq whose salt is 0 */
		if (seqs[i] != 0x32565350ull)
			assert_true(le32_at(b + 4) != le32_at(h + 4));
	}
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
	    cmocka_unit_test(test_truncate_everywhere),
	    cmocka_unit_test(test_growing_buffer),
	    cmocka_unit_test(test_zero_tails),
	    cmocka_unit_test(test_bitflip_everywhere),
	    cmocka_unit_test(test_reader_offsets),
	    cmocka_unit_test(test_error_strings),
	    cmocka_unit_test(test_truncate_everywhere_v2),
	    cmocka_unit_test(test_growing_buffer_v2),
	    cmocka_unit_test(test_zero_tails_v2),
	    cmocka_unit_test(test_bitflip_everywhere_v2),
	    cmocka_unit_test(test_v2_roundtrip),
	    cmocka_unit_test(test_v2_recycled_tails),
	    cmocka_unit_test(test_v2_tag_collision_is_damage),
	    cmocka_unit_test(test_v2_damage),
	    cmocka_unit_test(test_v2_bind),
	};
	struct CMUnitTest tests[ARRAY_SIZE(roundtrip_cases) + ARRAY_SIZE(size_cases) +
	                        ARRAY_SIZE(damage_cases) + ARRAY_SIZE(seghdr_cases) +
	                        ARRAY_SIZE(fixed)];
	size_t k = 0;

	ADD_CASES(roundtrip_cases, test_roundtrip);
	ADD_CASES(size_cases, test_size);
	ADD_CASES(damage_cases, test_damage);
	ADD_CASES(seghdr_cases, test_seghdr);
	for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
		tests[k++] = fixed[i];
	return _cmocka_run_group_tests("record", tests, k, NULL, NULL);
}
