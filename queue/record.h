/*
 * record: the spool's on-disk framing. Pure functions over caller memory: no
 * I/O, no allocation, no state beyond a reader's offset.
 *
 * A segment file is a 32-octet segment header followed by records:
 *
 *   segment header  magic "PHSPOOL1" (8) | version u32 (1 or 2) | worker u32 |
 *                   seq u64 | created u64 (unix seconds)
 *   record header   magic u32 (RECORD_MAGIC, "PSHR") | crc u32 | length u32 |
 *                   type u8 | flags u8 | tag u16 | queue_id u64
 *   payload         length octets (at most RECORD_MAX_PAYLOAD)
 *   padding         zero octets up to the next multiple of 8
 *
 * Integers are little-endian. Records start at multiples of 8 from the
 * segment's start, so resynchronisation after damage steps 8 octets at a
 * time. The padding is neither counted in length nor checksummed, and the
 * reader skips it without looking at it.
 *
 * Version 1 (still read, no longer written): the tag field is "reserved",
 * written 0, checksummed but otherwise ignored; crc is CRC-32C
 * (queue/crc32c.h) over the 16 header octets after it (length .. queue_id)
 * followed by the payload.
 *
 * Version 2 (written since segment files are recycled, see docs/spool.md):
 * every record is bound to the segment's seq, so that records left in a
 * recycled file by an earlier use of it can never be read as records of the
 * segment it is now:
 *   tag  = the seq's low 16 bits (record_tag)
 *   crc  = CRC-32C over the same octets as in version 1, with the tag's two
 *          octets taken as zero, xor record_salt(seq) = (low 32 bits of seq)
 *          xor (high 32 bits) xor 0x32565350 ("PSV2")
 * The salt is an xor so that a header sealed before its segment is known
 * (the spool checksums a message once, when its data ends) is bound to it
 * later in constant time (record_header_bind). Salts of different seqs below
 * 2^32 differ, so a record of another incarnation never verifies. A record
 * is valid when its magic, tag, length and crc all are. The tag only tells a
 * record of an earlier incarnation (not ours: the data ends before it) from a
 * damaged one of ours (tag right, crc wrong: damage, as in version 1).
 *
 * Where the data of a version-2 segment ends, whatever follows (zeros, older
 * records, the middle of an older payload) is not ours; the reader reports
 * the clean end there unless a record of ours turns up later in the buffer
 * (or the header would verify but for its magic or tag): that is damage, as
 * in version 1. See record_next.
 *
 * Types 1-3 are defined below; the others are reserved: a reader returns them
 * as RECORD_UNKNOWN (valid, to be skipped) so that newer writers do not break
 * older readers.
 *
 * Thread-safety: none needed; a reader belongs to its caller.
 */
#ifndef POSTHASTE_QUEUE_RECORD_H
#define POSTHASTE_QUEUE_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define SEGMENT_HEADER_SIZE 32
#define SEGMENT_MAGIC       "PHSPOOL1" /* 8 octets, no NUL on disk */
#define SEGMENT_VERSION     2u         /* written; version 1 is read too */
#define SEGMENT_VERSION_V1  1u

#define RECORD_HEADER_SIZE 24
#define RECORD_ALIGN       8
#define RECORD_MAGIC       0x52485350u /* "PSHR" as little-endian octets */
#define RECORD_MAX_PAYLOAD (1u << 30)  /* 1 GiB; a header claiming more is damaged */

enum record_type {
	RECORD_UNKNOWN = 0, /* reader only: a reserved type octet (see raw_type); skip it */
	RECORD_MESSAGE = 1, /* payload: envelope + body (opaque here) */
	RECORD_STATE = 2,   /* payload: a state change of queue_id (opaque here) */
	RECORD_PAD = 3,     /* filler; payload ignored */
};

enum record_error {
	RECORD_OK = 0,
	RECORD_E_TORN,     /* a header or payload runs past the end of the data: a write cut
	                      short by a crash, or a damaged length (record_resync tells) */
	RECORD_E_CHECKSUM, /* the crc does not match the header and payload */
	RECORD_E_MAGIC,    /* no record magic where a header should start */
	RECORD_E_LENGTH,   /* length over RECORD_MAX_PAYLOAD */
	RECORD_E_TAG,      /* version 2: a tag not the segment's (a record of an earlier use
	                      of the file, or a damaged tag) where records of ours follow */
};

struct segment_header {
	uint32_t version;
	uint32_t worker;  /* index of the worker that wrote the segment */
	uint64_t seq;     /* the segment's sequence number for that worker */
	uint64_t created; /* unix seconds */
};

/* Writes a segment header of the current version (SEGMENT_VERSION). */
void segment_header_encode(uint8_t out[SEGMENT_HEADER_SIZE], uint32_t worker, uint64_t seq,
                           uint64_t created);

/*
 * Reads the segment header at buf (len octets available). Returns 0 with *out
 * filled, or -1 when buf is not a segment header of version 1 or 2: shorter
 * than SEGMENT_HEADER_SIZE or wrong magic (*out zeroed), or another version
 * (*out filled, so out->version says which). The fields after the version
 * carry no checksum: a damaged seq or time is not detected here (the spool
 * checks a version-2 seq against the file's name).
 */
