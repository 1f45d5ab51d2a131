/*
 * userdb - users, password hashes, allowed senders and per-user limits in SQLite.
 * One struct userdb is one sqlite3 connection, used by one thread at a time (opened
 * without SQLite's own mutex; each worker thread opens its own). WAL journal, a 5 s
 * busy timeout, foreign keys on (deleting a user cascades to senders and limits).
 * Migrations (schema/NNN_name.sql, embedded by tools/embed-schema.sh) are applied on
 * open, one transaction each, PRAGMA user_version holding the last applied number; a
 * database newer than this build is refused rather than misread.
 * Invariants: all SQL goes through prepared statements with bound parameters; the file
 * is created 0600; userdb_check_password costs one slow hash whether or not the user
 * exists, so timing does not tell which names exist. Sender patterns are stored in
 * lower case (matching is case-insensitive). A limit is stored as a (count, window)
 * pair, both NULL when unset (relayd.conf's default applies).
 */
#include "userdb.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "passwd.h"
#include "schema_sql.h"
#include "utf8.h"

#define USERDB_BUSY_MS   5000
#define USERDB_NAME_MAX  255
#define USERDB_PAT_MAX   255
#define USERDB_HASH_MAX  256

/*
 * A yescrypt hash with the default cost of passwd_hash(), of a password nobody uses:
 * verified against for unknown or disabled users so they cost the same as a wrong password.
 */
static const char userdb_dummy_hash[] =
	"$y$j9T$n2UhNQyXqU/2Ho9uBmVHg0$JgsmTGcfGDo89BbE0Tn6CpWAnajTEt3/3U.wmIoL8o9";

/* the statements of the AUTH path, prepared once per connection (parsing the SQL again
 * for every AUTH was most of its cost) */
enum userdb_cached { UQ_BEGIN, UQ_COMMIT, UQ_USER, UQ_SENDERS, UQ_LIMITS, UQ_N };
static const char *const userdb_cached_sql[UQ_N] = {
	[UQ_BEGIN] = "BEGIN",
	[UQ_COMMIT] = "COMMIT",
	[UQ_USER] = "SELECT name, hash, created, pw_changed, coalesce(disabled, 0) FROM users WHERE name = ?",
	[UQ_SENDERS] = "SELECT pattern FROM senders WHERE user = ? ORDER BY pattern",
	[UQ_LIMITS] = "SELECT msgs, msgs_window, rcpts, rcpts_window, bytes, bytes_window FROM limits WHERE user = ?",
};

struct userdb {
	sqlite3 *db;
	sqlite3_stmt *cached[UQ_N];
};

/* a cached statement, prepared on first use; give it back with userdb_stmt_put */
static sqlite3_stmt *userdb_stmt_get(struct userdb *db, enum userdb_cached q)
{
	if (!db->cached[q] && sqlite3_prepare_v3(db->db, userdb_cached_sql[q], -1, SQLITE_PREPARE_PERSISTENT,
						 &db->cached[q], NULL) != SQLITE_OK)
		return NULL;
	return db->cached[q];
}

/* reset and unbound: a statement kept between uses holds no read transaction */
static void userdb_stmt_put(sqlite3_stmt *st)
{
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
}

