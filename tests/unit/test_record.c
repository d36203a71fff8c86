/*
 * Unit tests of queue/record: tables of named cases. Segments are built with
 * the encoder (header + payload slices + zero padding, as the spool writes
 * them), then decoded whole, damaged case by case, cut at every offset,
 * grown one octet at a time, and bit-flipped at every bit.
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

static void seg_init(struct seg *s)
{
	uint8_t hdr[SEGMENT_HEADER_SIZE];

	memset(s, 0, sizeof(*s));
	segment_header_encode(hdr, 3, 42, 1700000000);
	seg_put(s, hdr, sizeof(hdr));
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
    {"seghdr_roundtrip", 32, -1, 0, 0, 1, true},
    {"seghdr_longer_buffer", 100, -1, 0, 0, 1, true},
    {"seghdr_short", 31, -1, 0, -1, 0, false},
    {"seghdr_empty", 0, -1, 0, -1, 0, false},
    {"seghdr_bad_magic_first", 32, 0, 'X', -1, 0, false},
    {"seghdr_bad_magic_last", 32, 7, '2', -1, 0, false},
    {"seghdr_version_2", 32, 8, 2, -1, 2, true},
    {"seghdr_version_0", 32, 8, 0, -1, 0, true},
};

static void test_seghdr(void **state)
{
	const struct seghdr_case *c = *state;
	uint8_t buf[100];
	struct segment_header h;

	memset(buf, 0x77, sizeof(buf));
	segment_header_encode(buf, 0xdeadbeefu, 0x0102030405060708ull, 1700000000u);
	assert_memory_equal(buf, "PHSPOOL1\x01\x00\x00\x00\xef\xbe\xad\xde", 16);
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
static void build_big(struct seg *s)
{
	static const size_t lens[] = {0,  1,  7, 8, 9,   23, 24, 25, 100, 3,
	                              64, 65, 0, 2, 300, 17, 5,  16, 31,  4};
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
static void test_truncate_everywhere(void **state)
{
	struct record_reader rr;
	struct record r;
	struct seg s;

	build_big(&s);
	for (size_t cut = 0; cut <= s.len; cut++) {
		uint8_t *buf = malloc(cut ? cut : 1);
		assert_non_null(buf);
		memcpy(buf, s.buf, cut);
		struct segment_header h;
		assert_int_equal(segment_header_decode(buf, cut, &h), cut >= 32 ? 0 : -1);

		unsigned k = whole_before(&s, cut);
		record_reader_init(&rr, SEGMENT_HEADER_SIZE);
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
static void test_growing_buffer(void **state)
{
	struct record_reader rr;
	struct record r;
	struct seg s;
	unsigned got = 0;

	build_big(&s);
	record_reader_init(&rr, SEGMENT_HEADER_SIZE);
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
static void test_zero_tails(void **state)
{
	struct record_reader rr;
	struct seg s;

	build_big(&s);
	size_t end = s.len;
	for (size_t z = 1; z <= 80; z++) {
		uint8_t zero = 0;
		seg_put(&s, &zero, 1);
		record_reader_init(&rr, SEGMENT_HEADER_SIZE);
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
static void test_bitflip_everywhere(void **state)
{
	struct record_reader rr;
	struct record r;
	struct seg s;
	unsigned counts[5] = {0};

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
		record_reader_init(&rr, SEGMENT_HEADER_SIZE);
		if (hit == s.n) {
			expect_records(&rr, &s, buf, s.len, 0, s.n);
			expect_end(&rr, buf, s.len, s.len);
			continue;
		}
		expect_records(&rr, &s, buf, s.len, 0, hit);
		assert_int_equal(record_next(&rr, buf, s.len, &r), -1);
		assert_int_equal(r.offset, s.rec[hit].offset);
		if (r.error != RECORD_E_CHECKSUM && r.error != RECORD_E_MAGIC &&
		    r.error != RECORD_E_LENGTH && r.error != RECORD_E_TORN)
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
	free(buf);
	seg_free(&s);
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
	static const enum record_error all[] = {RECORD_OK, RECORD_E_TORN, RECORD_E_CHECKSUM,
	                                        RECORD_E_MAGIC, RECORD_E_LENGTH};
	for (size_t i = 0; i < ARRAY_SIZE(all); i++) {
		assert_non_null(record_error_str(all[i]));
		assert_true(record_error_str(all[i])[0] != '\0');
		for (size_t j = 0; j < i; j++)
			assert_string_not_equal(record_error_str(all[i]), record_error_str(all[j]));
	}
	assert_non_null(record_error_str((enum record_error)99));
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
	    cmocka_unit_test(test_truncate_everywhere), cmocka_unit_test(test_growing_buffer),
	    cmocka_unit_test(test_zero_tails),          cmocka_unit_test(test_bitflip_everywhere),
	    cmocka_unit_test(test_reader_offsets),      cmocka_unit_test(test_error_strings),
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
