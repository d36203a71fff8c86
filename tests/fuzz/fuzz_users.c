/*
 * libFuzzer target for mta/local/users: the input is a users file.
 *
 * It is loaded from an exact-size heap copy (so ASan catches any read past
 * the end) with users_load_buffer. A refusal must name the file and a line
 * ("fuzz:LINE: reason") or say the file is too large. A table that loaded
 * must keep its promises: every user's address is lower-case ASCII, within
 * USERS_ADDRESS_MAX, and found again as itself, in upper case, and with a
 * "+tag" subaddress (unless an exact entry takes that); its maildir path is
 * either the file's absolute path or the default under the root given. The
 * input itself, cut to an address's length, is looked up too.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mta/local/users.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_user(const struct users *u, const struct user *user)
{
	const char *a = user_address(user);
	size_t len = strlen(a);
	char key[USERS_ADDRESS_MAX + 8], md[USERS_LINE_MAX + 2 * USERS_ADDRESS_MAX];

	if (!len || len > USERS_ADDRESS_MAX || !strchr(a, '@'))
		abort();
	for (size_t i = 0; i < len; i++)
		if (a[i] >= 'A' && a[i] <= 'Z')
			abort();
	if (users_find(u, a, len, 0) != user || users_find(u, a, len, '+') != user)
		abort();
	for (size_t i = 0; i < len; i++)
		key[i] = a[i] >= 'a' && a[i] <= 'z' ? (char)(a[i] - 'a' + 'A') : a[i];
	if (users_find(u, key, len, 0) != user)
		abort();
	/* "+t" before the last '@': finds this user unless that address is an entry itself */
	const char *at = strrchr(a, '@');
	size_t l = (size_t)(at - a);
	if (len + 2 <= USERS_ADDRESS_MAX && !memchr(a, '+', l)) {
		memcpy(key, a, l);
		memcpy(key + l, "+t", 2);
		memcpy(key + l + 2, at, len - l);
		const struct user *s = users_find(u, key, len + 2, '+');
		const struct user *exact = users_find(u, key, len + 2, 0);
		if (s != (exact ? exact : user))
			abort();
	}
	size_t n = user_maildir(user, "/r", md, sizeof(md));
	if (n >= sizeof(md))
		abort();
	if (md[0] != '/' || strlen(md) != n)
		abort();
	const char *h = user_password_hash(user);
	if (user_can_login(user) != (h[0] && strcmp(h, "*") != 0 && h[0] != '!'))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[512];
	char *copy = malloc(size ? size : 1);
	if (!copy)
		return 0;
	memcpy(copy, data, size);
	struct users *u = users_load_buffer("fuzz", copy, size, err, sizeof(err));
	free(copy);
	if (!u) {
		if (strncmp(err, "fuzz:", 5) != 0)
			abort();
		return 0;
	}
	if (users_count(u) > USERS_MAX)
		abort();

	/* walk the users through their own lines: every address that loaded is found */
	size_t found = 0;
	for (size_t pos = 0; pos < size;) {
		const char *p = (const char *)data + pos;
		const char *nl = memchr(p, '\n', size - pos);
		size_t n = nl ? (size_t)(nl - p) : size - pos;
		pos += n + 1;
		while (n && (*p == ' ' || *p == '\t')) {
			p++;
			n--;
		}
		const char *colon = memchr(p, ':', n);
		if (!n || *p == '#' || !colon)
			continue;
		size_t al = (size_t)(colon - p);
		while (al && (p[al - 1] == ' ' || p[al - 1] == '\t'))
			al--;
		const struct user *user = users_find(u, p, al, 0);
		if (!user)
			abort();
		check_user(u, user);
		found++;
	}
	if (found != users_count(u))
		abort();

	/* the raw input as an address */
	users_find(u, (const char *)data, size < 300 ? size : 300, '+');
	users_free(&u);
	if (u)
		abort();
	return 0;
}
