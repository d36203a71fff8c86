/* Password checks and hashes with libcrypt: see passwd.h. */
#include "mta/local/passwd.h"

#include <crypt.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/*
 * Hashed instead of a real hash when there is nothing to check against, so
 * that a refusal costs what a check costs: yescrypt at the default cost, of
 * a password nobody knows.
 */
static const char dummy_hash[] =
	"$y$j9T$pF0RwGlDKeXagMJRYZA92/$voCkpEAEm0aD7ZTjppBdzMJeu8i90IkFGHlDkbT47S7";

bool passwd_equal(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	volatile unsigned char diff = la != lb;
	size_t n = la < lb ? la : lb;
	for (size_t i = 0; i < n; i++)
		diff |= (unsigned char)(a[i] ^ b[i]);
	return diff == 0;
}

/* crypt_rn of pw with setting; 1 when the result equals setting's full hash, 0, or -errno. */
static int check_hash(const char *pw, const char *hash)
{
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	if (!cd)
		return -ENOMEM;
	const char *out = crypt_rn(pw, hash, cd, (int)sizeof(*cd));
	int r = out && out[0] != '*' ? passwd_equal(out, hash) : 0;
	explicit_bzero(cd, sizeof(*cd));
	free(cd);
	return r;
}

int passwd_verify(const struct users *u, const char *login, size_t login_len, const char *pw,
		  size_t pw_len, const struct user **user_r)
{
	char buf[PASSWD_MAX + 1];
	const struct user *user = users_find(u, login, login_len, 0);
	const char *addr = user ? user_address(user) : NULL;
	/* a login name is a user's own address, never an alias */
	bool ok = user && strlen(addr) == login_len && !strncasecmp(addr, login, login_len) &&
		  user_can_login(user);
	bool pw_ok = pw_len && pw_len <= PASSWD_MAX && !memchr(pw, '\0', pw_len);
	if (pw_ok)
		memcpy(buf, pw, pw_len);
	buf[pw_ok ? pw_len : 0] = '\0';
	int r = check_hash(buf, ok && pw_ok ? user_password_hash(user) : dummy_hash);
	explicit_bzero(buf, sizeof(buf));
	if (r == 1 && ok && pw_ok) {
		if (user_r)
			*user_r = user;
		return 1;
	}
	return r < 0 ? r : 0;
}

int passwd_hash(const char *pw, char *out, size_t cap)
{
	size_t n = strlen(pw);
	if (!n || n > PASSWD_MAX)
		return -EINVAL;
	char salt[CRYPT_GENSALT_OUTPUT_SIZE];
	/* NULL random bytes: libxcrypt reads them from the kernel itself */
	if (!crypt_gensalt_rn("$y$", 0, NULL, 0, salt, (int)sizeof(salt)) &&
	    !crypt_gensalt_rn("$6$", 0, NULL, 0, salt, (int)sizeof(salt)))
		return errno ? -errno : -EINVAL;
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	if (!cd)
		return -ENOMEM;
	int r = 0;
	const char *h = crypt_rn(pw, salt, cd, (int)sizeof(*cd));
	if (!h || h[0] == '*')
		r = errno ? -errno : -EINVAL;
	else if (strlen(h) >= cap)
		r = -ENOSPC;
	else
		memcpy(out, h, strlen(h) + 1);
	explicit_bzero(cd, sizeof(*cd));
	free(cd);
	return r;
}
