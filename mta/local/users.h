/*
 * users: the local users file, read once and then looked up by address. It
 * is the one list of local mailboxes: local delivery (mta/local/maildir),
 * and later AUTH, POP3 and IMAP share it. Format (docs/local-delivery.md):
 *
 *   # comment
 *   address:password-hash[:maildir[:aliases]]
 *
 *   - address is `local@domain` (split at the last '@'), also the login name;
 *     lower-cased (ASCII letters only; other octets, UTF-8 included, are kept
 *     and compared as they are); at most USERS_ADDRESS_MAX octets, no blanks,
 *     control characters, '/', ',' or ':'; neither part may be empty or start
 *     with '.' (the default maildir path is built from them);
 *   - password-hash is a crypt(3) string of a strong scheme ($y$ yescrypt,
 *     $gy$, $7$, $2b$, $6$ SHA-512-crypt, $5$), or empty, `*` or a string
 *     beginning with `!` for a user who cannot log in (mail is still delivered);
 *   - maildir is an absolute path, or empty for the default
 *     <mailbox_root>/<domain>/<local>/Maildir (see user_maildir);
 *   - aliases is a comma-separated list of extra addresses (same rules as
 *     address) delivered to the same mailbox; never login names.
 * Lines end with LF (a CR before it is dropped); blanks around fields and
 * aliases are ignored; a line whose first non-blank is `#` and a blank line
 * are skipped. Every address (user or alias) is unique across the file.
 * Bounds: USERS_LINE_MAX octets per line, USERS_FILE_MAX per file,
 * USERS_MAX users, USERS_ADDRESSES_MAX addresses (users and aliases).
 * The first bad line stops the load with "NAME:LINE: reason".
 *
 * Memory: a loaded table owns one copy of the file's octets (the strings
 * point into it), the user array and a hash table over every address. The
 * copy holds the password hashes: users_free wipes it (explicit_bzero)
 * before release.
 *
 * Threads: a loaded table is immutable; any number of threads may call
 * users_find and the accessors concurrently. To reload, load a new table,
 * publish the pointer, and free the old one once no thread uses it.
 */
#ifndef POSTHASTE_MTA_LOCAL_USERS_H
#define POSTHASTE_MTA_LOCAL_USERS_H

#include <stdbool.h>
#include <stddef.h>

#define USERS_LINE_MAX      8192u       /* octets per line, without its LF */
#define USERS_FILE_MAX      (64u << 20) /* octets per file */
#define USERS_MAX           (1u << 20)  /* users per file */
#define USERS_ADDRESSES_MAX (4u << 20)  /* addresses per file, users and aliases */
#define USERS_ADDRESS_MAX   254u        /* octets per address (RFC 5321 path less <>) */
#define USERS_DELIM_DEFAULT '+'         /* the usual subaddress delimiter */

struct users;
struct user;

/*
 * Reads the file at path (at most USERS_FILE_MAX octets) and parses it with
 * users_load_buffer, path as its name. Returns the table (free with
 * users_free), or NULL with a reason in err (NUL-terminated, truncated to
 * errlen): "cannot read PATH: strerror" (a larger file: "File too large"),
 * "PATH:LINE: reason" for a bad line, "PATH: out of memory".
 */
struct users *users_load(const char *path, char *err, size_t errlen);

/*
 * Parses len octets at buf (no terminator needed; the last line may lack its
 * LF; at most USERS_FILE_MAX octets). name is used in error messages. Returns
 * the table or NULL with "NAME:LINE: reason" (or "NAME: reason") in err.
 * An empty file gives an empty table.
 */
struct users *users_load_buffer(const char *name, const char *buf, size_t len, char *err,
                                size_t errlen);

/*
 * The user whose address or alias is the len octets at addr, compared without
 * ASCII case. When there is none and delim is not 0, the local part is cut at
 * its first delim and looked up again ("bob+tag@x" finds "bob@x"; an exact
 * "bob+tag@x" entry wins). Returns NULL when nothing matches, and for an
 * address longer than USERS_ADDRESS_MAX or without '@'. O(1) expected.
 * The result lives as long as the table.
 */
const struct user *users_find(const struct users *u, const char *addr, size_t len, char delim);

/*
 * Whether the len octets at addr belong to the user whose login (own
 * address, not an alias) is the login_len octets at login: the address
 * itself, one of its aliases, or either with a subaddress after delim (as
 * users_find finds them; an exact entry of another user wins), without ASCII
 * case. For the sender check of authenticated sessions. False for an
 * unknown login, an alias as login, an empty addr (the null sender: the
 * caller decides) and a NULL table.
 */
bool users_owns(const struct users *u, const char *login, size_t login_len, const char *addr,
                size_t len, char delim);

/* Users in the table (aliases not counted); 0 for NULL. */
size_t users_count(const struct users *u);

/*
 * Wipes the file's copy (password hashes included), frees everything and sets
 * *u to NULL. Accepts NULL and a NULL *u.
 */
void users_free(struct users **u);

/* The user's address, lower-cased, NUL-terminated (also the login name). */
const char *user_address(const struct user *user);

/*
 * The password-hash field as written (NUL-terminated; "" when empty). Only
 * meaningful when user_can_login; passwd_verify (passwd.h) checks passwords.
 */
const char *user_password_hash(const struct user *user);

/* Whether the hash field holds a hash (not empty, `*` or `!...`). */
bool user_can_login(const struct user *user);

/*
 * Writes the user's maildir path into buf: the file's maildir field when
 * given, else "<mailbox_root>/<domain>/<local>/Maildir" (one '/' between
 * mailbox_root and the domain even when mailbox_root ends with '/'). Returns
 * the path's length (without NUL), like snprintf: when it is >= cap, buf
 * holds a truncated, NUL-terminated prefix (nothing when cap is 0) and the
 * caller must not use it. mailbox_root may be NULL only when the user has a
 * maildir field (NULL otherwise gives "" and returns 0).
 */
size_t user_maildir(const struct user *user, const char *mailbox_root, char *buf, size_t cap);

#endif
