/*
 * libFuzzer target for queue/record: the input is a segment file.
 *
 * It is decoded three ways, each from an exact-size heap copy so ASan catches
 * any read past the end:
 *   1. as given, with record_resync after every problem;
 *   2. "repaired": every header along the chain of records from the start
 *      gets a correct crc (so mutations reach the paths behind the checksum),
 *      and that chain must decode exactly, in order, before anything else;
 *   3. the input as the payload of one record built by the encoder from
 *      iovec pieces, which must decode back to the same octets.
 * A version-2 segment (its header says so) is read with records bound to its
 * seq; anything else with version-1 records.
 * Invariants: every record returned lies within the buffer, right after its
 * header, and its checksum verifies (recomputed with the table code, and in
 * version 2 with the salt and tag computed here from the format's text);
 * offsets strictly increase; in version 1, 0 comes only before nothing but
 * zero octets; in version 2, only where no record of the segment starts, at
 * that offset or any later one; resync moves forward in 8-octet steps onto a
 * record that then decodes. A state
 * record's payload that decodes (queue/state.h) encodes back to the same 16
 * octets (every octet is a field: state, flags, attempts, recipient, until).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"
#include "queue/crc32c.h"
#include "queue/record.h"
#include "queue/state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
	return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* Version 2's binding, from record.h's text: NULL for version 1. */
struct bind {
	uint32_t salt;
	uint16_t tag;
};

static struct bind bind_of(uint64_t seq)
{
	return (struct bind){(uint32_t)seq ^ (uint32_t)(seq >> 32) ^ 0x32565350u, (uint16_t)seq};
}

/* The crc a record with header h and len payload octets should carry. */
static uint32_t want_crc(const uint8_t *h, uint32_t len, const struct bind *b)
{
	if (!b)
		return crc32c_sw(0, h + 8, 16 + (size_t)len);
	static const uint8_t zero_tag[2];
	uint32_t crc = crc32c_sw(0, h + 8, 6);
	crc = crc32c_sw(crc, zero_tag, 2);
	crc = crc32c_sw(crc, h + 16, 8 + (size_t)len);
	return crc ^ b->salt;
}

/* Whether a valid record (of the binding b) starts at p. */
static bool valid_at(const uint8_t *buf, size_t size, uint64_t p, const struct bind *b)
{
	if (p > size || size - p < RECORD_HEADER_SIZE)
		return false;
	const uint8_t *h = buf + p;
	uint32_t len = le32(h + 8);
	if (le32(h) != RECORD_MAGIC || len > RECORD_MAX_PAYLOAD ||
	    len > size - p - RECORD_HEADER_SIZE)
		return false;
	if (b && (uint16_t)(h[14] | h[15] << 8) != b->tag)
		return false;
	return want_crc(h, len, b) == le32(h + 4);
}

static void check_record(const uint8_t *buf, size_t size, const struct record *r,
                         const struct bind *b)
{
	if (r->error != RECORD_OK || r->need != 0)
		abort();
	if (r->offset > size || size - r->offset < RECORD_HEADER_SIZE ||
	    size - r->offset - RECORD_HEADER_SIZE < r->length || r->length > RECORD_MAX_PAYLOAD)
		abort();
	const uint8_t *h = buf + r->offset;
	if (r->payload != h + RECORD_HEADER_SIZE)
		abort();
	if (le32(h) != RECORD_MAGIC || le32(h + 8) != r->length)
		abort();
	if (want_crc(h, (uint32_t)r->length, b) != le32(h + 4))
		abort();
	if (b && (uint16_t)(h[14] | h[15] << 8) != b->tag)
		abort();
	if (r->raw_type != h[12] || r->flags != h[13] || r->queue_id != le64(h + 16))
		abort();
	if (r->type !=
	    (r->raw_type >= 1 && r->raw_type <= 3 ? (enum record_type)r->raw_type : RECORD_UNKNOWN))
		abort();
	struct state_rec s;
	if (r->type == RECORD_STATE && state_payload_decode_rec(r->payload, r->length, &s) == 0) {
		uint8_t again[STATE_PAYLOAD_SIZE];
		state_payload_encode_rec(again, &s);
		if (memcmp(again, r->payload, STATE_PAYLOAD_SIZE) != 0)
			abort();
	}
}

