/* Spool record framing: see record.h for the layout and the reader's contract. */
#include "queue/record.h"

#include <string.h>

#include "core/compiler.h"
#include "core/log.h"
#include "queue/crc32c.h"

/* Header field offsets. */
#define HDR_MAGIC    0
#define HDR_CRC      4
#define HDR_LENGTH   8 /* the checksummed part starts here */
#define HDR_TYPE     12
#define HDR_FLAGS    13
#define HDR_RESERVED 14
#define HDR_QUEUE_ID 16
#define HDR_SUMMED   (RECORD_HEADER_SIZE - HDR_LENGTH)

#define SEG_MAGIC   0
#define SEG_VERSION 8
#define SEG_WORKER  12
#define SEG_SEQ     16
#define SEG_CREATED 24

_Static_assert(sizeof(SEGMENT_MAGIC) - 1 == 8, "segment magic is 8 octets");
_Static_assert(RECORD_HEADER_SIZE % RECORD_ALIGN == 0, "headers keep records aligned");
_Static_assert(SEGMENT_HEADER_SIZE % RECORD_ALIGN == 0, "the first record is aligned");

static inline uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint16_t get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint64_t get_le64(const uint8_t *p)
{
	return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

static inline void put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static inline void put_le32(uint8_t *p, uint32_t v)
{
	put_le16(p, (uint16_t)v);
	put_le16(p + 2, (uint16_t)(v >> 16));
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
	put_le32(p, (uint32_t)v);
	put_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---- segment header ---- */

void segment_header_encode(uint8_t out[SEGMENT_HEADER_SIZE], uint32_t worker, uint64_t seq,
                           uint64_t created)
{
	memcpy(out + SEG_MAGIC, SEGMENT_MAGIC, 8);
	put_le32(out + SEG_VERSION, SEGMENT_VERSION);
	put_le32(out + SEG_WORKER, worker);
	put_le64(out + SEG_SEQ, seq);
	put_le64(out + SEG_CREATED, created);
}

int segment_header_decode(const uint8_t *buf, size_t len, struct segment_header *out)
{
	memset(out, 0, sizeof(*out));
	if (len < SEGMENT_HEADER_SIZE || memcmp(buf + SEG_MAGIC, SEGMENT_MAGIC, 8) != 0)
		return -1;
	out->version = get_le32(buf + SEG_VERSION);
	out->worker = get_le32(buf + SEG_WORKER);
	out->seq = get_le64(buf + SEG_SEQ);
	out->created = get_le64(buf + SEG_CREATED);
	return out->version == SEGMENT_VERSION || out->version == SEGMENT_VERSION_V1 ? 0 : -1;
}

/* ---- version 2: records bound to their segment ---- */

#define SALT_KEY 0x32565350u /* "PSV2": no seq below 2^32 has a salt of 0 (version 1's crc) */

static uint32_t record_salt(uint64_t seq)
{
	return (uint32_t)seq ^ (uint32_t)(seq >> 32) ^ SALT_KEY;
}

uint16_t record_tag(uint64_t seq)
{
	return (uint16_t)seq;
}

void record_header_bind(uint8_t hdr[RECORD_HEADER_SIZE], uint64_t seq)
{
	/* the crc was computed over a zero tag, which is what a version-2 crc covers */
	put_le16(hdr + HDR_RESERVED, record_tag(seq));
	put_le32(hdr + HDR_CRC, get_le32(hdr + HDR_CRC) ^ record_salt(seq));
}

/* ---- encoder ---- */

static inline size_t record_padding(size_t len)
{
	return (0u - len) & (RECORD_ALIGN - 1);
}

size_t record_encoded_size(size_t len)
{
	return RECORD_HEADER_SIZE + len + record_padding(len);
}

size_t record_header_encode(uint8_t out[RECORD_HEADER_SIZE], enum record_type type, uint8_t flags,
                            uint64_t queue_id, const struct iovec *payload, unsigned n)
{
	uint64_t len = 0;

	if (type == RECORD_UNKNOWN || (unsigned)type > 255)
		panic("record_header_encode: type %u cannot be written", (unsigned)type);
	for (unsigned i = 0; i < n; i++) {
		len += payload[i].iov_len;
		if (len > RECORD_MAX_PAYLOAD)
			panic("record_header_encode: payload over %u octets", RECORD_MAX_PAYLOAD);
	}
	put_le32(out + HDR_MAGIC, RECORD_MAGIC);
	put_le32(out + HDR_LENGTH, (uint32_t)len);
	out[HDR_TYPE] = (uint8_t)type;
	out[HDR_FLAGS] = flags;
	put_le16(out + HDR_RESERVED, 0);
	put_le64(out + HDR_QUEUE_ID, queue_id);
	uint32_t crc = crc32c(0, out + HDR_LENGTH, HDR_SUMMED);
	crc = crc32c_iov(crc, payload, n);
	put_le32(out + HDR_CRC, crc);
	return record_padding((size_t)len);
}

/* ---- reader ---- */

void record_reader_init(struct record_reader *r, uint64_t offset)
{
	*r = (struct record_reader){.offset = offset};
}

void record_reader_init_segment(struct record_reader *r, const struct segment_header *h,
                                uint64_t offset)
{
	record_reader_init(r, offset);
	if (h->version >= 2) {
		r->v2 = true;
		r->salt = record_salt(h->seq);
		r->tag = record_tag(h->seq);
	}
}

uint64_t record_reader_offset(const struct record_reader *r)
{
	return r->offset;
}

static bool all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/* The crc a header at h with `length` payload octets after it should carry, for reader r. */
static uint32_t record_crc(const struct record_reader *r, const uint8_t *h, uint32_t length)
{
	if (!r->v2)
		return crc32c(0, h + HDR_LENGTH, HDR_SUMMED + (size_t)length);
	static const uint8_t zero_tag[2];
	uint32_t crc = crc32c(0, h + HDR_LENGTH, HDR_RESERVED - HDR_LENGTH);
	crc = crc32c(crc, zero_tag, sizeof(zero_tag));
	crc = crc32c(crc, h + HDR_QUEUE_ID, RECORD_HEADER_SIZE - HDR_QUEUE_ID + (size_t)length);
	return crc ^ r->salt;
}

/* Whether the header at h (avail octets from it, at least a header) starts a valid record. */
static enum record_error record_check(const struct record_reader *r, const uint8_t *h,
                                      uint64_t avail)
{
	if (get_le32(h + HDR_MAGIC) != RECORD_MAGIC)
		return RECORD_E_MAGIC;
	if (r->v2 && get_le16(h + HDR_RESERVED) != r->tag)
		return RECORD_E_TAG;
	uint32_t length = get_le32(h + HDR_LENGTH);
	if (length > RECORD_MAX_PAYLOAD)
		return RECORD_E_LENGTH;
	if (length > avail - RECORD_HEADER_SIZE)
		return RECORD_E_TORN;
	return record_crc(r, h, length) == get_le32(h + HDR_CRC) ? RECORD_OK : RECORD_E_CHECKSUM;
}

/* The first offset from `from` on (8-aligned steps) holding a valid record; 0 for none. */
static uint64_t find_valid(const struct record_reader *r, const uint8_t *buf, size_t len,
                           uint64_t from)
{
	for (uint64_t q = from; q < len && len - q >= RECORD_HEADER_SIZE; q += RECORD_ALIGN) {
		if (get_le32(buf + q + HDR_MAGIC) != RECORD_MAGIC)
			continue;
		if (r->v2 && get_le16(buf + q + HDR_RESERVED) != r->tag)
			continue; /* an earlier incarnation's: no crc to compute */
		if (record_check(r, buf + q, len - q) == RECORD_OK)
			return q;
	}
	return 0;
}

/*
 * Version 2, at offset p where no record of ours starts (its magic or tag is
 * not ours): whether that is damage rather than the end of the data. It is
 * when the header would verify with the magic and tag taken as ours (one of
 * them damaged), or when a valid record of ours follows.
 */
static bool v2_damaged(const struct record_reader *r, const uint8_t *buf, size_t len, uint64_t p)
{
	const uint8_t *h = buf + p;
	uint32_t length = get_le32(h + HDR_LENGTH);
	if (length <= RECORD_MAX_PAYLOAD && length <= len - p - RECORD_HEADER_SIZE &&
	    record_crc(r, h, length) == get_le32(h + HDR_CRC))
		return true;
	return find_valid(r, buf, len, p + RECORD_ALIGN) != 0;
}

/* Version 2: whether a header cut short (avail octets, fewer than a header) may be one of ours. */
static bool v2_cut_ours(const struct record_reader *r, const uint8_t *h, size_t avail)
{
	uint8_t magic[4];
	put_le32(magic, RECORD_MAGIC);
	if (memcmp(h, magic, MIN(avail, sizeof(magic))) != 0)
		return false;
	return avail < HDR_RESERVED + 2 || get_le16(h + HDR_RESERVED) == r->tag;
}

int record_next(struct record_reader *r, const uint8_t *buf, size_t len, struct record *out)
{
	uint64_t p = r->offset;

	memset(out, 0, sizeof(*out));
	out->offset = p;
	if (p >= len)
		return 0;
	const uint8_t *h = buf + p;
	uint64_t avail = len - p;
	if (avail < RECORD_HEADER_SIZE) {
		if (all_zero(h, (size_t)avail))
			return 0;
		if (r->v2 && !v2_cut_ours(r, h, (size_t)avail))
			return 0; /* an earlier incarnation's, and no room for ours after it */
		out->error = RECORD_E_TORN;
		out->need = RECORD_HEADER_SIZE;
		return -1;
	}
	enum record_error err = record_check(r, h, avail);
	if (err == RECORD_E_MAGIC && get_le32(h + HDR_MAGIC) == 0 && all_zero(h, (size_t)avail))
		return 0;
	if ((err == RECORD_E_MAGIC || err == RECORD_E_TAG) && r->v2 && !v2_damaged(r, buf, len, p))
		return 0; /* not ours, and nothing of ours after it: where the data ends */
	uint32_t length = get_le32(h + HDR_LENGTH);
	if (err != RECORD_OK) {
		out->error = err;
		if (err == RECORD_E_TORN)
			out->need = RECORD_HEADER_SIZE + (uint64_t)length;
		return -1;
	}
	uint8_t raw = h[HDR_TYPE];
	out->type =
	    raw >= RECORD_MESSAGE && raw <= RECORD_PAD ? (enum record_type)raw : RECORD_UNKNOWN;
	out->raw_type = raw;
	out->flags = h[HDR_FLAGS];
	out->queue_id = get_le64(h + HDR_QUEUE_ID);
	out->payload = h + RECORD_HEADER_SIZE;
	out->length = length;
	r->offset = p + record_encoded_size(length);
	return 1;
}

uint64_t record_resync(struct record_reader *r, const uint8_t *buf, size_t len)
{
	uint64_t q = find_valid(r, buf, len, r->offset + RECORD_ALIGN);
	if (q)
		r->offset = q;
	return q;
}

const char *record_error_str(enum record_error err)
{
	switch (err) {
	case RECORD_OK:
		return "no error";
	case RECORD_E_TORN:
		return "torn record";
	case RECORD_E_CHECKSUM:
		return "bad checksum";
	case RECORD_E_MAGIC:
		return "bad record magic";
	case RECORD_E_LENGTH:
		return "impossible record length";
	case RECORD_E_TAG:
		return "wrong record tag";
	}
	return "unknown record error";
}
