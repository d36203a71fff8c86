/*
 * passwd: password checking and hashing for the users file (users.h), with
 * libcrypt (libxcrypt's crypt_rn and crypt_gensalt_rn). Shared by SMTP AUTH
 * and, later, POP3 and IMAP.
 *
 * Cost: a check runs the user's hash once: yescrypt at its default cost
 * ($y$j9T$) takes about 10-50 ms of CPU and 32 KiB of crypt_data plus the
 * hash's own memory (yescrypt: 16 MiB at j9T). The caller decides on which
 * thread that runs (docs/auth.md).
 *
 * Threads: every function is reentrant (crypt_rn on a private crypt_data).
 */
#ifndef POSTHASTE_MTA_LOCAL_PASSWD_H
#define POSTHASTE_MTA_LOCAL_PASSWD_H

#include <stdbool.h>
#include <stddef.h>

#include "mta/local/users.h"

#define PASSWD_MAX      255u /* octets of a password (as SASL's bound) */
#define PASSWD_HASH_MAX 512u /* octets of a hash with its NUL */

/*
 * Checks a login: login (login_len octets, compared without ASCII case) must
 * be a user's own address (not an alias) whose hash allows a login
 * (user_can_login), and the pw_len octets at pw must hash to that hash. The
 * hash results are compared in constant time. An unknown login, a user who
 * cannot log in, a password with a NUL octet or over PASSWD_MAX octets still
 * cost one yescrypt hash of a dummy (no timing difference tells which
 * logins exist, for yescrypt users). Returns 1 accepted (*user_r set when
 * user_r is not NULL), 0 refused, or -errno when hashing itself failed
 * (-ENOMEM). Every copy of the password it makes is wiped.
 */
int passwd_verify(const struct users *u, const char *login, size_t login_len, const char *pw,
		  size_t pw_len, const struct user **user_r);

/*
 * Hashes the NUL-terminated password pw with a fresh random salt: yescrypt
 * ($y$, libxcrypt's default cost), or SHA-512-crypt ($6$) when this
 * libcrypt has no yescrypt. Writes the crypt string into out (cap octets,
 * PASSWD_HASH_MAX is enough). 0, or -errno (-EINVAL: an empty password or
 * one over PASSWD_MAX octets; -ENOSPC: cap too small).
 */
int passwd_hash(const char *pw, char *out, size_t cap);

/* Whether the two NUL-terminated strings are equal, in time that depends only on their lengths. */
bool passwd_equal(const char *a, const char *b);

#endif
