/*
 * auth - Cyrus SASL server glue (RFC 4954).
 * Passwords are checked by our SASL_CB_SERVER_USERDB_CHECKPASS callback against the salted
 * slow hashes in SQLite (userdb); Cyrus's own verifiers are switched off by naming a
 * pwcheck_method that does not exist, so a system sasldb or saslauthd is never consulted.
 * Threads: SASL steps run on workq threads, each with its own userdb connection. A request
 * is touched by one thread at a time (the loop, or the worker running it). An AUTH PLAIN
 * with an initial response is tried on the loop first (auth_try_inline) with the loop's own
 * connection: only a credential-cache hit may succeed there; anything else (a miss, a wrong
 * password, no such user, SQLITE_BUSY) is redone from the start on a worker, so a failure,
 * the slow hash and the timing of both are the worker path's.
 * Secrets: decoded client data is wiped after each step; no password is ever logged.
 */
#include "auth.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "config.h"
#include "credcache.h"
#include "log.h"
#include "userdb.h"

static char auth_dbpath[PATH_MAX];
static __thread struct userdb *auth_db;   /* a worker's connection */
static struct userdb *auth_loop_db;       /* the loop's (busy timeout 0), or NULL */
static pthread_key_t auth_db_key;   /* closes a worker's connection when the thread exits */

static void auth_db_close(void *db)
{
	userdb_close(db);
}
static pthread_mutex_t auth_conn_lock = PTHREAD_MUTEX_INITIALIZER;

static int auth_getopt(void *ctx, const char *plugin, const char *option, const char **result, unsigned *len)
{
	(void)ctx; (void)plugin;
	if (!strcmp(option, "mech_list"))
		*result = "PLAIN LOGIN";
	else if (!strcmp(option, "pwcheck_method"))
		*result = "relayd-userdb"; /* no such verifier: only our callback decides */
	else if (!strcmp(option, "auxprop_plugin"))
		*result = "relayd-none";
	else
		return SASL_FAIL;
	if (len)
		*len = (unsigned)strlen(*result);
	return SASL_OK;
}

static int auth_sasl_log(void *ctx, int level, const char *message)
{
	(void)ctx;
	if (level <= SASL_LOG_ERR && !strstr(message, "password verifier") && !strstr(message, "auxprop"))
		log_debug("auth event=sasl-log level=%d message=\"%s\"", level, message);
	return SASL_OK;
}

static void *auth_mutex_alloc(void)
{
	pthread_mutex_t *m = malloc(sizeof(*m));
	if (m)
		pthread_mutex_init(m, NULL);
	return m;
}
static int auth_mutex_lock(void *m) { return pthread_mutex_lock(m) ? SASL_FAIL : SASL_OK; }
static int auth_mutex_unlock(void *m) { return pthread_mutex_unlock(m) ? SASL_FAIL : SASL_OK; }
static void auth_mutex_free(void *m) { pthread_mutex_destroy(m); free(m); }

static const sasl_callback_t auth_global_cb[] = {
	{ SASL_CB_GETOPT, (int (*)(void))(void (*)(void))auth_getopt, NULL },
	{ SASL_CB_LOG, (int (*)(void))(void (*)(void))auth_sasl_log, NULL },
	{ SASL_CB_LIST_END, NULL, NULL },
};

/* auth_init - initialise Cyrus SASL's server side */
int auth_init(const struct config *cfg, char *err, size_t errlen)
{
	snprintf(auth_dbpath, sizeof(auth_dbpath), "%s", cfg->database);
	if (pthread_key_create(&auth_db_key, auth_db_close) != 0) {
		snprintf(err, errlen, "pthread_key_create failed");
		return -1;
	}
	if (credcache_init(cfg->auth_cache_ttl) < 0) {
		snprintf(err, errlen, "cannot make the credential cache key");
		return -1;
	}
	sasl_set_mutex(auth_mutex_alloc, auth_mutex_lock, auth_mutex_unlock, auth_mutex_free);
	int rc = sasl_server_init(auth_global_cb, "relayd");
	if (rc != SASL_OK) {
		snprintf(err, errlen, "sasl_server_init: %s", sasl_errstring(rc, NULL, NULL));
		return -1;
	}
	const char **mechs = sasl_global_listmech();
	bool plain = false, login = false;
	for (int i = 0; mechs && mechs[i]; i++) {
		plain |= !strcasecmp(mechs[i], "PLAIN");
		login |= !strcasecmp(mechs[i], "LOGIN");
	}
	if (!plain || !login) {
		snprintf(err, errlen, "Cyrus SASL PLAIN/LOGIN plugins missing: install the Debian package libsasl2-modules");
		return -1;
	}
	return 0;
}

/* the connection of the thread running r's step: the loop's, or this worker's (opened once) */
static struct userdb *auth_thread_db(const struct auth_req *r)
{
	if (r->inline_try)
		return auth_loop_db;
	if (!auth_db) {
		char err[256];
		auth_db = userdb_open(auth_dbpath, err, sizeof(err));
		if (auth_db)
			pthread_setspecific(auth_db_key, auth_db);
		else
			log_err("auth event=db-open-failed error=\"%s\"", err);
	}
	return auth_db;
}