/* BEGIN or COMMIT from the cache */
static int userdb_cached_exec(struct userdb *db, enum userdb_cached q)
{
	sqlite3_stmt *st = userdb_stmt_get(db, q);
	if (!st)
		return -1;
	int rc = sqlite3_step(st);
	userdb_stmt_put(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* run one statement without parameters that returns no rows we need */
static int userdb_exec1(sqlite3 *db, const char *sql)
{
	sqlite3_stmt *st;
	int rc;

	if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
		return -1;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		;
	sqlite3_finalize(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* run every statement of a migration script, one prepared statement at a time */
static int userdb_exec_script(sqlite3 *db, const char *sql)
{
	const char *tail = sql;
	sqlite3_stmt *st;
	int rc;

	while (tail && *tail) {
		if (sqlite3_prepare_v2(db, tail, -1, &st, &tail) != SQLITE_OK)
			return -1;
		if (!st)        /* only whitespace or comments were left */
			continue;
		while ((rc = sqlite3_step(st)) == SQLITE_ROW)
			;
		sqlite3_finalize(st);
		if (rc != SQLITE_DONE)
			return -1;
	}
	return 0;
}

static int userdb_user_version(sqlite3 *db, int *version)
{
	sqlite3_stmt *st;
	int rc;

	if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
		return -1;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		*version = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	return rc == SQLITE_ROW ? 0 : -1;
}

static int userdb_newer_check(int have, char *err, size_t errlen)
{
	int known = userdb_schema_version();

	if (have <= known)
		return 0;
	err_set(err, errlen,
	    "database schema version %d is newer than this relayd (knows %d); upgrade relayd",
	    have, known);
	return -1;
}

/* apply every migration above user_version, each in its own IMMEDIATE transaction */
static int userdb_migrate(sqlite3 *db, const char *path, char *err, size_t errlen)
{
	char pragma[64];
	int i, have;

	/* already current (every open but the first): no write lock, so an open while another
	 * program holds the write lock (a long relayctl, a backup) does not wait for it */
	if (userdb_user_version(db, &have) == 0 && have >= userdb_schema_version())
		return userdb_newer_check(have, err, errlen);
	for (i = 0; i < schema_migrations_count; i++) {
		const struct schema_migration *m = &schema_migrations[i];

		/* IMMEDIATE: relayd and relayctl starting together must not both apply it */
		if (userdb_exec1(db, "BEGIN IMMEDIATE") < 0) {
			err_set(err, errlen, "%s: cannot start migration: %s", path,
			    sqlite3_errmsg(db));
			return -1;
		}
		if (userdb_user_version(db, &have) < 0) {
			err_set(err, errlen, "%s: cannot read schema version: %s", path,
			    sqlite3_errmsg(db));
			goto fail;
		}
		if (userdb_newer_check(have, err, errlen) < 0)
			goto fail;
		if (have >= m->version) {
			userdb_exec1(db, "ROLLBACK");
			continue;
		}
		/* PRAGMA takes no bound parameters; the number is our own constant */
		snprintf(pragma, sizeof(pragma), "PRAGMA user_version = %d", m->version);
		if (userdb_exec_script(db, m->sql) < 0 || userdb_exec1(db, pragma) < 0) {
			err_set(err, errlen, "%s: migration %s failed: %s", path, m->name,
			    sqlite3_errmsg(db));
			goto fail;
		}
		if (userdb_exec1(db, "COMMIT") < 0) {
			err_set(err, errlen, "%s: migration %s: commit failed: %s", path,
			    m->name, sqlite3_errmsg(db));
			goto fail;
		}
	}
	return 0;
fail:
	userdb_exec1(db, "ROLLBACK");
	return -1;
}

/* userdb_schema_version - the version this build applies (highest migration number) */
int userdb_schema_version(void)
{
	if (schema_migrations_count <= 0)
		return 0;
	return schema_migrations[schema_migrations_count - 1].version;
}

/* userdb_set_busy_ms - sqlite3_busy_timeout of the connection */
void userdb_set_busy_ms(struct userdb *db, int ms)
{
	sqlite3_busy_timeout(db->db, ms);
}

/* userdb_open - open (creating if needed) and migrate; NULL with err set on failure */
struct userdb *userdb_open(const char *path, char *err, size_t errlen)
{
	struct userdb *u;
	sqlite3 *db = NULL;
	int fd, have;

	if (!path || !*path) {
		err_set(err, errlen, "no database path configured");
		return NULL;
	}
	/*
	 * Create a new file ourselves, 0600, rather than change the process umask (other
	 * threads may be creating files). SQLite gives its -wal and -shm files the mode
	 * of the database file.
	 * Never open()+close() an existing database file here: close() drops every POSIX
	 * lock this process holds on it, including those of other open connections (the
	 * auth workers'), after which another process's close believes it is the last
	 * user, checkpoints and deletes the WAL and shm under them: they read stale data
	 * from then on, and their writes are lost (sqlite.org/howtocorrupt.html, 2.2).
	 * O_EXCL: we only ever close a file we just created.
	 */
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd >= 0) {
		close(fd);
	} else if (errno != EEXIST) {
		err_set(err, errlen, "%s: cannot open: %s", path, strerror(errno));
		return NULL;
	}

	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
	    NULL) != SQLITE_OK) {
		err_set(err, errlen, "%s: cannot open database: %s", path,
		    db ? sqlite3_errmsg(db) : "out of memory");
		goto fail;
	}
	sqlite3_extended_result_codes(db, 1);
	sqlite3_busy_timeout(db, USERDB_BUSY_MS);

	/* refuse a newer schema before touching anything, WAL mode included */
	if (userdb_user_version(db, &have) < 0) {
		err_set(err, errlen, "%s: not a usable SQLite database: %s", path,
		    sqlite3_errmsg(db));
		goto fail;
	}
	if (userdb_newer_check(have, err, errlen) < 0)
		goto fail;
	if (userdb_exec1(db, "PRAGMA journal_mode = WAL") < 0 ||
	    userdb_exec1(db, "PRAGMA foreign_keys = ON") < 0) {
		err_set(err, errlen, "%s: cannot set up database: %s", path,
		    sqlite3_errmsg(db));
		goto fail;
	}
	if (userdb_migrate(db, path, err, errlen) < 0)
		goto fail;

	if (!(u = calloc(1, sizeof(*u)))) {
		err_set(err, errlen, "out of memory");
		goto fail;
	}
	u->db = db;
	return u;
fail:
	sqlite3_close(db);
	return NULL;
}

/* userdb_close - close the connection */
void userdb_close(struct userdb *db)
{
	if (!db)
		return;
	for (int i = 0; i < UQ_N; i++)
		sqlite3_finalize(db->cached[i]);
	sqlite3_close(db->db);
	free(db);
}

/* userdb_name_valid - 1..255 bytes of UTF-8, no space, colon or control character (C0, DEL,
 * C1): a name that passes can be logged as it is */
bool userdb_name_valid(const char *name)
{
	size_t i;

	if (!name || !*name)
		return false;
	for (i = 0; name[i]; i++) {
		unsigned char c = (unsigned char)name[i];

		if (i >= USERDB_NAME_MAX)
			return false;
		if (c <= ' ' || c == 0x7f || c == ':')
			return false;
	}
	return utf8_clean(name); /* UTF-8 names and addresses (RFC 6531) */
}

static bool userdb_addr_chars_ok(const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c <= ' ' || c == 0x7f || c == '<' || c == '>' || c == ',')
			return false;
	}
	return true;
}

