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
 * Invariants: every record returned lies within the buffer, right after its
 * header, and its checksum verifies (recomputed with the table code); offsets
 * strictly increase; 0 comes only before nothing but zero octets; resync
 * moves forward in 8-octet steps onto a record that then decodes. A state
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

static void check_record(const uint8_t *buf, size_t size, const struct record *r)
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
	if (crc32c_sw(0, h + 8, 16 + r->length) != le32(h + 4))
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
static void run_reader(const uint8_t *buf, size_t size, uint64_t start, const uint64_t *prefix,
                       size_t nprefix)
{
	struct record_reader rr;
	struct record r;
	uint64_t last = 0; /* offset of the last record or problem reported + 1 */
	size_t nrec = 0;

	record_reader_init(&rr, start);
	for (size_t turns = 0;; turns++) {
		if (turns > size / 8 + 4)
			abort(); /* no progress */
		uint64_t cur = record_reader_offset(&rr);
		int rc = record_next(&rr, buf, size, &r);
		if (r.offset != cur || r.offset + 1 <= last)
			abort();
		last = r.offset + 1;
		if (rc == 1) {
			check_record(buf, size, &r);
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
			for (uint64_t i = cur; i < size; i++)
				if (buf[i])
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

/* Pass 2: fixes the crc of every header along the chain; returns the chain's offsets. */
static size_t repair(uint8_t *buf, size_t size, uint64_t start, uint64_t *chain)
{
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
		uint32_t crc = crc32c(0, h + 8, 16 + (size_t)len);
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
	check_record(buf, total, &r);
	if (r.offset != 0 || r.length != size || r.raw_type != type || r.queue_id != id ||
	    r.flags != (uint8_t)seed || (size && memcmp(r.payload, data, size) != 0))
		abort();
	if (record_next(&rr, buf, total, &r) != 0 || r.offset != total)
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
	/* a segment from its header; anything else as bare records from offset 0 */
	uint64_t start = segment_header_decode(buf, size, &sh) == 0 ? SEGMENT_HEADER_SIZE : 0;

	run_reader(buf, size, start, NULL, 0);
	size_t n = repair(buf, size, start, chain);
	run_reader(buf, size, start, chain, n);
	roundtrip(data, size);

	free(chain);
	free(buf);
	return 0;
}
