/*
 * Unit tests of the sender check of authenticated sessions (users_owns in
 * mta/local/users): a table of named cases over one users file, for the
 * user's own address, its aliases, +subaddresses of both, case, another
 * user's addresses (an exact entry of another user wins over the cut
 * subaddress), unknown and malformed addresses, and logins that are not
 * logins (an alias, an unknown address).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/local/users.h"

static const char users_file[] =
    "# the sender-check tests\n"
    "alice@example.org:*::sales@example.org, Info@Example.ORG\n"
    "bob@example.org:*\n"
    "alice+special@example.org:*\n" /* someone else, despite the name */
    "carol@example.net:!locked::carol@example.org\n";

struct owns_case {
	const char *name;
	const char *login, *sender;
	char delim;
	bool want;
};

static const struct owns_case cases[] = {
    {"own address", "alice@example.org", "alice@example.org", '+', true},
    {"own address, other case", "alice@example.org", "ALICE@Example.Org", '+', true},
    {"login in other case", "Alice@EXAMPLE.org", "alice@example.org", '+', true},
    {"subaddress", "alice@example.org", "alice+lists@example.org", '+', true},
    {"empty subaddress", "alice@example.org", "alice+@example.org", '+', true},
    {"alias", "alice@example.org", "sales@example.org", '+', true},
    {"alias written in capitals", "alice@example.org", "info@example.org", '+', true},
    {"subaddress of an alias", "alice@example.org", "sales+q3@example.org", '+', true},
    {"subaddress without a delimiter", "alice@example.org", "alice+lists@example.org", 0, false},
    {"another user", "alice@example.org", "bob@example.org", '+', false},
    {"another user's exact entry wins", "alice@example.org", "alice+special@example.org", '+',
     false},
    {"... and it is that user's", "alice+special@example.org", "alice+special@example.org", '+',
     true},
    {"another user's alias", "alice@example.org", "carol@example.org", '+', false},
    {"a user who cannot log in still owns its alias", "carol@example.net", "carol+x@example.org",
     '+', true},
    {"same local part, other domain", "alice@example.org", "alice@example.net", '+', false},
    {"unknown address", "alice@example.org", "mallory@example.org", '+', false},
    {"only a subaddress", "alice@example.org", "+x@example.org", '+', false},
    {"no domain", "alice@example.org", "alice", '+', false},
    {"empty local part", "alice@example.org", "@example.org", '+', false},
    {"null sender (the caller decides)", "alice@example.org", "", '+', false},
    {"trailing dot", "alice@example.org", "alice@example.org.", '+', false},
    {"an alias is not a login", "sales@example.org", "sales@example.org", '+', false},
    {"an alias is not a login (its user's address)", "sales@example.org", "alice@example.org", '+',
     false},
    {"unknown login", "mallory@example.org", "mallory@example.org", '+', false},
    {"subaddressed login", "alice+x@example.org", "alice@example.org", '+', false},
    {"empty login", "", "alice@example.org", '+', false},
};

static void test_owns_cases(void **state)
{
	char err[256] = "";
	struct users *u =
	    users_load_buffer("users", users_file, sizeof(users_file) - 1, err, sizeof(err));
	if (!u)
		fail_msg("users file: %s", err);
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		const struct owns_case *t = &cases[i];
		bool got = users_owns(u, t->login, strlen(t->login), t->sender, strlen(t->sender),
		                      t->delim);
		if (got != t->want)
			fail_msg("%s: users_owns(%s, %s) = %d, want %d", t->name, t->login,
			         t->sender, got, t->want);
	}
	users_free(&u);
}

static void test_owns_bounds(void **state)
{
	char err[256] = "";
	struct users *u =
	    users_load_buffer("users", users_file, sizeof(users_file) - 1, err, sizeof(err));
	assert_non_null(u);
	/* a sender over USERS_ADDRESS_MAX octets: never owned */
	char longaddr[USERS_ADDRESS_MAX + 32];
	size_t n = sizeof(longaddr) - 1;
	memset(longaddr, 'a', n);
	memcpy(longaddr, "alice+", 6);
	memcpy(longaddr + n - 12, "@example.org", 12);
	longaddr[n] = '\0';
	assert_false(users_owns(u, "alice@example.org", 17, longaddr, n, '+'));
	/* lengths, not NULs, delimit: a prefix of a longer string */
	assert_true(users_owns(u, "alice@example.orgXX", 17, "bob@x", 0, '+') == false);
	assert_true(users_owns(u, "alice@example.orgXX", 17, "alice@example.orgYY", 17, '+'));
	/* no table: nobody owns anything */
	assert_false(users_owns(NULL, "alice@example.org", 17, "alice@example.org", 17, '+'));
	users_free(&u);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_owns_cases),
	    cmocka_unit_test(test_owns_bounds),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
