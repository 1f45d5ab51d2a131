/*
 * userdb-t - unit tests for userdb and passwd against a real SQLite file in a
 * temporary folder: migrations, users, passwords, sender patterns, per-user limits,
 * the newer-schema refusal and the pure sender match.
 */
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../relayd/passwd.h"
#include "../../relayd/userdb.h"
#include "tap.h"

static char tmpdir[256];
static char dbpath[512];

static int raw_user_version(const char *path)
{
	sqlite3 *db;
	sqlite3_stmt *st;
	int v = -1;

	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
	    sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) == SQLITE_OK) {
		if (sqlite3_step(st) == SQLITE_ROW)
			v = sqlite3_column_int(st, 0);
		sqlite3_finalize(st);
	}
	sqlite3_close(db);
	return v;
}

static int raw_exec(const char *path, const char *sql)
{
	sqlite3 *db;
	int rc;

	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
		sqlite3_close(db);
		return -1;
	}
	rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
	sqlite3_close(db);
	return rc == SQLITE_OK ? 0 : -1;
}

struct names {
	char buf[256];
	int n;
};

static void collect(const char *name, void *arg)
{
	struct names *ns = arg;
	size_t len = strlen(ns->buf);

	snprintf(ns->buf + len, sizeof(ns->buf) - len, "%s%s", ns->n++ ? "," : "", name);
}