/*
 * Reads buf from start to the end with resync. If prefix is not NULL, the
 * first nprefix records must be at those offsets, before any problem.
 */
static void run_reader(const uint8_t *buf, size_t size, uint64_t start,
                       const struct segment_header *sh, const uint64_t *prefix, size_t nprefix)
{
	struct record_reader rr;
	struct record r;
	uint64_t last = 0; /* offset of the last record or problem reported + 1 */
	size_t nrec = 0;
	struct bind bd;
	const struct bind *b = NULL;

	if (sh) {
		record_reader_init_segment(&rr, sh, start);
		if (sh->version >= 2) {
			bd = bind_of(sh->seq);
			b = &bd;
		}
	} else {
		record_reader_init(&rr, start);
	}
	for (size_t turns = 0;; turns++) {
		if (turns > size / 8 + 4)
			abort(); /* no progress */
		uint64_t cur = record_reader_offset(&rr);
		int rc = record_next(&rr, buf, size, &r);
		if (r.offset != cur || r.offset + 1 <= last)
			abort();
		last = r.offset + 1;
		if (rc == 1) {
			check_record(buf, size, &r, b);
			if (record_reader_offset(&rr) != cur + record_encoded_size(r.length))
				abort();
			if (nrec < nprefix && prefix[nrec] != r.offset)
				abort();
			nrec++;
			continue;
		}
		if (nrec < nprefix)
			abort(); /* the repaired chain did not decode whole */
		if (rc == 0) {
			if (r.error != RECORD_OK || r.payload || record_reader_offset(&rr) != cur)
				abort();
			if (!b) {
				for (uint64_t i = cur; i < size; i++)
					if (buf[i])
						abort();
				return;
			}
			/* not ours here (magic and tag), and nothing of ours later */
			if (cur < size && size - cur >= RECORD_HEADER_SIZE &&
			    le32(buf + cur) == RECORD_MAGIC &&
			    (uint16_t)(buf[cur + 14] | buf[cur + 15] << 8) == b->tag)
				abort();
			for (uint64_t q = cur; q < size; q += 8)
				if (valid_at(buf, size, q, b))
					abort();
			return;
		}
		if (rc != -1 || r.payload || record_reader_offset(&rr) != cur)
			abort();
		switch (r.error) {
		case RECORD_E_TORN:
			if (r.need < RECORD_HEADER_SIZE || cur + r.need <= size)
				abort();
			break;
		case RECORD_E_TAG:
			if (!b)
				abort();
			/* fall through */
		case RECORD_E_CHECKSUM:
		case RECORD_E_MAGIC:
		case RECORD_E_LENGTH:
			if (r.need != 0)
				abort();
			break;
		default:
			abort();
		}
		uint64_t q = record_resync(&rr, buf, size);
		if (!q) {
			if (record_reader_offset(&rr) != cur)
				abort();
			return;
		}
		if (q <= cur || (q - cur) % 8 != 0 || q + RECORD_HEADER_SIZE > size ||
		    record_reader_offset(&rr) != q)
			abort();
		/* resync promises a record there */
		struct record_reader probe = rr;
		if (record_next(&probe, buf, size, &r) != 1 || r.offset != q)
			abort();
	}
}

/*
 * Pass 2: fixes the crc (and in version 2 the tag) of every header along the
 * chain; returns the chain's offsets.
 */
static size_t repair(uint8_t *buf, size_t size, uint64_t start, const struct segment_header *sh,
                     uint64_t *chain)
{
	struct bind bd;
	const struct bind *b = NULL;
	if (sh && sh->version >= 2) {
		bd = bind_of(sh->seq);
		b = &bd;
	}
	size_t n = 0;
	bool contiguous = true;
	uint64_t p = start;

	while (p < size && size - p >= RECORD_HEADER_SIZE) {
		uint8_t *h = buf + p;
		uint32_t len = le32(h + 8);
		if (le32(h) != RECORD_MAGIC || len > RECORD_MAX_PAYLOAD ||
		    len > size - p - RECORD_HEADER_SIZE) {
			contiguous = false;
			p += 8;
			continue;
		}
		if (b) {
			h[14] = (uint8_t)b->tag;
			h[15] = (uint8_t)(b->tag >> 8);
		}
		uint32_t crc = want_crc(h, len, b);
		for (int i = 0; i < 4; i++)
			h[4 + i] = (uint8_t)(crc >> (8 * i));
		if (contiguous)
			chain[n++] = p;
		p += record_encoded_size(len);
	}
	return n;
}