/* userdb_pattern_valid - "*", "<>", "@domain" or "local@domain" (one '@', both sides non-empty) */
bool userdb_pattern_valid(const char *pattern)
{
	const char *at;

	if (!pattern || !*pattern || strlen(pattern) > USERDB_PAT_MAX)
		return false;
	if (strcmp(pattern, "*") == 0 || strcmp(pattern, "<>") == 0)
		return true;
	if (!userdb_addr_chars_ok(pattern) || strchr(pattern, '*'))
		return false;
	at = strchr(pattern, '@');
	if (!at || strchr(at + 1, '@') || at[1] == '\0')
		return false;
	return true;    /* at == pattern is "@domain" */
}

static void userdb_lower(char *dst, const char *src, size_t dstlen)
{
	size_t i;

	for (i = 0; src[i] && i + 1 < dstlen; i++)
		dst[i] = (char)tolower((unsigned char)src[i]);
	dst[i] = '\0';
}

static int userdb_name_check(const char *name, char *err, size_t errlen)
{
	if (userdb_name_valid(name))
		return 0;
	if (!name || !*name)
		err_set(err, errlen, "user name is empty");
	else if (strlen(name) > USERDB_NAME_MAX)
		err_set(err, errlen, "user name is longer than %d characters",
		    USERDB_NAME_MAX);
	else
		err_set(err, errlen,
		    "user name must be UTF-8 without spaces, colons or control characters");
	return -1;
}