/* the password check, called by SASL inside a step (on a worker, or tried on the loop) */
static int auth_checkpass(sasl_conn_t *conn, void *ctx, const char *user, const char *pass, unsigned passlen,
			  struct propctx *propctx)
{
	struct auth_req *r = ctx;
	(void)conn; (void)propctx;
	struct userdb *db = auth_thread_db(r);
	if (!db) {
		r->check = USERDB_ERROR;
		return SASL_FAIL;
	}
	snprintf(r->attempted, sizeof(r->attempted), "%s", user);
	char *pw = strndup(pass, passlen);
	if (!pw) {
		r->check = USERDB_ERROR;
		return SASL_NOMEM;
	}
	/* the verified-credential cache first: one indexed lookup instead of a slow hash; a
	 * disabled user is no user here, so the slow path refuses them like an unknown name */
	struct userdb_user u;
	bool have_user = userdb_user_get(db, user, &u) == 0;
	if (have_user && u.disabled) {
		userdb_user_free(&u);
		have_user = false;
	}
	time_t now = time(NULL);
	if (have_user && credcache_check(user, pw, u.hash, now)) {
		r->check = USERDB_OK;
		r->cached = true;
	} else if (r->inline_try) {
		r->inline_miss = true; /* the slow hash, and every failure, happen on a worker */
		r->check = USERDB_ERROR;
	} else {
		r->check = (int)userdb_check_password(db, user, pw);
		if (r->check == USERDB_OK && have_user)
			credcache_put(user, pw, u.hash, now);
	}
	if (have_user) { /* kept for auth_load_user: one lookup per AUTH, not two */
		if (r->have_found)
			userdb_user_free(&r->found);
		r->found = u;
		r->have_found = true;
	}
	explicit_bzero(pw, passlen);
	free(pw);
	switch (r->check) {
	case USERDB_OK: return SASL_OK;
	case USERDB_NO_USER: return SASL_NOUSER;
	case USERDB_BAD_PASSWORD: return SASL_BADAUTH;
	default: return SASL_FAIL;
	}
}

/* auth_mech_supported - the mechanisms we offer */
bool auth_mech_supported(const char *mech)
{
	return !strcasecmp(mech, "PLAIN") || !strcasecmp(mech, "LOGIN");
}

/* after SASL_OK: who it is and which senders they may use */
static void auth_load_user(struct auth_req *r)
{
	const void *name = NULL;
	if (sasl_getprop(r->sasl, SASL_USERNAME, &name) != SASL_OK || !name) {
		r->result = AUTH_TEMPFAIL;
		return;
	}
	snprintf(r->user, sizeof(r->user), "%s", (const char *)name);
	struct userdb *db = auth_thread_db(r);
	struct userdb_user u;
	if (r->have_found && !strcmp(r->found.name, r->user)) {
		u = r->found;
		r->have_found = false;
	} else if (!db || userdb_user_get(db, r->user, &u) != 0) {
		r->inline_miss = r->inline_try;
		r->result = AUTH_TEMPFAIL;
		return;
	}
	if (u.disabled) { /* disabled between the password check and here: a worker refuses */
		userdb_user_free(&u);
		r->inline_miss = r->inline_try;
		r->result = AUTH_FAIL;
		return;
	}
	/* per-user overrides of the relayd.conf limits, read at every AUTH: a change made
	 * with relayctl applies to the user's next session without a restart */
	struct userdb_limits ul;
	int lrc = userdb_limits_get(db, r->user, &ul);
	if (lrc < 0 && r->inline_try) { /* SQLITE_BUSY on the loop: the worker reads them */
		r->inline_miss = true;
		userdb_user_free(&u);
		return;
	}
	if (lrc == 0) {
		for (int i = 0; i < POLICY_NMETRICS; i++) {
			if (ul.set[i]) {
				r->limits.limit[i] = ul.limit[i];
				r->limits.window[i] = ul.window[i];
			}
		}
	}
	r->senders = u.senders;
	r->nsenders = u.nsenders;
	u.senders = NULL;
	u.nsenders = 0;
	userdb_user_free(&u);
}

static void auth_run(struct workq_job *j)
{
	struct auth_req *r = (struct auth_req *)j;
	const char *out = NULL;
	unsigned outlen = 0;
	int rc;
	r->check = -1;
	r->cached = false;
	if (r->start)
		rc = sasl_server_start(r->sasl, r->mech, r->have_input ? r->input : NULL, r->inlen, &out, &outlen);
	else
		rc = sasl_server_step(r->sasl, r->input, r->inlen, &out, &outlen);
	if (r->input) {
		explicit_bzero(r->input, r->inlen);
		free(r->input);
		r->input = NULL;
	}
	r->challenge[0] = '\0';
	if (rc == SASL_OK) {
		r->result = AUTH_OK;
		auth_load_user(r);
	} else if (rc == SASL_CONTINUE) {
		unsigned elen;
		r->result = sasl_encode64(out, outlen, r->challenge, sizeof(r->challenge), &elen) == SASL_OK ?
				    AUTH_CONTINUE : AUTH_BADPROT;
	} else if (r->check == USERDB_ERROR) {
		r->result = AUTH_TEMPFAIL;
	} else if (r->check >= 0) {
		/* our check ran and said no; SASL then reports its (disabled) fallback's NOMECH */
		r->result = AUTH_FAIL;
	} else if (rc == SASL_NOMECH) {
		r->result = AUTH_BADMECH;
	} else if (r->check == USERDB_ERROR || rc == SASL_NOMEM || rc == SASL_TRYAGAIN) {
		r->result = AUTH_TEMPFAIL;
	} else if (rc == SASL_BADPROT && r->check < 0) {
		r->result = AUTH_BADPROT;
	} else {
		r->result = AUTH_FAIL;
	}
}