int segment_header_decode(const uint8_t *buf, size_t len, struct segment_header *out);

/* Octets a record with a payload of len octets takes: header + payload + padding. */
size_t record_encoded_size(size_t len);

/*
 * Fills a record header for a payload given as n iovecs (read, not copied,
 * so the caller can writev the header and the same slices). Returns the
 * number of zero octets (0-7) the caller must write after the payload.
 * type is 1-255 (a reserved value writes a record older readers skip); the
 * payload totals at most RECORD_MAX_PAYLOAD. Either broken panics.
 * The header is a version-1 one (tag 0, crc unsalted): for a version-2
 * segment, record_header_bind it once the segment's seq is known.
 */
size_t record_header_encode(uint8_t out[RECORD_HEADER_SIZE], enum record_type type, uint8_t flags,
                            uint64_t queue_id, const struct iovec *payload, unsigned n);

/* Version 2: a record's tag in the segment of sequence seq. */
uint16_t record_tag(uint64_t seq);

/*
 * Version 2: binds a header just made by record_header_encode to the segment
 * of sequence seq (sets the tag, xors the salt into the crc). Exactly once: a
 * second call, or one on a header read from a file, gives a bad record.
 */
void record_header_bind(uint8_t hdr[RECORD_HEADER_SIZE], uint64_t seq);

/* One decoded record, or where and why decoding stopped. */
struct record {
	enum record_type type; /* RECORD_UNKNOWN for a reserved type octet */
	uint8_t raw_type;      /* the type octet as written */
	uint8_t flags;         /* the writer's flags, opaque here */
	uint64_t queue_id;
	const uint8_t *payload;  /* points into the caller's buffer */
	size_t length;           /* payload octets */
	uint64_t offset;         /* segment offset of the record's header (or of the problem) */
	enum record_error error; /* after -1; RECORD_OK otherwise */
	uint64_t need;           /* RECORD_E_TORN: octets from offset that would complete the
	                            record (RECORD_HEADER_SIZE if the header itself is cut) */
};

struct record_reader {
	/* private: callers use the functions below */
	uint64_t offset; /* segment offset of the next record */
	uint32_t salt;   /* version 2: record_salt of the segment's seq */
	uint16_t tag;    /* version 2: record_tag of it */
	bool v2;         /* records bound to the segment (version 2) */
};

/*
 * Starts reading version-1 records (unbound) at segment offset `offset`:
 * SEGMENT_HEADER_SIZE for a whole segment. For a segment read from a file,
 * use record_reader_init_segment: a version-2 segment's records do not
 * verify here.
 */
void record_reader_init(struct record_reader *r, uint64_t offset);

/* Starts reading the records of the segment whose header decoded to h, at `offset`. */
void record_reader_init_segment(struct record_reader *r, const struct segment_header *h,
                                uint64_t offset);

/*
 * Segment offset of the next record: after record_next returned 0, the end of
 * the last good record including its padding (where an appender would go on;
 * it can be up to 7 octets past len when the last padding was cut off).
 */
uint64_t record_reader_offset(const struct record_reader *r);

/*
 * Decodes the record at the reader's offset. buf holds the segment from its
 * first octet (offset 0; typically a read-only mapping of the file) and len
 * octets of it are available. A call reads the one record, except where a
 * version-2 segment's data seems to end: it then looks through the rest of
 * buf for a record of ours (as record_resync does) to tell the end from
 * damage. A caller following a file being written may call again with a
 * larger len, or after the octets changed (a recycled file is overwritten in
 * place), after a 0 or a RECORD_E_TORN.
 *
 * Returns
 *   1  a valid record in *out: its checksum verified and it lies wholly within
 *      buf; the reader moves past it and its padding (the padding itself may
 *      be cut off at the very end of buf)
 *   0  clean end of data: nothing left, or nothing but zero octets (a block
 *      the file system allocated but the crash kept from being written);
 *      in a version-2 segment also anything that is not a record of this
 *      segment (a record of an earlier use of the file, its remains, direct
 *      I/O's zero padding) when no record of this segment follows in buf and
 *      it would not verify but for its magic or tag. out->offset is where
 *      the data ended. The reader does not move.
 *  -1  a problem at out->offset, out->error says which (out->need too for
 *      RECORD_E_TORN). The reader does not move; record_resync skips ahead.
 * In every case *out is overwritten; fields that do not apply are 0/NULL.
 */
int record_next(struct record_reader *r, const uint8_t *buf, size_t len, struct record *out);

/*
 * After record_next returned -1: scans forward from the damaged record's
 * offset, 8 octets at a time, for the next header whose magic, length (within
 * buf), checksum (and in version 2 tag) all verify. Returns its offset (> 0) with the reader moved
 * there, or 0 when there is none (the reader does not move): a real torn tail
 * ends this way. It cannot tell a forged record inside a damaged record's
 * payload from a real one.
 */
uint64_t record_resync(struct record_reader *r, const uint8_t *buf, size_t len);

/* A short text for an error ("bad checksum"), for logs. */
const char *record_error_str(enum record_error err);

#endif