/* run a prepared write statement and finalize it: the rows changed, or -1 with err */
static int userdb_write(struct userdb *db, sqlite3_stmt *st, char *err, size_t errlen)
{
	int rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	return sqlite3_changes(db->db);
}

/* a fresh salted hash of a new password (refusing an empty one) */
static int userdb_hash_new(const char *password, char *hash, size_t hashlen, char *err, size_t errlen)
{
	if (!password || !*password) {
		err_set(err, errlen, "empty password");
		return -1;
	}
	if (passwd_hash(password, hash, hashlen) < 0) {
		err_set(err, errlen, "cannot hash the password");
		return -1;
	}
	return 0;
}

/* userdb_user_add - add a user with a password (hashed here); -1 with err if it exists or fails */
int userdb_user_add(struct userdb *db, const char *name, const char *password, char *err,
    size_t errlen)
{
	char hash[USERDB_HASH_MAX];
	sqlite3_stmt *st;
	time_t now = time(NULL);
	int rc;

	if (userdb_name_check(name, err, errlen) < 0)
		return -1;
	if (userdb_hash_new(password, hash, sizeof(hash), err, errlen) < 0)
		return -1;
	if (sqlite3_prepare_v2(db->db,
	    "INSERT INTO users (name, hash, created, pw_changed) VALUES (?, ?, ?, ?)",
	    -1, &st, NULL) != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, hash, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
	sqlite3_bind_int64(st, 4, (sqlite3_int64)now);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc == SQLITE_DONE)
		return 0;
	if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE)
		err_set(err, errlen, "user %s already exists", name);
	else
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
	return -1;
}

/* userdb_user_passwd - change a password; -1 if no such user */
int userdb_user_passwd(struct userdb *db, const char *name, const char *password, char *err,
    size_t errlen)
{
	char hash[USERDB_HASH_MAX];
	sqlite3_stmt *st;
	int rc;

	if (!name || !*name) {
		err_set(err, errlen, "user name is empty");
		return -1;
	}
	if (userdb_hash_new(password, hash, sizeof(hash), err, errlen) < 0)
		return -1;
	if (sqlite3_prepare_v2(db->db,
	    "UPDATE users SET hash = ?, pw_changed = ? WHERE name = ?",
	    -1, &st, NULL) != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, hash, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 2, (sqlite3_int64)time(NULL));
	sqlite3_bind_text(st, 3, name, -1, SQLITE_STATIC);
	rc = userdb_write(db, st, err, errlen);
	if (rc == 0)
		err_set(err, errlen, "no such user: %s", name);
	return rc > 0 ? 0 : -1;
}