static void auth_done(struct workq_job *j)
{
	struct auth_req *r = (struct auth_req *)j;
	r->cb(r);
}

/* a SASL server connection for r (under the lock: sasl_server_new is not thread-safe) */
static int auth_sasl_new(struct auth_req *r)
{
	pthread_mutex_lock(&auth_conn_lock);
	int rc = sasl_server_new("smtp", r->hostname, NULL, NULL, NULL, r->callbacks, 0, &r->sasl);
	pthread_mutex_unlock(&auth_conn_lock);
	return rc == SASL_OK ? 0 : -1;
}

static void auth_sasl_dispose(struct auth_req *r)
{
	if (r->sasl) {
		pthread_mutex_lock(&auth_conn_lock);
		sasl_dispose(&r->sasl);
		pthread_mutex_unlock(&auth_conn_lock);
	}
}

/* auth_use_loop_db - AUTH PLAIN from the credential cache on the loop, with this connection */
void auth_use_loop_db(struct userdb *db)
{
	auth_loop_db = db;
	if (db)
		userdb_set_busy_ms(db, 0);
}

/* the loop's try could not answer: back to how cmd_auth made r (a fresh SASL connection, the
 * client's input again), for a worker; 0, or -1 (then r->result says why) */
static int auth_inline_undo(struct auth_req *r, char *input, unsigned inlen)
{
	auth_senders_free(r->senders, r->nsenders);
	r->senders = NULL;
	r->nsenders = 0;
	if (r->have_found)
		userdb_user_free(&r->found);
	r->have_found = false;
	r->user[0] = r->attempted[0] = '\0';
	r->check = -1;
	r->inline_miss = false;
	r->input = input;
	r->inlen = inlen;
	auth_sasl_dispose(r);
	if (auth_sasl_new(r) < 0) {
		r->result = AUTH_TEMPFAIL;
		return -1;
	}
	return 0;
}

/* AUTH PLAIN with its initial response, on the loop: true when answered (done() follows from
 * the loop), false when a worker is to run it as if this had not happened */
static bool auth_try_inline(struct auth_req *r)
{
	char *copy = malloc(r->inlen + 1);
	if (!copy)
		return false;
	memcpy(copy, r->input, r->inlen);
	unsigned inlen = r->inlen;
	r->inline_try = true;
	r->inline_miss = false;
	auth_run(&r->job); /* wipes and frees r->input */
	r->inline_try = false;
	if (!r->inline_miss) {
		explicit_bzero(copy, inlen);
		free(copy);
		workq_done_later(&r->job);
		return true;
	}
	if (auth_inline_undo(r, copy, inlen) < 0) {
		workq_done_later(&r->job); /* the input is wiped with r */
		return true;
	}
	return false;
}

/* auth_req_new - a SASL server connection for one session */
struct auth_req *auth_req_new(uint64_t session_id, const char *hostname)
{
	struct auth_req *r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->session_id = session_id;
	snprintf(r->hostname, sizeof(r->hostname), "%s", hostname);
	r->job.run = auth_run;
	r->job.done = auth_done;
	r->callbacks[0].id = SASL_CB_SERVER_USERDB_CHECKPASS;
	r->callbacks[0].proc = (int (*)(void))(void (*)(void))auth_checkpass;
	r->callbacks[0].context = r;
	r->callbacks[1].id = SASL_CB_LIST_END;
	if (auth_sasl_new(r) < 0) {
		free(r);
		return NULL;
	}
	return r;
}

/* auth_submit - the next step: PLAIN with an initial response tried on the loop, else a worker */
void auth_submit(struct auth_req *r)
{
	if (auth_loop_db && r->start && r->have_input && !strcasecmp(r->mech, "PLAIN") && auth_try_inline(r))
		return;
	workq_submit(&r->job);
}

/* auth_senders_free - free a sender list */
void auth_senders_free(char **senders, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(senders[i]);
	free(senders);
}

/* auth_req_free - dispose and wipe */
void auth_req_free(struct auth_req *r)
{
	if (!r)
		return;
	auth_sasl_dispose(r);
	if (r->input) {
		explicit_bzero(r->input, r->inlen);
		free(r->input);
	}
	auth_senders_free(r->senders, r->nsenders);
	if (r->have_found)
		userdb_user_free(&r->found);
	explicit_bzero(r, sizeof(*r));
	free(r);
}
