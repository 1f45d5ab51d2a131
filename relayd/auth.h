/*
 * auth - SMTP AUTH (RFC 4954) through Cyrus SASL's server side, mechanisms PLAIN and LOGIN.
 * A SASL step runs on a worker thread (the password check is a slow hash against SQLite);
 * the result comes back on the loop to the session found again by its id. One exception:
 * an AUTH PLAIN with its initial response is first tried on the loop, where only the
 * verified-credential cache may answer it (a cache miss, a wrong password, an unknown user
 * or a busy database hands it, unchanged, to a worker): the slow hash never runs there.
 */
#ifndef RELAYD_AUTH_H
#define RELAYD_AUTH_H

#include <sasl/sasl.h>
#include <sasl/saslutil.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "policy.h"
#include "userdb.h"
#include "workq.h"

struct config;

enum auth_result {
	AUTH_OK,        /* 235: authenticated as ->user */
	AUTH_CONTINUE,  /* 334 ->challenge */
	AUTH_FAIL,      /* 535 5.7.8 */
	AUTH_TEMPFAIL,  /* 454 4.7.0 (database error) */
	AUTH_BADMECH,   /* 504 5.5.4 */
	AUTH_BADPROT    /* 501 5.5.2 malformed exchange */
};

struct auth_req {
	struct workq_job job;
	uint64_t session_id;
	void (*cb)(struct auth_req *r);   /* on the loop when the step is done */
	sasl_conn_t *sasl;
	sasl_callback_t callbacks[2];      /* SASL keeps a pointer to these */
	bool start;                        /* sasl_server_start (else step) */
	char mech[32];
	char *input;                       /* decoded client data (wiped after use) */
	unsigned inlen;
	bool have_input;
	unsigned responses;                /* client data decoded so far (LOGIN: the first is the name) */
	/* results */
	enum auth_result result;
	char challenge[1024];              /* base64 server challenge for 334 */
	char user[256];
	char attempted[256];               /* the user name the client tried (for lockouts) */
	struct userdb_user found;          /* that user's record, read by the password check */
	bool have_found;
	struct policy_limits limits;       /* defaults from relayd.conf, overridden per user */
	char **senders;                    /* allowed sender patterns of user */
	size_t nsenders;
	int check;                         /* enum userdb_check of the last password check, -1 none */
	char hostname[256];                /* for a fresh SASL connection after a loop try */
	bool inline_try;                   /* this step runs on the loop: the cache only */
	bool inline_miss;                  /* ... and it could not answer: a worker will */
	bool cached;                       /* the password check was a credential-cache hit */
};

/* auth_init - sasl_server_init with our options; remembers the database path */
int auth_init(const struct config *cfg, char *err, size_t errlen);
/* auth_use_loop_db - the loop thread's database connection, for AUTH PLAIN answered from the
 * credential cache on the loop; its busy timeout is set to 0 (never wait on the loop). NULL:
 * every step on a worker */
void auth_use_loop_db(struct userdb *db);
/* auth_req_new - a request for a session (creates the SASL connection) */
struct auth_req *auth_req_new(uint64_t session_id, const char *hostname);
/* auth_submit - run the next step off the loop; r->cb is called with the result */
void auth_submit(struct auth_req *r);
/* auth_req_free - dispose of the SASL connection, wipe and free */
void auth_req_free(struct auth_req *r);
/* auth_senders_free - free a sender list taken from a request */
void auth_senders_free(char **senders, size_t n);
/* auth_mech_supported - PLAIN or LOGIN (case-insensitive) */
bool auth_mech_supported(const char *mech);

#endif