static void test_open_and_users(void)
{
	char err[256] = "";
	struct userdb *db;
	struct userdb_user u, u2;
	struct names ns = { "", 0 };
	struct stat sb;

	db = userdb_open(dbpath, err, sizeof(err));
	if (!ok(db != NULL, "userdb_open creates a new database"))
		diag("err: %s", err);
	if (!db)
		exit(1);
	ok(userdb_schema_version() >= 1, "schema version is at least 1");
	is_int(raw_user_version(dbpath), userdb_schema_version(),
	    "user_version is the highest migration");
	ok(stat(dbpath, &sb) == 0 && (sb.st_mode & 077) == 0,
	    "database file is not readable by group or others");

	ok(userdb_user_add(db, "alice@example.org", "s3cret", err, sizeof(err)) == 0,
	    "add alice@example.org");
	ok(userdb_user_add(db, "bob", "s3cret", err, sizeof(err)) == 0, "add bob");
	err[0] = '\0';
	ok(userdb_user_add(db, "bob", "other", err, sizeof(err)) == -1, "duplicate add refused");
	ok(strstr(err, "already exists") != NULL, "duplicate add says it exists: %s", err);
	ok(userdb_user_add(db, "carol", "", err, sizeof(err)) == -1, "empty password refused");
	ok(userdb_user_add(db, "", "x", err, sizeof(err)) == -1, "empty name refused");
	ok(userdb_user_add(db, "with space", "x", err, sizeof(err)) == -1,
	    "name with a space refused");
	ok(userdb_user_add(db, "a:b", "x", err, sizeof(err)) == -1, "name with a colon refused");
	ok(userdb_user_add(db, "tab\there", "x", err, sizeof(err)) == -1,
	    "name with a control character refused");
	ok(userdb_name_valid("j\xc3\xb6rg@b\xc3\xbc" "cher.example"), "UTF-8 name is valid");
	ok(!userdb_name_valid("x\xc2\x85y"), "name with NEL (U+0085) refused");
	ok(!userdb_name_valid("x\xc2\x9b" "31m"), "name with CSI (U+009B) refused");
	ok(!userdb_name_valid("x\x9b" "31m"), "name with a raw C1 byte refused");
	ok(!userdb_name_valid("x\xff\xfe"), "name that is not UTF-8 refused");
	ok(!userdb_name_valid("x\xc0\xaf"), "name with an overlong form refused");
	ok(!userdb_name_valid("x\xed\xa0\x80"), "name with a surrogate refused");
	err[0] = '\0';
	ok(userdb_user_add(db, "x\xc2\x85\xc2\x9b" "31m\xff\xfe=\"evil\"@example.org", "x", err, sizeof(err)) == -1 &&
	   strstr(err, "UTF-8"), "user add of such a name refused: %s", err);
	{
		char longname[300];

		memset(longname, 'a', sizeof(longname) - 1);
		longname[sizeof(longname) - 1] = '\0';
		ok(userdb_user_add(db, longname, "x", err, sizeof(err)) == -1,
		    "name longer than 255 refused");
		longname[255] = '\0';
		ok(userdb_name_valid(longname), "name of 255 characters is valid");
	}

	is_int(userdb_user_get(db, "bob", &u), 0, "get bob");
	is_str(u.name, "bob", "got name");
	ok(strncmp(u.hash, "$y$", 3) == 0, "hash is yescrypt ($y$): %.8s...", u.hash);
	ok(u.created > 0 && u.created <= (int64_t)time(NULL) && u.pw_changed == u.created,
	    "created and pw_changed set");
	is_int((long long)u.nsenders, 0, "new user has no sender patterns");
	is_int(userdb_user_get(db, "alice@example.org", &u2), 0, "get alice");
	ok(strcmp(u.hash, u2.hash) != 0, "same password, different hashes (salted)");
	userdb_user_free(&u);
	userdb_user_free(&u2);
	is_int(userdb_user_get(db, "nobody", &u), 1, "get unknown user: not found");
	userdb_user_free(&u);

	ok(userdb_user_list(db, collect, &ns) == 0, "list users");
	is_str(ns.buf, "alice@example.org,bob", "list in name order");

	is_int(userdb_check_password(db, "bob", "s3cret"), USERDB_OK, "right password: OK");
	is_int(userdb_check_password(db, "bob", "wrong"), USERDB_BAD_PASSWORD,
	    "wrong password: BAD_PASSWORD");
	is_int(userdb_check_password(db, "bob", ""), USERDB_BAD_PASSWORD,
	    "empty password: BAD_PASSWORD");
	is_int(userdb_check_password(db, "nobody", "s3cret"), USERDB_NO_USER,
	    "unknown user: NO_USER");
	is_int(userdb_check_password(db, "Bob", "s3cret"), USERDB_NO_USER,
	    "user names are case-sensitive");

	ok(userdb_user_passwd(db, "bob", "n3w", err, sizeof(err)) == 0, "change bob's password");
	is_int(userdb_check_password(db, "bob", "s3cret"), USERDB_BAD_PASSWORD,
	    "old password no longer works");
	is_int(userdb_check_password(db, "bob", "n3w"), USERDB_OK, "new password works");
	ok(userdb_user_passwd(db, "nobody", "x", err, sizeof(err)) == -1,
	    "passwd of unknown user fails");
	ok(strstr(err, "no such user") != NULL, "and says so: %s", err);

	/* disabled users are treated like unknown ones */
	ok(raw_exec(dbpath, "UPDATE users SET disabled = 1 WHERE name = 'alice@example.org'") == 0,
	    "disable alice directly");
	is_int(userdb_check_password(db, "alice@example.org", "s3cret"), USERDB_NO_USER,
	    "disabled user: NO_USER");
	is_int(userdb_user_get(db, "alice@example.org", &u), 0, "a disabled user is still read");
	ok(u.disabled, "with disabled set (the credential cache path refuses on it)");
	userdb_user_free(&u);
	ok(raw_exec(dbpath, "UPDATE users SET disabled = 0 WHERE name = 'alice@example.org'") == 0,
	    "enable alice again");
	is_int(userdb_check_password(db, "alice@example.org", "s3cret"), USERDB_OK,
	    "enabled again: OK");
	is_int(userdb_user_get(db, "alice@example.org", &u), 0, "get alice enabled again");
	ok(!u.disabled, "disabled no longer set");
	userdb_user_free(&u);

	/* sender patterns */
	ok(userdb_sender_add(db, "bob", "Bob@Example.ORG", err, sizeof(err)) == 0,
	    "add sender address");
	ok(userdb_sender_add(db, "bob", "@example.net", err, sizeof(err)) == 0,
	    "add sender @domain");
	ok(userdb_sender_add(db, "bob", "*", err, sizeof(err)) == 0, "add sender *");
	ok(userdb_sender_add(db, "bob", "bob@example.org", err, sizeof(err)) == -1,
	    "duplicate sender refused (case-insensitive)");
	ok(userdb_sender_add(db, "nobody", "x@example.org", err, sizeof(err)) == -1,
	    "sender for unknown user refused");
	ok(strstr(err, "no such user") != NULL, "and says so: %s", err);
	ok(userdb_sender_add(db, "bob", "a@b@c", err, sizeof(err)) == -1, "two @ refused");
	ok(userdb_sender_add(db, "bob", "@", err, sizeof(err)) == -1, "bare @ refused");
	ok(userdb_sender_add(db, "bob", "bob@", err, sizeof(err)) == -1, "empty domain refused");
	ok(userdb_sender_add(db, "bob", "bob", err, sizeof(err)) == -1, "no @ refused");
	ok(userdb_sender_add(db, "bob", "a b@c", err, sizeof(err)) == -1, "space refused");
	is_int(userdb_user_get(db, "bob", &u), 0, "get bob with senders");
	is_int((long long)u.nsenders, 3, "three patterns");
	if (u.nsenders == 3) {
		is_str(u.senders[0], "*", "pattern *");
		is_str(u.senders[1], "@example.net", "pattern @example.net");
		is_str(u.senders[2], "bob@example.org", "pattern stored in lower case");
	}
	userdb_user_free(&u);
	ok(userdb_sender_del(db, "bob", "*", err, sizeof(err)) == 0, "del sender *");
	ok(userdb_sender_del(db, "bob", "*", err, sizeof(err)) == -1, "del absent sender fails");
	ok(userdb_sender_del(db, "bob", "BOB@example.org", err, sizeof(err)) == 0,
	    "del sender, case-insensitive");
	is_int(userdb_user_get(db, "bob", &u), 0, "get bob again");
	is_int((long long)u.nsenders, 1, "one pattern left");
	userdb_user_free(&u);

	ok(userdb_user_del(db, "bob", err, sizeof(err)) == 0, "delete bob");
	is_int(userdb_user_get(db, "bob", &u), 1, "bob is gone");
	userdb_user_free(&u);
	is_int(userdb_check_password(db, "bob", "n3w"), USERDB_NO_USER, "deleted user: NO_USER");
	ok(userdb_user_del(db, "bob", err, sizeof(err)) == -1, "delete again fails");
	ok(userdb_user_add(db, "bob", "again", err, sizeof(err)) == 0, "re-add bob");
	is_int(userdb_user_get(db, "bob", &u), 0, "get new bob");
	is_int((long long)u.nsenders, 0, "old senders went with the old bob (cascade)");
	userdb_user_free(&u);
	userdb_close(db);

	/* reopening applies nothing and keeps the data */
	db = userdb_open(dbpath, err, sizeof(err));
	ok(db != NULL, "reopen existing database");
	if (db) {
		is_int(userdb_check_password(db, "bob", "again"), USERDB_OK, "data kept on reopen");
		userdb_close(db);
	}
	is_int(raw_user_version(dbpath), userdb_schema_version(), "user_version unchanged");
}

