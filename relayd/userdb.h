/*
 * userdb - users, password hashes, allowed senders and per-user limits in SQLite.
 * One struct userdb wraps one sqlite3 connection; a connection is used by one thread at a
 * time (each worker thread opens its own). Migrations from schema/ are applied on open;
 * a database whose schema is newer than this build knows is refused.
 * All SQL is prepared statements.
 */
#ifndef RELAYD_USERDB_H
#define RELAYD_USERDB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct userdb;

enum userdb_check {
	USERDB_OK,            /* password matches */
	USERDB_BAD_PASSWORD,  /* user exists, password wrong */
	USERDB_NO_USER,       /* no such user (or disabled) */
	USERDB_ERROR          /* database error (temporary failure) */
};

struct userdb_user {
	char name[256];
	char hash[256];
	int64_t created;        /* unix time */
	int64_t pw_changed;     /* unix time of last password change */
	bool disabled;          /* users.disabled set: may not authenticate at all */
	char **senders;         /* allowed sender patterns (address, @domain, *) */
	size_t nsenders;
};

/* userdb_open - open (creating if needed) and migrate; NULL with err set on failure */
struct userdb *userdb_open(const char *path, char *err, size_t errlen);
/* userdb_set_busy_ms - how long a statement waits for another connection's lock (0: not at
 * all, SQLITE_BUSY at once, as the loop thread's connection must) */
void userdb_set_busy_ms(struct userdb *db, int ms);
/* userdb_close - close the connection */
void userdb_close(struct userdb *db);
/* userdb_schema_version - the version this build applies (highest migration number) */
int userdb_schema_version(void);

/* userdb_user_add - add a user with a password (hashed here); -1 with err if it exists or fails */
int userdb_user_add(struct userdb *db, const char *name, const char *password, char *err, size_t errlen);
/* userdb_user_passwd - change a password; -1 if no such user */
int userdb_user_passwd(struct userdb *db, const char *name, const char *password, char *err, size_t errlen);
/* userdb_user_del - delete a user and their senders and limits; -1 if no such user */
int userdb_user_del(struct userdb *db, const char *name, char *err, size_t errlen);
/* userdb_user_get - fetch a user with their sender patterns; 0 found, 1 not found, -1 error */
int userdb_user_get(struct userdb *db, const char *name, struct userdb_user *u);
/* userdb_user_free - release what userdb_user_get allocated */
void userdb_user_free(struct userdb_user *u);
/* userdb_user_list - call fn for each user name, in name order; -1 on error */
int userdb_user_list(struct userdb *db, void (*fn)(const char *name, void *arg), void *arg);

/* userdb_sender_add - allow a sender pattern for a user; -1 with err on failure */
int userdb_sender_add(struct userdb *db, const char *name, const char *pattern, char *err, size_t errlen);
/* userdb_sender_del - remove a sender pattern; -1 with err if it was not there */
int userdb_sender_del(struct userdb *db, const char *name, const char *pattern, char *err, size_t errlen);

/* per-user rate limit overrides; index USERDB_LIMIT_MSGS, _RCPTS, _BYTES */
enum { USERDB_LIMIT_MSGS, USERDB_LIMIT_RCPTS, USERDB_LIMIT_BYTES, USERDB_NLIMITS };

struct userdb_limits {
	uint64_t limit[USERDB_NLIMITS];   /* units per window; 0 = unlimited */
	uint32_t window[USERDB_NLIMITS];  /* seconds (> 0 when set) */
	bool set[USERDB_NLIMITS];         /* false: use the relayd.conf default */
};

/* userdb_limits_get - a user's limit overrides; 0 (all unset when there is no row), -1 error */
int userdb_limits_get(struct userdb *db, const char *name, struct userdb_limits *l);
/* userdb_limits_set - replace a user's overrides with l (unset ones stored as NULL; no row
 * when all are unset); -1 with err if no such user, a window is 0 or a limit too large */
int userdb_limits_set(struct userdb *db, const char *name, const struct userdb_limits *l,
    char *err, size_t errlen);

/* userdb_check_password - check name/password against the stored salted slow hash (slow: call off the loop) */
enum userdb_check userdb_check_password(struct userdb *db, const char *name, const char *password);

/* userdb_name_valid - a user name is 1..255 bytes of well-formed UTF-8 without spaces, colons or control
 * characters (C0, DEL, C1) */
bool userdb_name_valid(const char *name);
/* userdb_pattern_valid - a sender pattern is "*", "<>" (the null sender), "@domain" or "local@domain" (one '@', both parts non-empty) */
bool userdb_pattern_valid(const char *pattern);

/* userdb_sender_match - pure: may a user with these patterns send as addr?
 * patterns: "user@example.org" (exact, case-insensitive), "@example.org" (the domain), "*" (any).
 * A user whose name is an address may always use that address. "" (null sender) is never allowed. */
bool userdb_sender_match(const char *username, char *const *patterns, size_t n, const char *addr);

#endif
