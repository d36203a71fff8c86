/*
 * smtp_reply_parser: the zero-copy incremental parser of SMTP replies (the
 * client side: the bench sender and the relay's delivery client).
 *
 * It is fed whatever bytes arrived (any split, down to one byte at a time) and
 * yields one event per reply line, in order, with a `last` flag on the line
 * that completes the reply ("250 ..." after any number of "250-..." lines).
 * A caller that only wants whole replies acts on `last` lines; an EHLO client
 * passes every line of the 250 reply to smtp_reply_caps_learn.
 *
 * Grammar (RFC 5321 4.2): Reply-code [ ("-" / SP) textstring ] CRLF, where
 * Reply-code is %x32-35 %x30-35 %x30-39. A bare LF also ends a line (the CR
 * before it is dropped when present). Every line of a multiline reply must
 * carry the same code. An enhanced status code (RFC 3463/2034,
 * class.subject.detail, 1-3 digits each, followed by SP or the end of line)
 * at the start of the text is recognised when its class equals the first
 * digit of the reply code; otherwise it is ordinary text (as Postfix does).
 *
 * Zero copy: a line that lies whole inside one input is yielded as slices of
 * that input. Only a line that straddles inputs is copied, into a buffer of
 * limits.max_line octets owned by the parser. Nothing of earlier lines is
 * kept: a consumer that needs the text of a line copies it before the next
 * call. The parser never allocates after smtp_reply_parser_init.
 *
 * Bounds: a line longer than max_line octets (CRLF included) or a reply of
 * more than max_lines lines is a protocol error, detected as soon as it is
 * certain (an over-long line is refused before its LF arrives).
 *
 * Errors are sticky: after -1 every call returns -1 with the same reason
 * until smtp_reply_parser_reset (the caller normally drops the connection:
 * the reply stream can no longer be trusted to stay in step).
 *
 * Thread-safety: a parser belongs to one connection, used by one thread.
 */
#ifndef POSTHASTE_MTA_SMTP_REPLY_PARSER_H
#define POSTHASTE_MTA_SMTP_REPLY_PARSER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct smtp_reply_limits {
	size_t max_line;    /* octets of one line including CRLF; >= 8 */
	unsigned max_lines; /* lines in one reply; >= 1 */
};

/* Defaults: a 2048-octet line (as Postfix's line_length_limit), 100 lines per reply. */
void smtp_reply_limits_default(struct smtp_reply_limits *lim);

/* An enhanced status code; klass == 0 when the line has none. */
struct smtp_reply_esc {
	uint8_t klass;    /* 2, 4 or 5: equal to the reply code's first digit */
	uint16_t subject; /* 0..999 */
	uint16_t detail;  /* 0..999 */
};

/*
 * One reply line. All slices point into the caller's input or into the
 * parser's buffer: valid until the next call to smtp_reply_parser_next or
 * until the input is released, whichever comes first. No slice is
 * NUL-terminated; an empty slice has len 0 and a non-NULL pointer.
 */
struct smtp_reply_line {
	unsigned code;    /* 200..559, the same on every line of one reply */
	unsigned index;   /* 0 for the first line of the reply */
	bool last;        /* this line completes the reply */
	const char *line; /* the whole line from the code on, without CR LF */
	size_t line_len;
	const char *text; /* after "250-" / "250 " (empty for a bare "250") */
	size_t text_len;
	struct smtp_reply_esc esc; /* enhanced code at the start of text, if any */
	const char *msg;           /* text after the enhanced code and its spaces (else = text) */
	size_t msg_len;
};

struct smtp_reply_parser {
	/* private: callers use the functions below */
	struct smtp_reply_limits lim;
	unsigned code;  /* code of the reply in progress (0 between replies) */
	unsigned lines; /* lines of the reply in progress */
	size_t hold;    /* octets of a partial line held in buf */
	bool failed;
	char *buf; /* lim.max_line octets, owned */
	char error[128];
};

/*
 * Prepares p for a new connection, copying *lim (NULL: the defaults).
 * Returns 0, -EINVAL for limits below the minimums, or -ENOMEM.
 */
int smtp_reply_parser_init(struct smtp_reply_parser *p, const struct smtp_reply_limits *lim);
/* Frees what init allocated. Accepts a zeroed or already deinitialised parser. */
void smtp_reply_parser_deinit(struct smtp_reply_parser *p);
/* Drops any partial line or reply and a sticky error (e.g. a new connection, after STARTTLS). */
void smtp_reply_parser_reset(struct smtp_reply_parser *p);
/* True between replies: no line of a reply and no partial line is held. */
bool smtp_reply_parser_idle(const struct smtp_reply_parser *p);

/*
 * Consumes input from `in` (len octets, len may be 0) until one line is
 * complete.
 *   1: *line_r is filled; line_r->last says whether the reply is complete.
 *   0: all of `in` was consumed without completing a line (feed more).
 *  -1: protocol error; *error_r (when error_r is not NULL) points to a
 *      readable NUL-terminated reason owned by the parser (valid until reset
 *      or deinit). Sticky.
 * *used_r is always set: the octets of `in` consumed (0 on -1); on 1, call
 * again with in + *used_r for the rest (a 1 may come with *used_r == len).
 */
int smtp_reply_parser_next(struct smtp_reply_parser *p, const char *in, size_t len, size_t *used_r,
                           struct smtp_reply_line *line_r, const char **error_r);

/* ---- EHLO capabilities ---- */

#define SMTP_CAP_PIPELINING          0x0001u
#define SMTP_CAP_CHUNKING            0x0002u
#define SMTP_CAP_SIZE                0x0004u /* size_max holds the limit (0: none announced) */
#define SMTP_CAP_8BITMIME            0x0008u
#define SMTP_CAP_SMTPUTF8            0x0010u
#define SMTP_CAP_STARTTLS            0x0020u
#define SMTP_CAP_AUTH                0x0040u /* auth holds the mechanisms */
#define SMTP_CAP_ENHANCEDSTATUSCODES 0x0080u
#define SMTP_CAP_DSN                 0x0100u
#define SMTP_CAP_BINARYMIME          0x0200u
#define SMTP_CAP_REQUIRETLS          0x0400u

#define SMTP_AUTH_PLAIN    0x01u
#define SMTP_AUTH_LOGIN    0x02u
#define SMTP_AUTH_CRAM_MD5 0x04u
#define SMTP_AUTH_XOAUTH2  0x08u
#define SMTP_AUTH_OTHER    0x80u /* a mechanism not listed above */

struct smtp_reply_caps {
	unsigned flags;    /* SMTP_CAP_* */
	unsigned auth;     /* SMTP_AUTH_*, from "AUTH m1 m2" and the old "AUTH=m1 m2" */
	uint64_t size_max; /* "SIZE n"; 0 when absent or without a number */
};

/*
 * Learns the extension announced by one line of an EHLO reply into *caps
 * (start from a zeroed struct). Keywords are case-insensitive. Lines of a
 * reply other than 250, and the first line (the server's greeting), are
 * ignored, so every line of the EHLO reply may be passed as it comes.
 */
void smtp_reply_caps_learn(struct smtp_reply_caps *caps, const struct smtp_reply_line *line);

#endif