static void test_limits(void)
{
	char err[256] = "";
	struct userdb *db = userdb_open(dbpath, err, sizeof(err));
	struct userdb_limits l, g;

	if (!ok(db != NULL, "open for limits"))
		return;
	ok(userdb_user_add(db, "lim", "pw", err, sizeof(err)) == 0, "add user lim");
	memset(&g, 0xff, sizeof(g));
	is_int(userdb_limits_get(db, "lim", &g), 0, "get limits without a row");
	ok(!g.set[0] && !g.set[1] && !g.set[2], "no row: all unset");
	is_int(userdb_limits_get(db, "nobody", &g), 0, "get limits of unknown user: 0");
	ok(!g.set[0] && !g.set[1] && !g.set[2], "unknown user: all unset");

	memset(&l, 0, sizeof(l));
	l.set[USERDB_LIMIT_MSGS] = true;
	l.limit[USERDB_LIMIT_MSGS] = 100;
	l.window[USERDB_LIMIT_MSGS] = 3600;
	l.set[USERDB_LIMIT_BYTES] = true;
	l.limit[USERDB_LIMIT_BYTES] = 50ull << 20;
	l.window[USERDB_LIMIT_BYTES] = 86400;
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == 0, "set msgs and bytes");
	is_int(userdb_limits_get(db, "lim", &g), 0, "get limits");
	ok(g.set[0] && g.limit[0] == 100 && g.window[0] == 3600, "msgs 100/hour");
	ok(!g.set[1], "rcpts unset");
	ok(g.set[2] && g.limit[2] == 50ull << 20 && g.window[2] == 86400, "bytes 50M/day");

	/* replace: msgs unset, rcpts 0 (unlimited) */
	l.set[USERDB_LIMIT_MSGS] = false;
	l.set[USERDB_LIMIT_RCPTS] = true;
	l.limit[USERDB_LIMIT_RCPTS] = 0;
	l.window[USERDB_LIMIT_RCPTS] = 60;
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == 0, "update limits");
	is_int(userdb_limits_get(db, "lim", &g), 0, "get updated limits");
	ok(!g.set[0], "msgs unset again");
	ok(g.set[1] && g.limit[1] == 0 && g.window[1] == 60, "rcpts 0/minute (unlimited) kept as set");
	ok(g.set[2] && g.limit[2] == 50ull << 20, "bytes unchanged");

	/* refusals */
	l.window[USERDB_LIMIT_RCPTS] = 0;
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == -1, "window 0 refused");
	l.window[USERDB_LIMIT_RCPTS] = 60;
	l.limit[USERDB_LIMIT_BYTES] = UINT64_MAX;
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == -1, "limit above INT64_MAX refused");
	l.limit[USERDB_LIMIT_BYTES] = 1000;
	err[0] = '\0';
	ok(userdb_limits_set(db, "nobody", &l, err, sizeof(err)) == -1, "set for unknown user fails");
	ok(strstr(err, "no such user") != NULL, "and says so: %s", err);
	memset(&l, 0, sizeof(l));
	err[0] = '\0';
	ok(userdb_limits_set(db, "nobody", &l, err, sizeof(err)) == -1,
	    "clear for unknown user fails");
	ok(strstr(err, "no such user") != NULL, "and says so: %s", err);
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == 0, "clear all");
	is_int(userdb_limits_get(db, "lim", &g), 0, "get cleared limits");
	ok(!g.set[0] && !g.set[1] && !g.set[2], "all unset after clear");
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == 0, "clear again is fine");

	/* a half-written pair (window NULL) reads as unset */
	ok(raw_exec(dbpath, "INSERT INTO limits (user, msgs) VALUES ('lim', 5)") == 0,
	    "write a count without a window directly");
	is_int(userdb_limits_get(db, "lim", &g), 0, "get half pair");
	ok(!g.set[0], "count without window: unset");

	/* cascade */
	l.set[USERDB_LIMIT_RCPTS] = true;
	l.limit[USERDB_LIMIT_RCPTS] = 10;
	l.window[USERDB_LIMIT_RCPTS] = 86400;
	ok(userdb_limits_set(db, "lim", &l, err, sizeof(err)) == 0, "set rcpts 10/day");
	ok(userdb_user_del(db, "lim", err, sizeof(err)) == 0, "delete user lim");
	ok(userdb_user_add(db, "lim", "pw", err, sizeof(err)) == 0, "re-add user lim");
	is_int(userdb_limits_get(db, "lim", &g), 0, "get limits of the new lim");
	ok(!g.set[0] && !g.set[1] && !g.set[2], "limits went with the old user (cascade)");
	userdb_user_del(db, "lim", err, sizeof(err));
	userdb_close(db);
}

