/*
 * dsn: delivery status notifications (RFC 3464 reports, RFC 3461 rules,
 * RFC 6533 for SMTPUTF8 originals), built as one complete message.
 *
 * The relay calls dsn_build when recipients of a message failed permanently,
 * expired in the queue, or (when asked with NOTIFY=DELAY/SUCCESS) were
 * delayed or delivered. The result is a multipart/report message that the
 * relay queues from the null sender <> to the original envelope sender:
 *
 *   headers   From: Mail Delivery System <MAILER-DAEMON@reporting-mta>,
 *             To, Subject, Date, Message-ID, Auto-Submitted: auto-replied,
 *             MIME-Version, Content-Type: multipart/report;
 *             report-type=delivery-status; boundary="..."
 *   part 1    text/plain: what happened, recipient by recipient
 *   part 2    message/delivery-status (message/global-delivery-status)
 *   part 3    message/rfc822 (message/global): the whole original, or
 *             text/rfc822-headers (message/global-headers): its header only
 *
 * This module decides nothing about *whether* to report beyond the NOTIFY
 * bits: the caller never builds a DSN for a message from the null sender
 * (dsn_should_send says so; dsn_build refuses one with -EINVAL).
 *
 * Untrusted text: the remote reply (diagnostic), ENVID and ORCPT come from
 * other hosts. Every such string is reduced to one line of printable text
 * (CR, LF, NUL and other controls become spaces; 8-bit octets become '?'
 * unless the report is the SMTPUTF8 variant and they form valid UTF-8),
 * bounded, and folded; the MIME boundary is chosen after the parts are
 * built and never occurs anywhere in them. No output line exceeds 998
 * octets plus CRLF; every line ends in CRLF.
 *
 * Thread-safety: none needed; pure functions over caller memory (the only
 * library calls are malloc/realloc/free and gmtime_r).
 */
#ifndef POSTHASTE_MTA_RELAY_DSN_H
#define POSTHASTE_MTA_RELAY_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* NOTIFY bits: the same values as SMTP_NOTIFY_* (mta/smtp/smtp_server.h) and
 * the spool's per-recipient notify byte. 0 means "not given". */
#define DSN_NOTIFY_NEVER   0x1u
#define DSN_NOTIFY_SUCCESS 0x2u
#define DSN_NOTIFY_FAILURE 0x4u
#define DSN_NOTIFY_DELAY   0x8u

/* Bounds (octets). */
#define DSN_FULL_MAX_DEFAULT (256u * 1024u) /* larger originals come back as headers only */
#define DSN_ADDR_MAX         512u           /* sender / recipient address; longer is -EINVAL */
#define DSN_XTEXT_MAX        500u           /* decoded ENVID / ORCPT; longer is left out */
#define DSN_DIAG_MAX         2000u          /* sanitised diagnostic; longer is cut, "..." added */
#define DSN_TEXT_RCPTS_MAX   100u           /* recipients spelled out in the text part */
#define DSN_RCPTS_MAX        100000u        /* recipients per call; more is -EINVAL */
#define DSN_OUT_MAX          (32u * 1024u * 1024u) /* whole report; larger is -EMSGSIZE */

/* Values as enum smtp_ret (mta/smtp/smtp_server.h). */
enum dsn_ret {
	DSN_RET_UNSET = 0, /* not given: full message up to the size bound, else headers */
	DSN_RET_FULL,      /* full message up to the size bound, else headers */
	DSN_RET_HDRS,      /* headers only */
};

/* RFC 3464 2.3.3. */
enum dsn_action {
	DSN_ACTION_FAILED = 0,
	DSN_ACTION_DELAYED,
	DSN_ACTION_DELIVERED,
	DSN_ACTION_RELAYED,
	DSN_ACTION_EXPANDED,
};

/*
 * The message being reported on. Strings marked "NUL-terminated" must be;
 * the others are (pointer, length) pairs as the spool stores them, and may
 * be NULL when their length is 0.
 */