/* userdb_user_del - delete a user and their senders and limits; -1 if no such user */
int userdb_user_del(struct userdb *db, const char *name, char *err, size_t errlen)
{
	sqlite3_stmt *st;
	int rc;

	if (!name || !*name) {
		err_set(err, errlen, "user name is empty");
		return -1;
	}
	if (sqlite3_prepare_v2(db->db, "DELETE FROM users WHERE name = ?", -1, &st,
	    NULL) != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	rc = userdb_write(db, st, err, errlen);
	if (rc == 0)
		err_set(err, errlen, "no such user: %s", name);
	return rc > 0 ? 0 : -1;
}

static int userdb_senders_load(struct userdb *db, struct userdb_user *u)
{
	sqlite3_stmt *st;
	size_t cap = 0;
	int rc;

	if (!(st = userdb_stmt_get(db, UQ_SENDERS)))
		return -1;
	sqlite3_bind_text(st, 1, u->name, -1, SQLITE_STATIC);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *p = (const char *)sqlite3_column_text(st, 0);
		char *dup;

		if (!p)
			continue;
		if (u->nsenders == cap) {
			size_t ncap = cap ? cap * 2 : 4;
			char **n = realloc(u->senders, ncap * sizeof(*n));

			if (!n)
				break;
			u->senders = n;
			cap = ncap;
		}
		if (!(dup = strdup(p)))
			break;
		u->senders[u->nsenders++] = dup;
	}
	userdb_stmt_put(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* userdb_user_get - fetch a user with their sender patterns; 0 found, 1 not found, -1 error */
int userdb_user_get(struct userdb *db, const char *name, struct userdb_user *u)
{
	sqlite3_stmt *st;
	const char *n, *h;
	int rc, ret = -1;

	memset(u, 0, sizeof(*u));
	if (!name)
		return 1;
	/* one read transaction: the user and their senders as of one moment */
	if (userdb_cached_exec(db, UQ_BEGIN) < 0)
		return -1;
	if (!(st = userdb_stmt_get(db, UQ_USER)))
		goto out;
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_DONE) {
		ret = 1;
	} else if (rc == SQLITE_ROW) {
		n = (const char *)sqlite3_column_text(st, 0);
		h = (const char *)sqlite3_column_text(st, 1);
		if (n && h && strlen(n) < sizeof(u->name) && strlen(h) < sizeof(u->hash)) {
			strcpy(u->name, n);
			strcpy(u->hash, h);
			u->created = sqlite3_column_int64(st, 2);
			u->pw_changed = sqlite3_column_int64(st, 3);
			u->disabled = sqlite3_column_int64(st, 4) != 0;
			ret = 0;
		}
	}
	userdb_stmt_put(st);
	if (ret == 0 && userdb_senders_load(db, u) < 0) {
		userdb_user_free(u);
		ret = -1;
	}
out:
	userdb_cached_exec(db, UQ_COMMIT);
	if (ret != 0)
		memset(u, 0, sizeof(*u));
	return ret;
}

/* userdb_user_free - release what userdb_user_get allocated */
void userdb_user_free(struct userdb_user *u)
{
	size_t i;

	if (!u)
		return;
	for (i = 0; i < u->nsenders; i++)
		free(u->senders[i]);
	free(u->senders);
	u->senders = NULL;
	u->nsenders = 0;
}

/* userdb_user_list - call fn for each user name, in name order; -1 on error */
int userdb_user_list(struct userdb *db, void (*fn)(const char *name, void *arg), void *arg)
{
	sqlite3_stmt *st;
	int rc;

	if (sqlite3_prepare_v2(db->db, "SELECT name FROM users ORDER BY name", -1, &st,
	    NULL) != SQLITE_OK)
		return -1;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *n = (const char *)sqlite3_column_text(st, 0);

		if (n)
			fn(n, arg);
	}
	sqlite3_finalize(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* userdb_sender_add - allow a sender pattern for a user; -1 with err on failure */
int userdb_sender_add(struct userdb *db, const char *name, const char *pattern, char *err,
    size_t errlen)
{
	char pat[USERDB_PAT_MAX + 1];
	sqlite3_stmt *st;
	int rc;

	if (!name || !*name) {
		err_set(err, errlen, "user name is empty");
		return -1;
	}
	if (!userdb_pattern_valid(pattern)) {
		err_set(err, errlen,
		    "bad sender pattern \"%s\": expected user@domain, @domain, * or <>",
		    pattern ? pattern : "");
		return -1;
	}
	userdb_lower(pat, pattern, sizeof(pat));
	if (sqlite3_prepare_v2(db->db, "INSERT INTO senders (user, pattern) VALUES (?, ?)",
	    -1, &st, NULL) != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, pat, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc == SQLITE_DONE)
		return 0;
	if (rc == SQLITE_CONSTRAINT_FOREIGNKEY)
		err_set(err, errlen, "no such user: %s", name);
	else if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE)
		err_set(err, errlen, "%s may already send as %s", name, pat);
	else
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
	return -1;
}

static int userdb_user_exists(struct userdb *db, const char *name);

/* userdb_sender_del - remove a sender pattern; -1 with err if it was not there */
int userdb_sender_del(struct userdb *db, const char *name, const char *pattern, char *err,
    size_t errlen)
{
	char pat[USERDB_PAT_MAX + 1];
	sqlite3_stmt *st;
	int rc;

	if (!name || !*name || !pattern || !*pattern || strlen(pattern) > USERDB_PAT_MAX) {
		err_set(err, errlen, "bad user name or sender pattern");
		return -1;
	}
	userdb_lower(pat, pattern, sizeof(pat));
	if (sqlite3_prepare_v2(db->db, "DELETE FROM senders WHERE user = ? AND pattern = ?",
	    -1, &st, NULL) != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, pat, -1, SQLITE_STATIC);
	rc = userdb_write(db, st, err, errlen);
	if (rc == 0 && userdb_user_exists(db, name) == 1)
		err_set(err, errlen, "%s has no sender pattern %s", name, pat);
	else if (rc == 0)
		err_set(err, errlen, "no such user: %s", name);
	return rc > 0 ? 0 : -1;
}

/* 1 if the user exists, 0 if not or on error */
static int userdb_user_exists(struct userdb *db, const char *name)
{
	sqlite3_stmt *st;
	int rc;

	if (sqlite3_prepare_v2(db->db, "SELECT 1 FROM users WHERE name = ?", -1, &st,
	    NULL) != SQLITE_OK)
		return 0;
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	return rc == SQLITE_ROW;
}

/* userdb_limits_get - a user's limit overrides; 0 (all unset when there is no row), -1 error */
int userdb_limits_get(struct userdb *db, const char *name, struct userdb_limits *l)
{
	sqlite3_stmt *st;
	int rc, i;

	memset(l, 0, sizeof(*l));
	if (!name || !*name)
		return 0;
	if (!(st = userdb_stmt_get(db, UQ_LIMITS)))
		return -1;
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		for (i = 0; i < USERDB_NLIMITS; i++) {
			sqlite3_int64 lim, win;

			/* a pair is set only when both halves are there and make sense */
			if (sqlite3_column_type(st, 2 * i) == SQLITE_NULL ||
			    sqlite3_column_type(st, 2 * i + 1) == SQLITE_NULL)
				continue;
			lim = sqlite3_column_int64(st, 2 * i);
			win = sqlite3_column_int64(st, 2 * i + 1);
			if (lim < 0 || win <= 0 || win > (sqlite3_int64)UINT32_MAX)
				continue;
			l->limit[i] = (uint64_t)lim;
			l->window[i] = (uint32_t)win;
			l->set[i] = true;
		}
	}
	userdb_stmt_put(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
		memset(l, 0, sizeof(*l));
		return -1;
	}
	return 0;
}