static double now_sec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* an unknown user must cost a slow hash too, so timing does not reveal names */
static void test_timing(void)
{
	char err[256];
	struct userdb *db = userdb_open(dbpath, err, sizeof(err));
	double t0, bad = 0, unknown = 0;
	int i;

	if (!ok(db != NULL, "open for timing"))
		return;
	for (i = 0; i < 3; i++) {
		t0 = now_sec();
		userdb_check_password(db, "bob", "wrong");
		bad += now_sec() - t0;
		t0 = now_sec();
		userdb_check_password(db, "nobody", "wrong");
		unknown += now_sec() - t0;
	}
	diag("wrong password %.1f ms, unknown user %.1f ms", bad * 1000 / 3, unknown * 1000 / 3);
	ok(unknown > bad / 3 && unknown < bad * 3,
	    "unknown user takes about as long as a wrong password");
	userdb_close(db);
}

static void test_newer_schema(void)
{
	char path[600], want[200], err[256] = "";
	struct userdb *db;

	snprintf(path, sizeof(path), "%s/newer.db", tmpdir);
	db = userdb_open(path, err, sizeof(err));
	ok(db != NULL, "create a second database");
	userdb_close(db);
	ok(raw_exec(path, "PRAGMA user_version = 999") == 0, "set user_version 999");
	db = userdb_open(path, err, sizeof(err));
	ok(db == NULL, "newer schema refused");
	userdb_close(db);
	snprintf(want, sizeof(want),
	    "database schema version 999 is newer than this relayd (knows %d); upgrade relayd",
	    userdb_schema_version());
	is_str(err, want, "newer schema message");
	is_int(raw_user_version(path), 999, "refused database left untouched");
}