struct dsn_message {
	const char *reporting_mta; /* NUL-terminated host name (LDH, dots), 1..255 */
	const char *queue_id;      /* NUL-terminated, 1..64 of [A-Za-z0-9._-] */
	uint64_t arrival_ms;       /* unix ms the message arrived; 0: no Arrival-Date */
	uint64_t now_ms;           /* unix ms, for Date: and the Message-ID */
	const char *sender;        /* envelope sender without <>; must not be empty */
	size_t sender_len;
	const char *envid; /* ENVID as received (xtext); envid_len 0: none */
	size_t envid_len;
	enum dsn_ret ret;
	bool smtputf8;      /* the original was SMTPUTF8: RFC 6533 report types */
	const uint8_t *msg; /* original message octets, header + body, CRLF lines */
	size_t msg_len;
	size_t full_max; /* return the full message up to this size; 0: DSN_FULL_MAX_DEFAULT */
	uint64_t random; /* random bits for the MIME boundary (any value works) */
};

struct dsn_rcpt {
	const char *addr; /* envelope recipient without <>, 1..DSN_ADDR_MAX octets */
	size_t addr_len;
	const char *orcpt; /* ORCPT as received ("rfc822;" + xtext); orcpt_len 0: none */
	size_t orcpt_len;
	unsigned notify; /* DSN_NOTIFY_* bits; 0: not given (FAILURE and DELAY) */
	enum dsn_action action;
	const char *status;     /* NUL-terminated enhanced code "5.1.1"; NULL or malformed
	                           (for a delay: not 4.x.x): 5.0.0 / 4.0.0 / 2.0.0 by action */
	const char *remote_mta; /* NUL-terminated host name, or NULL / "" */
	const char *diag;       /* the remote reply text ("550 5.1.1 ..."), untrusted;
	                           diag_len 0: no Diagnostic-Code */
	size_t diag_len;
	uint64_t last_attempt_ms; /* unix ms; 0: no Last-Attempt-Date */
	uint64_t retry_until_ms;  /* unix ms, delayed only; 0: no Will-Retry-Until */
};

/*
 * Whether a recipient with these NOTIFY bits asked for a report of this
 * action (RFC 3461 4.1): never with NEVER; failed needs FAILURE, delayed
 * needs DELAY, delivered/relayed/expanded need SUCCESS; no bits given
 * means FAILURE and DELAY.
 */
bool dsn_rcpt_wants(unsigned notify, enum dsn_action a);

/*
 * Whether a report should be built at all: the sender is not the null
 * sender <> (sender_len 0) and at least one of the n recipients wants one.
 */
bool dsn_should_send(const char *sender, size_t sender_len, const struct dsn_rcpt *rcpts,
                     unsigned n);

/*
 * Builds the report for the recipients of rcpts[0..n) that want one (see
 * dsn_rcpt_wants); the others are left out.
 *
 * Returned content: RET=HDRS returns the header section only. RET=FULL or
 * unset returns the whole message when the report lists a failed recipient,
 * the original is at most full_max octets and every line of it is at most
 * 998 octets without NUL; otherwise the header section only (delay and
 * success reports always return headers only, RFC 3461 4.3). In the header
 * section, fields with an overlong line or a NUL are left out. Bare CR or LF
 * line ends in the returned content become CRLF.
 *
 * The output has 8-bit octets only if the original or (SMTPUTF8 variant)
 * the addresses do; the caller sends it with BODY=8BITMIME (and SMTPUTF8
 * when m->smtputf8) as it would the original.
 *
 * Returns 0 with *out (malloc'd, NUL-terminated for convenience; free())
 * and *out_len (without that NUL), or
 *   -EINVAL    bad arguments: NULL pointers, null or malformed sender,
 *              reporting MTA or queue id, an address too long or with
 *              control characters, a recipient whose Final-Recipient form
 *              (\x{HEX} escapes in an ASCII report) would not fit a line,
 *              an 8-bit sender without m->smtputf8, an unknown action,
 *              n > DSN_RCPTS_MAX;
 *   -ENOENT    no recipient wants a report;
 *   -EMSGSIZE  the report would exceed DSN_OUT_MAX;
 *   -ENOMEM    out of memory.
 * On error *out is NULL and *out_len 0.
 */
int dsn_build(const struct dsn_message *m, const struct dsn_rcpt *rcpts, unsigned n, char **out,
              size_t *out_len);

#endif