/* userdb_limits_set - replace a user's overrides with l (no row when all are unset) */
int userdb_limits_set(struct userdb *db, const char *name, const struct userdb_limits *l,
    char *err, size_t errlen)
{
	static const char *const what[USERDB_NLIMITS] = { "msgs", "rcpts", "bytes" };
	sqlite3_stmt *st;
	bool any = false;
	int rc, i;

	if (!name || !*name) {
		err_set(err, errlen, "user name is empty");
		return -1;
	}
	for (i = 0; i < USERDB_NLIMITS; i++) {
		if (!l->set[i])
			continue;
		if (l->window[i] == 0) {
			err_set(err, errlen, "%s: the window must be at least one second",
			    what[i]);
			return -1;
		}
		if (l->limit[i] > (uint64_t)INT64_MAX) {
			err_set(err, errlen, "%s: limit too large", what[i]);
			return -1;
		}
		any = true;
	}
	if (any)
		rc = sqlite3_prepare_v2(db->db,
		    "INSERT INTO limits (user, msgs, msgs_window, rcpts, rcpts_window, bytes,"
		    " bytes_window) SELECT name, ?, ?, ?, ?, ?, ? FROM users WHERE name = ?"
		    " ON CONFLICT (user) DO UPDATE SET msgs = excluded.msgs,"
		    " msgs_window = excluded.msgs_window, rcpts = excluded.rcpts,"
		    " rcpts_window = excluded.rcpts_window, bytes = excluded.bytes,"
		    " bytes_window = excluded.bytes_window", -1, &st, NULL);
	else
		rc = sqlite3_prepare_v2(db->db,
		    "DELETE FROM limits WHERE user = (SELECT name FROM users WHERE name = ?)",
		    -1, &st, NULL);
	if (rc != SQLITE_OK) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	if (any) {
		for (i = 0; i < USERDB_NLIMITS; i++) {
			if (l->set[i]) {
				sqlite3_bind_int64(st, 2 * i + 1, (sqlite3_int64)l->limit[i]);
				sqlite3_bind_int64(st, 2 * i + 2, (sqlite3_int64)l->window[i]);
			} else {
				sqlite3_bind_null(st, 2 * i + 1);
				sqlite3_bind_null(st, 2 * i + 2);
			}
		}
		sqlite3_bind_text(st, 7, name, -1, SQLITE_STATIC);
	} else {
		sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	}
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE) {
		err_set(err, errlen, "database: %s", sqlite3_errmsg(db->db));
		return -1;
	}
	/* the INSERT ... SELECT wrote nothing when the user does not exist; the DELETE may
	 * write nothing for an existing user without overrides, so ask */
	if (sqlite3_changes(db->db) == 0 && (any || !userdb_user_exists(db, name))) {
		err_set(err, errlen, "no such user: %s", name);
		return -1;
	}
	return 0;
}