static void test_bad_path(void)
{
	char path[600], err[256] = "";
	struct userdb *db;

	snprintf(path, sizeof(path), "%s/no/such/dir/x.db", tmpdir);
	db = userdb_open(path, err, sizeof(err));
	ok(db == NULL && strstr(err, path) != NULL, "unopenable path fails naming it: %s", err);
}

static void test_passwd(void)
{
	char h[256];

	ok(passwd_hash("pw", h, sizeof(h)) == 0 && strncmp(h, "$y$", 3) == 0, "passwd_hash");
	ok(passwd_verify("pw", h), "passwd_verify right");
	ok(!passwd_verify("pW", h), "passwd_verify wrong");
	ok(!passwd_verify("pw", ""), "passwd_verify empty hash");
	ok(!passwd_verify("pw", "*"), "passwd_verify locked hash");
	ok(passwd_hash("pw", h, 10) == -1, "passwd_hash: short buffer refused");
}

static void test_sender_match(void)
{
	static const struct {
		const char *user;
		const char *addr;
		bool want;
	} cases[] = {
		{ "bob",               "bob@example.org",     true },   /* exact */
		{ "bob",               "BOB@Example.Org",     true },   /* case-insensitive */
		{ "bob",               "anyone@example.net",  true },   /* @domain */
		{ "bob",               "x@EXAMPLE.NET",       true },   /* @domain, case */
		{ "bob",               "x@sub.example.net",   false },  /* subdomain not matched */
		{ "bob",               "x@example.com",       false },  /* other domain */
		{ "bob",               "bob@example.org.evil", false },
		{ "bob",               "",                    false },  /* null sender */
		{ "bob",               "@example.net",        false },  /* no local part */
		{ "alice@example.com", "alice@example.com",   true },   /* own address */
		{ "alice@example.com", "Alice@Example.com",   true },
		{ "alice@example.com", "bob@example.com",     false },
		{ "alice@example.com", "",                    false },
	};
	char *pats[] = { "bob@example.org", "@example.net" };
	char *star[] = { "*" };
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ok(userdb_sender_match(cases[i].user, pats, 2, cases[i].addr) == cases[i].want,
		    "match user=%s addr=<%s> -> %s", cases[i].user, cases[i].addr,
		    cases[i].want ? "yes" : "no");
	ok(userdb_sender_match("bob", star, 1, "anyone@anywhere.example"), "* matches any");
	ok(!userdb_sender_match("bob", star, 1, ""), "* does not match the null sender");
	char *mta[] = { "@example.net", "<>" };
	ok(userdb_sender_match("relay", mta, 2, ""), "<> allows the null sender (an MTA's notices)");
	ok(userdb_sender_match("relay", mta, 2, "x@example.net") && !userdb_sender_match("relay", mta, 2, "x@example.org"),
	    "<> does not widen the other patterns");
	ok(userdb_pattern_valid("<>") && !userdb_pattern_valid("<x>") && !userdb_pattern_valid("<"),
	    "<> is a pattern, <x> and < are not");
	ok(!userdb_sender_match("bob", NULL, 0, "bob@example.org"), "no patterns: nothing");
	ok(!userdb_sender_match("alice@example.com", NULL, 0, "alice@example.org"),
	    "own address only, not the same local part elsewhere");
}

int main(void)
{
	char cmd[600];
	int rc;

	snprintf(tmpdir, sizeof(tmpdir), "%s/userdb-t.XXXXXX",
	    getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(dbpath, sizeof(dbpath), "%s/relayd.db", tmpdir);

	test_open_and_users();
	test_timing();
	test_limits();
	test_newer_schema();
	test_bad_path();
	test_passwd();
	test_sender_match();

	rc = done_testing();
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		diag("could not remove %s", tmpdir);
	return rc;
}
