/*
 * smtp_parser: the zero-copy incremental SMTP server-side parser.
 *
 * It is fed whatever bytes arrived (any split, down to one byte at a time) and
 * yields events whose slices point into the caller's input wherever possible.
 * It never allocates after smtp_parser_init, never touches a socket, and keeps
 * only the bytes of a command line that straddles two inputs (bounded by
 * limits->max_command_line).
 *
 * Modes. The parser starts in command mode. The server switches it:
 *   smtp_parser_begin_data(p)        after it sends 354
 *   smtp_parser_begin_bdat(p, size)  after it accepts "BDAT size [LAST]"
 * and it goes back to command mode by itself at the end of the data/chunk.
 * Because events are handled one at a time, in order, a pipelined DATA/BDAT
 * and its body may share one input: switch modes before calling next again.
 *
 * DATA: the end marker is exactly CRLF "." CRLF (the start of DATA counts as
 * just after a CRLF). Lines starting with "." are un-stuffed. A bare LF, a bare
 * CR, LF.LF, LF.CRLF or CRLF.LF never end the data (SMTP smuggling); such bytes
 * are passed through as body and reported in the end event's flags so the
 * server can apply its policy. The CRLF before the final "." belongs to the
 * body and is yielded at once. A "." is un-stuffed only at the start of the
 * data or after CRLF (never after a bare LF), whatever follows it: CRLF ".\n"
 * yields CRLF "\n". The only octet held back is the CR of CRLF "." CR when an
 * input ends there; if no LF follows, it is yielded from a static constant (a
 * 1-octet BODY not inside any input). max_text_line counts the un-stuffed
 * octets of a line through its LF (a bare LF ends a line for this count).
 *
 * BDAT: exactly `size` octets are yielded as body, unchanged (no un-stuffing,
 * no end-marker search), then SMTP_EV_BDAT_END.
 *
 * Command mode: a line longer than max_command_line (octets through its LF)
 * is skipped without being stored; SMTP_EV_COMMAND_TOO_LONG comes once, when
 * its LF is consumed, so replies stay in order with pipelined commands.
 *
 * Thread-safety: a parser belongs to one connection, used by one thread.
 */
#ifndef POSTHASTE_MTA_SMTP_PARSER_H
#define POSTHASTE_MTA_SMTP_PARSER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct smtp_limits {
	size_t max_command_line;   /* octets incl. CRLF; RFC 5321 4.5.3.1.4 gives 512, we allow extensions */
	size_t max_text_line;      /* DATA line octets incl. CRLF (RFC 5321 4.5.3.1.6: 1000); 0 = no limit */
	size_t max_local_part;     /* 64 */
	size_t max_domain;         /* 255 */
	size_t max_path;           /* 256, including the angle brackets */
};

/* RFC 5321 defaults, with a 2048-octet command line (as Postfix's line_length_limit). */
void smtp_limits_default(struct smtp_limits *lim);

enum smtp_mode { SMTP_MODE_COMMAND = 0, SMTP_MODE_DATA, SMTP_MODE_BDAT };

enum smtp_event_type {
	SMTP_EV_NONE = 0,
	SMTP_EV_COMMAND,          /* data/len: one command line without its CR LF (or bare LF) */
	SMTP_EV_COMMAND_TOO_LONG, /* a command line over the limit was read and discarded up to its LF */
	SMTP_EV_BODY,             /* data/len: body octets (DATA: un-stuffed, line ends kept) */
	SMTP_EV_DATA_END,         /* CRLF.CRLF seen; flags: SMTP_BODY_*; size: body octets yielded */
	SMTP_EV_BDAT_END,         /* the chunk's octets were all yielded; size: chunk octets */
};

/* Flags on SMTP_EV_COMMAND. */
#define SMTP_LINE_NUL     0x01u /* the line contains a NUL octet */
#define SMTP_LINE_BARE_LF 0x02u /* terminated by LF without CR (accepted, reported) */
#define SMTP_LINE_BARE_CR 0x04u /* contains a CR not followed by LF */

/* Flags on SMTP_EV_DATA_END (accumulated over the whole DATA body). */
#define SMTP_BODY_BARE_LF   0x01u /* an LF not preceded by CR */
#define SMTP_BODY_BARE_CR   0x02u /* a CR not followed by LF */
#define SMTP_BODY_NUL       0x04u /* a NUL octet */
#define SMTP_BODY_LONG_LINE 0x08u /* a line longer than max_text_line */
#define SMTP_BODY_8BIT      0x10u /* an octet >= 0x80 */

struct smtp_event {
	enum smtp_event_type type;
	const char *data; /* COMMAND, BODY: the slice; valid until the input it points into is released */
	size_t len;
	unsigned flags;
	uint64_t size; /* DATA_END, BDAT_END: total body octets yielded for this DATA/chunk */
};

struct smtp_parser {
	/* private: callers use the functions below */
	const struct smtp_limits *lim;
	enum smtp_mode mode;
	unsigned state;     /* DATA sub-state (position inside a possible end marker) */
	unsigned flags;     /* accumulated SMTP_BODY_* or SMTP_LINE_* */
	size_t line_len;    /* current DATA line length, for max_text_line */
	uint64_t size;      /* octets yielded in this DATA/chunk */
	uint64_t remaining; /* BDAT octets still to read */
	bool discarding;    /* command mode: skipping the rest of an over-long line */
	size_t hold;        /* command mode: octets of a partial line held in buf */
	char *buf;          /* max_command_line octets, owned */
};

/* Prepares p for a new connection. lim must outlive p. Returns 0 or -ENOMEM. */
int smtp_parser_init(struct smtp_parser *p, const struct smtp_limits *lim);
/* Frees what init allocated. Accepts a zeroed parser. */
void smtp_parser_deinit(struct smtp_parser *p);
/* Back to command mode, dropping any partial line (e.g. after STARTTLS). */
void smtp_parser_reset(struct smtp_parser *p);