/* Pass 3: the input as one record's payload, in pieces cut by a seed from its first octet. */
static void roundtrip(const uint8_t *data, size_t size)
{
	struct iovec iov[16];
	unsigned n = 0;
	uint32_t seed = size ? data[0] * 2654435761u + 1 : 1;
	size_t off = 0;

	while (off < size && n < ARRAY_SIZE(iov) - 1) {
		seed = seed * 1103515245u + 12345u;
		size_t k = (seed >> 16) % (size - off + 1);
		iov[n++] = (struct iovec){(void *)(data + off), k};
		off += k;
	}
	iov[n++] = (struct iovec){(void *)(data + off), size - off};

	uint8_t type = size ? (data[size - 1] ? data[size - 1] : 1) : RECORD_MESSAGE;
	uint64_t id = seed * 0x9e3779b97f4a7c15ull;
	size_t total = record_encoded_size(size);
	uint8_t *buf = malloc(total);
	if (!buf)
		abort();
	size_t pad = record_header_encode(buf, (enum record_type)type, (uint8_t)seed, id, iov, n);
	if (RECORD_HEADER_SIZE + size + pad != total)
		abort();
	if (size)
		memcpy(buf + RECORD_HEADER_SIZE, data, size);
	memset(buf + RECORD_HEADER_SIZE + size, 0, pad);
	if (crc32c_iov(0, iov, n) != crc32c_sw(0, data, size))
		abort();

	struct record_reader rr;
	struct record r;
	record_reader_init(&rr, 0);
	if (record_next(&rr, buf, total, &r) != 1)
		abort();
	check_record(buf, total, &r, NULL);
	if (r.offset != 0 || r.length != size || r.raw_type != type || r.queue_id != id ||
	    r.flags != (uint8_t)seed || (size && memcmp(r.payload, data, size) != 0))
		abort();
	if (record_next(&rr, buf, total, &r) != 0 || r.offset != total)
		abort();

	/* bound to a segment: read there, and not in a segment of another seq */
	uint64_t seq = id >> 7;
	struct segment_header sh = {SEGMENT_VERSION, 0, seq, 0};
	struct bind b = bind_of(seq);
	record_header_bind(buf, seq);
	record_reader_init_segment(&rr, &sh, 0);
	if (record_next(&rr, buf, total, &r) != 1)
		abort();
	check_record(buf, total, &r, &b);
	if (r.length != size || r.queue_id != id || (size && memcmp(r.payload, data, size) != 0))
		abort();
	sh.seq = seq + 1;
	record_reader_init_segment(&rr, &sh, 0);
	if (record_next(&rr, buf, total, &r) != 0)
		abort();
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t *buf = malloc(size ? size : 1);
	uint64_t *chain = malloc((size / RECORD_HEADER_SIZE + 1) * sizeof(*chain));
	struct segment_header sh;

	if (!buf || !chain)
		abort();
	if (size)
		memcpy(buf, data, size);
	if (crc32c(0, buf, size) != crc32c_sw(0, buf, size))
		abort();
	/* a segment from its header; anything else as bare version-1 records from offset 0 */
	bool seg = segment_header_decode(buf, size, &sh) == 0;
	uint64_t start = seg ? SEGMENT_HEADER_SIZE : 0;

	run_reader(buf, size, start, seg ? &sh : NULL, NULL, 0);
	size_t n = repair(buf, size, start, seg ? &sh : NULL, chain);
	run_reader(buf, size, start, seg ? &sh : NULL, chain, n);
	roundtrip(data, size);

	free(chain);
	free(buf);
	return 0;
}