/* userdb_check_password - check name/password against the stored salted slow hash (slow: call off the loop) */
enum userdb_check userdb_check_password(struct userdb *db, const char *name, const char *password)
{
	char hash[USERDB_HASH_MAX];
	sqlite3_stmt *st;
	bool found = false;
	int rc;

	if (!password)
		password = "";
	if (name && *name) {
		if (sqlite3_prepare_v2(db->db,
		    "SELECT hash FROM users WHERE name = ? AND NOT coalesce(disabled, 0)",
		    -1, &st, NULL) != SQLITE_OK)
			return USERDB_ERROR;
		sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
		rc = sqlite3_step(st);
		if (rc == SQLITE_ROW) {
			const char *h = (const char *)sqlite3_column_text(st, 0);

			if (h && strlen(h) < sizeof(hash)) {
				strcpy(hash, h);
				found = true;
			}
		}
		sqlite3_finalize(st);
		if (rc != SQLITE_ROW && rc != SQLITE_DONE)
			return USERDB_ERROR;
	}
	if (!found) {
		/* same cost as a wrong password: the answer must not tell names apart */
		(void)passwd_verify(password, userdb_dummy_hash);
		return USERDB_NO_USER;
	}
	return passwd_verify(password, hash) ? USERDB_OK : USERDB_BAD_PASSWORD;
}

/* the domain part of an address (after the last '@'), or NULL */
static const char *userdb_addr_domain(const char *addr)
{
	const char *at = strrchr(addr, '@');

	return at ? at + 1 : NULL;
}

/* userdb_sender_match - pure: may a user with these patterns send as addr? */
bool userdb_sender_match(const char *username, char *const *patterns, size_t n, const char *addr)
{
	const char *dom;
	size_t i;

	if (!addr)
		return false;
	if (!*addr) {    /* the null sender only with "<>" (an MTA's notices), not with "*" */
		for (i = 0; i < n; i++)
			if (patterns[i] && strcmp(patterns[i], "<>") == 0)
				return true;
		return false;
	}
	if (username && strchr(username, '@') && strcasecmp(username, addr) == 0)
		return true;
	dom = userdb_addr_domain(addr);
	for (i = 0; i < n; i++) {
		const char *p = patterns[i];

		if (!p || !*p)
			continue;
		if (strcmp(p, "*") == 0)
			return true;
		if (p[0] == '@') {
			if (dom && dom > addr + 1 && *dom && strcasecmp(dom, p + 1) == 0)
				return true;
		} else if (strcasecmp(p, addr) == 0) {
			return true;
		}
	}
	return false;
}