void smtp_parser_begin_data(struct smtp_parser *p);
void smtp_parser_begin_bdat(struct smtp_parser *p, uint64_t size);
enum smtp_mode smtp_parser_mode(const struct smtp_parser *p);

/*
 * Consumes input from `in` (len octets) until one event is complete.
 * Returns 1 with *ev filled when an event is ready, 0 when all of `in` was
 * consumed without completing one (feed more). In both cases *used_r is the
 * number of octets of `in` consumed; call again with in + *used_r for the rest.
 * A 1 may come with *used_r == len (or 0): keep calling, even with len 0,
 * until it returns 0 (BDAT_END, for one, needs no input: after BDAT 0 it comes
 * from a call with len 0). Never fails: protocol errors are events.
 * Slices point into `in`, except a command line that straddled inputs (it is
 * in the parser's buffer, valid until the next call on p) and a held-back CR.
 * Events other than COMMAND and BODY have data NULL and len 0; flags are 0 on
 * every event but COMMAND and DATA_END.
 */
int smtp_parser_next(struct smtp_parser *p, const char *in, size_t len, size_t *used_r,
		     struct smtp_event *ev);

/* ---- command lines ---- */

enum smtp_verb {
	SMTP_VERB_UNKNOWN = 0,
	SMTP_VERB_HELO,
	SMTP_VERB_EHLO,
	SMTP_VERB_MAIL,
	SMTP_VERB_RCPT,
	SMTP_VERB_DATA,
	SMTP_VERB_BDAT,
	SMTP_VERB_RSET,
	SMTP_VERB_NOOP,
	SMTP_VERB_QUIT,
	SMTP_VERB_VRFY,
	SMTP_VERB_EXPN,
	SMTP_VERB_HELP,
	SMTP_VERB_STARTTLS,
	SMTP_VERB_AUTH,
	SMTP_VERB_COUNT
};

#define SMTP_MAX_PARAMS 16

struct smtp_param {
	const char *key; /* e.g. "SIZE"; case as sent */
	size_t key_len;
	const char *value; /* NULL when the parameter has no "=value" */
	size_t value_len;
};

struct smtp_command {
	enum smtp_verb verb;
	const char *arg; /* everything after the verb and one space, trailing spaces trimmed */
	size_t arg_len;
	/* MAIL / RCPT */
	const char *addr; /* mailbox without <> and without a source route; len 0 for <> */
	size_t addr_len;
	size_t local_len;   /* length of the local part inside addr (addr_len if no @) */
	bool addr_utf8;     /* the address has octets >= 0x80 (needs SMTPUTF8) */
	struct smtp_param params[SMTP_MAX_PARAMS];
	unsigned nparams;
	/* BDAT */
	uint64_t bdat_size;
	bool bdat_last;
};

enum smtp_cmd_error {
	SMTP_CMD_OK = 0,
	SMTP_CMD_E_UNKNOWN,       /* 500 5.5.1 unrecognised command */
	SMTP_CMD_E_SYNTAX,        /* 501 5.5.4 / 5.5.2 syntax error in parameters or arguments */
	SMTP_CMD_E_ADDRESS,       /* 501 5.1.7 (MAIL) / 5.1.3 (RCPT): bad address syntax */
	SMTP_CMD_E_PATH_TOO_LONG, /* 501 5.1.7/5.1.3: local part, domain or path over the limits */
	SMTP_CMD_E_TOO_MANY_PARAMS, /* 501 5.5.4 */
	SMTP_CMD_E_NO_ARG,        /* 501 5.5.4: argument required (HELO/EHLO without a domain, BDAT without size) */
	SMTP_CMD_E_UNEXPECTED_ARG, /* 501 5.5.4: argument where none is allowed (DATA x, RSET x, QUIT x) */
};

/*
 * Parses one command line (as yielded by SMTP_EV_COMMAND, without CRLF).
 * Verbs are case-insensitive; "MAIL FROM:" / "RCPT TO:" accept no space after
 * the colon as well as one (as Postfix does); <> is valid for MAIL only;
 * source routes <@a,@b:u@c> are accepted and dropped; quoted local parts and
 * domain literals ([192.0.2.1], [IPv6:...]) are accepted; "postmaster" without
 * a domain is valid for RCPT. All slices in *cmd point into `line`.
 * Returns SMTP_CMD_OK or an error.
 *
 * Details: the verb must start the line and ends at the first SP; trailing SP
 * and HTAB of the line are ignored. The path needs its angle brackets; SP is
 * allowed before "FROM:"/"TO:" and after the colon, and parameters are
 * separated by one or more SP. Octets >= 0x80 in the address must be
 * well-formed UTF-8 (they set addr_utf8). Domain literals are IPv4 or
 * "IPv6:" only (RFC 5321 4.1.3; "::" stands for at least two groups). HELO,
 * EHLO, VRFY, EXPN, AUTH, MAIL, RCPT and BDAT need an argument; NOOP and HELP
 * take any. The BDAT size is 1*DIGIT up to 2^63. On an error, verb, arg and
 * arg_len are still set; the other fields are unspecified. params[] entries
 * past nparams are not touched.
 */
enum smtp_cmd_error smtp_command_parse(const char *line, size_t len, const struct smtp_limits *lim,
				       struct smtp_command *cmd);

/* Finds a parameter by case-insensitive key; NULL when absent. */
const struct smtp_param *smtp_command_param(const struct smtp_command *cmd, const char *key);

/* Name of a verb in upper case ("MAIL"), for logs. */
const char *smtp_verb_name(enum smtp_verb verb);

#endif
