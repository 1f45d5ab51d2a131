/*
 * smtp_server - the submission session: RFC 5321 state machine with RFC 6409 submission
 * rules, STARTTLS (RFC 3207), AUTH (RFC 4954), PIPELINING (RFC 2920), SIZE (RFC 1870),
 * 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531),
 * CHUNKING (RFC 3030) and DSN parameters (RFC 3461).
 *
 * Invariants:
 *  - every reply carries an enhanced status code;
 *  - state changes go through session_enter_state();
 *  - MAIL is refused before AUTH; AUTH is refused before TLS on starttls/tls listeners;
 *  - after STARTTLS all earlier state is forgotten (conn.c drops pipelined clear text);
 *  - lines must end in CRLF; bare LF, bare CR and NUL are refused (SMTP smuggling);
 *  - "250 queued" is sent only from the commit callback, i.e. after the message is on disk;
 *  - async work (AUTH steps, commits) finds its session again by id, never by pointer;
 *  - a session ends with 421 after max_errors bad commands, or past max_junk_commands
 *    commands without progress (see session_junk()).
 */
#include "smtp_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "clock.h"
#include "conn.h"
#include "credcache.h"
#include "forward.h"
#include "log.h"
#include "policy.h"
#include "ratelimit.h"
#include "queue.h"
#include "smtp_body.h"
#include "smtp_parse.h"
#include "stats.h"
#include "userdb.h"

#define SMTP_LINE_MAX       512     /* RFC 5321 §4.5.3.1.4, CRLF included */
/* MAIL and RCPT, which the extensions we offer make longer (RFC 5321 §4.5.3.1.4): MAIL
 * +26 SIZE (RFC 1870), +10 SMTPUTF8 (RFC 6531), +100 RET/ENVID (RFC 3461), +500 AUTH=
 * (RFC 4954 §5), BODY=8BITMIME; RCPT +500 NOTIFY/ORCPT (RFC 3461). Rounded up. */
#define SMTP_MAIL_LINE_MAX  2048
#define SMTP_AUTH_LINE_MAX  12288   /* RFC 4954 §4 */
#define SMTP_OUT_HIGH       (256 * 1024) /* stop reading while this much output waits */
#define SMTP_BUCKETS        4096
#define SMTP_BATCH          100     /* commands per turn: a pipelining flood cannot hold the loop */

enum session_state {
	SS_TLS_HANDSHAKE, /* implicit TLS: waiting for the handshake before the greeting */
	SS_CONNECTED,     /* greeting sent, no EHLO yet */
	SS_GREETED,       /* EHLO/HELO done, no transaction */
	SS_AUTH,          /* inside an AUTH exchange */
	SS_MAIL,          /* MAIL accepted */
	SS_RCPT,          /* at least one RCPT accepted */
	SS_DATA,          /* reading DATA */
	SS_BDAT,          /* reading a BDAT chunk */
	SS_QUIT           /* closing after the last reply */
};

struct session {
	uint64_t id;
	char idstr[QUEUE_ID_LEN + 1];
	struct session *hnext;          /* registry bucket chain */
	struct conn conn;
	struct smtp_creds *creds;       /* the certificates its TLS began with (a reference) */
	enum listen_mode mode;
	enum session_state state;
	char peer[INET6_ADDRSTRLEN];
	char helo[256];
	bool esmtp;
	bool tls;
	bool authed;
	bool busy;                      /* waiting for an AUTH step or a commit */
	bool out_blocked;               /* waiting for the client to read its replies */
	bool discard_line;              /* skipping the rest of an overlong command line */
	bool discard_auth;              /* ... which is part of an AUTH exchange */
	char user[256];
	char **senders;
	size_t nsenders;
	struct policy_limits limits;    /* this user's limits, read at AUTH */
	struct auth_req *auth;
	ev_timer delay;                 /* holds a failed AUTH's reply (brute-force tarpit) */
	bool delay_locked;              /* ... which is the lockout's 454, not 535 */
	ev_idle more;                   /* more buffered commands: continue when the loop is idle */
	unsigned errors;
	unsigned junk;                  /* commands without progress since AUTH or the last message */
	unsigned auth_failures;
	ev_timer timer;
	double t_accept;                /* clock_mono() at accept(): the session's age (timeout_session) and latency */
	double t_body_end;              /* ... at the end of the message being committed */
	time_t counted_at;              /* the message being committed: when policy_record counted it */
	size_t counted_bytes;           /* ... and its bytes as the client sent them */
	bool first_250;                 /* a message of this session was accepted */
	/* the transaction */
	struct queue_envelope env;
	size_t rcpt_cap;
	struct buf msg;
	bool bdat_used;
	bool bdat_last;
	bool bdat_discard;              /* reading a refused chunk only to stay in sync */
	enum session_state bdat_return; /* state after a refused chunk */
	size_t bdat_left;
	struct smtp_body body;          /* DATA/BDAT decoder into msg */
};

static struct ev_loop *smtp_loop;
static const struct config *smtp_cfg;
/* server certificates: the current set, and sets replaced by a reload that sessions begun
 * under them still use; such a set is freed when its last session ends */
struct smtp_creds {
	gnutls_certificate_credentials_t cred;
	unsigned refs;                  /* sessions whose TLS began with it */
	struct smtp_creds *next;        /* in smtp_creds_retired */
};
static struct smtp_creds *smtp_creds_cur;
static struct smtp_creds *smtp_creds_retired;
static struct session *smtp_registry[SMTP_BUCKETS];
static unsigned smtp_sessions;
static size_t smtp_body_mem;        /* message bytes the sessions hold (at most message_memory) */
static uint64_t smtp_next_id;
static bool smtp_draining;          /* SIGTERM: finish transactions in progress, take no new ones */
static ev_timer smtp_trim_timer;    /* no session for SMTP_TRIM_QUIET seconds: malloc_trim */

/* long enough that a steady stream of one-at-a-time sessions never trims (each trim is
 * madvise calls and TLB shootdowns), short enough that a burst's memory goes back soon */
#define SMTP_TRIM_QUIET 0.5

static void session_process(struct session *s);
static void smtp_server_stats(struct buf *out, bool prometheus);
static void session_free(struct session *s, const char *reason);
static void session_auth_abandon(struct session *s);
static void session_auth_empty_login(struct session *s);

/* --- certificates: one reference per session that began TLS ------------------------- */

static struct smtp_creds *smtp_creds_new(gnutls_certificate_credentials_t cred)
{
	struct smtp_creds *c = cred ? calloc(1, sizeof(*c)) : NULL;
	if (c)
		c->cred = cred;
	else if (cred)
		gnutls_certificate_free_credentials(cred);
	return c;
}

static void smtp_creds_free(struct smtp_creds *c)
{
	gnutls_certificate_free_credentials(c->cred);
	free(c);
}

/* a session is done with c: a retired set goes with its last session */
static void smtp_creds_put(struct smtp_creds *c)
{
	if (!c || --c->refs > 0 || c == smtp_creds_cur)
		return;
	for (struct smtp_creds **p = &smtp_creds_retired; *p; p = &(*p)->next) {
		if (*p == c) {
			*p = c->next;
			smtp_creds_free(c);
			return;
		}
	}
}

/* TLS for s with the current certificates (holding a reference until s is freed) */
static int session_start_tls(struct session *s)
{
	if (!smtp_creds_cur)
		return -1;
	if (!s->creds) {
		s->creds = smtp_creds_cur;
		s->creds->refs++;
	}
	return conn_start_tls_server(&s->conn, s->creds->cred);
}

/* --- registry: async results find their session by id ---------------------- */

static void session_register(struct session *s)
{
	struct session **b = &smtp_registry[s->id % SMTP_BUCKETS];
	s->hnext = *b;
	*b = s;
	smtp_sessions++;
}

static void session_unregister(struct session *s)
{
	for (struct session **p = &smtp_registry[s->id % SMTP_BUCKETS]; *p; p = &(*p)->hnext) {
		if (*p == s) {
			*p = s->hnext;
			smtp_sessions--;
			return;
		}
	}
}

static struct session *session_find(uint64_t id)
{
	for (struct session *s = smtp_registry[id % SMTP_BUCKETS]; s; s = s->hnext)
		if (s->id == id)
			return s;
	return NULL;
}

/* smtp_server_count - live sessions */
unsigned smtp_server_count(void)
{
	return smtp_sessions;
}

static const char *session_strstate(enum session_state st)
{
	static const char *names[] = { "tls-handshake", "connected", "greeted", "auth", "mail", "rcpt",
				       "data", "bdat", "quit" };
	return names[st];
}

static void session_enter_state(struct session *s, enum session_state st)
{
	log_debug("%s smtp event=state from=%s to=%s", s->idstr, session_strstate(s->state), session_strstate(st));
	s->state = st;
}

/* --- replies ----------------------------------------------------------------- */

static void session_reply(struct session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void session_reply(struct session *s, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 3)
		n = (int)sizeof(line) - 3;
	line[n++] = '\r';
	line[n++] = '\n';
	conn_write(&s->conn, line, (size_t)n);
}

/* a 5xx for a bad command: counts toward max_errors (RFC 5321 §4.5.4 gives leeway) */
static void session_error(struct session *s, const char *reply)
{
	session_reply(s, "%s", reply);
	if (++s->errors >= smtp_cfg->max_errors) {
		session_reply(s, "421 4.7.0 %s Too many errors, closing connection", smtp_cfg->hostname);
		log_info("%s smtp event=disconnect reason=too-many-errors", s->idstr);
		session_enter_state(s, SS_QUIT);
	}
}

/* a command that moves nothing forward: NOOP, RSET, VRFY, HELP, and an EHLO or HELO when
 * this session has already greeted since it began or began TLS (the EHLO that RFC 3207 §4.2
 * asks for after STARTTLS is free). A successful AUTH and an accepted message start the count
 * again, so a client that sends an RSET or an EHLO before each message is never stopped. Past
 * max_junk_commands the command is not carried out: 421 and the close, which RFC 5321 §3.8
 * allows after any command (Postfix: smtpd_junk_command_limit) */
static bool session_junk(struct session *s, const struct smtp_cmd *c)
{
	bool junk = c->verb == SMTP_NOOP || c->verb == SMTP_RSET || c->verb == SMTP_VRFY || c->verb == SMTP_HELP ||
		    ((c->verb == SMTP_EHLO || c->verb == SMTP_HELO) && s->helo[0]);
	if (!junk || ++s->junk <= smtp_cfg->max_junk_commands)
		return false;
	session_reply(s, "421 4.7.0 %s Too many commands without progress, closing connection", smtp_cfg->hostname);
	log_info("%s smtp event=disconnect reason=too-many-junk-commands verb=%s", s->idstr, smtp_verb_name(c->verb));
	session_enter_state(s, SS_QUIT);
	return true;
}

/* --- transaction ------------------------------------------------------------- */

/* an empty message buffer, its bytes counted in the sessions' shared message_memory */
static void session_body_start(struct session *s)
{
	smtp_body_release(&s->body);
	buf_free(&s->msg);
	smtp_body_init(&s->body, &s->msg, smtp_cfg->max_message_size);
	smtp_body_set_pool(&s->body, &smtp_body_mem, smtp_cfg->message_memory);
}

static void session_reset_transaction(struct session *s)
{
	queue_envelope_free(&s->env);
	s->rcpt_cap = 0;
	s->bdat_used = s->bdat_last = s->bdat_discard = false;
	s->bdat_left = 0;
	session_body_start(s);
	if (s->state >= SS_MAIL && s->state <= SS_BDAT)
		session_enter_state(s, SS_GREETED);
}

static void session_forget_auth(struct session *s)
{
	auth_senders_free(s->senders, s->nsenders);
	s->senders = NULL;
	s->nsenders = 0;
	s->authed = false;
	s->user[0] = '\0';
}

/* --- the commands ------------------------------------------------------------ */

static void session_ehlo_reply(struct session *s)
{
	session_reply(s, "250-%s Hello %s [%s]", smtp_cfg->hostname, s->helo, s->peer);
	session_reply(s, "250-PIPELINING");
	session_reply(s, "250-SIZE %zu", smtp_cfg->max_message_size);
	session_reply(s, "250-8BITMIME");
	session_reply(s, "250-ENHANCEDSTATUSCODES");
	session_reply(s, "250-SMTPUTF8");
	session_reply(s, "250-CHUNKING");
	session_reply(s, "250-DSN");
	if (s->mode == LISTEN_STARTTLS && !s->tls)
		session_reply(s, "250-STARTTLS");
	if ((s->tls || s->mode == LISTEN_PLAIN) && !s->authed)
		session_reply(s, "250-AUTH PLAIN LOGIN");
	session_reply(s, "250 HELP");
}

/* the EHLO/HELO name as it goes into our replies and the Received: header: any byte but
 * [A-Za-z0-9.-_:[]] becomes '?'. Not refused (clients send bare names, underscores, worse),
 * but it cannot put 8-bit bytes, a ';' (the end of Received's tokens, RFC 5322 §3.6.7),
 * comments or a fake "by" clause into a header we sign (RFC 5321 §4.4) */
static void session_set_helo(struct session *s, const char *name)
{
	size_t i;
	for (i = 0; name[i] && i + 1 < sizeof(s->helo); i++) {
		unsigned char ch = (unsigned char)name[i];
		bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
			  strchr(".-_:[]", ch) != NULL;
		s->helo[i] = ok ? (char)ch : '?';
	}
	s->helo[i] = '\0';
}

static void cmd_helo(struct session *s, struct smtp_cmd *c, bool ehlo)
{
	if (!c->arg[0] || strlen(c->arg) >= sizeof(s->helo) || strchr(c->arg, ' ')) {
		session_error(s, ehlo ? "501 5.5.4 Syntax: EHLO domain" : "501 5.5.4 Syntax: HELO domain");
		return;
	}
	/* RFC 5321 §4.1.4: EHLO/HELO also resets the transaction */
	session_reset_transaction(s);
	session_set_helo(s, c->arg);
	s->esmtp = ehlo;
	session_enter_state(s, SS_GREETED);
	if (ehlo)
		session_ehlo_reply(s);
	else
		session_reply(s, "250 %s", smtp_cfg->hostname);
}

static void cmd_starttls(struct session *s, struct smtp_cmd *c)
{
	if (s->mode != LISTEN_STARTTLS || s->tls) {
		session_error(s, "502 5.5.1 STARTTLS not available");
		return;
	}
	if (c->arg[0]) {
		session_error(s, "501 5.5.4 Syntax: STARTTLS");
		return;
	}
	session_reply(s, "220 2.0.0 Ready to start TLS");
	/* RFC 3207 §4.2: forget everything; conn drops pipelined clear text */
	session_reset_transaction(s);
	s->helo[0] = '\0';
	s->esmtp = false;
	session_enter_state(s, SS_TLS_HANDSHAKE);
	if (session_start_tls(s) < 0) {
		session_reply(s, "454 4.7.0 TLS not available due to temporary reason");
		session_enter_state(s, SS_QUIT);
	}
}

static void session_auth_done(struct auth_req *r);

static void session_auth_submit(struct session *s)
{
	s->busy = true;
	conn_pause_read(&s->conn);
	s->auth->cb = session_auth_done;
	policy_default_limits(&s->auth->limits); /* read here: workers never touch the config */
	auth_submit(s->auth);
}

/* decode a base64 client response; "=" is the empty initial response and an empty line an
 * empty continuation response (RFC 4954 §4 and §8: *(CRLF [base64])). -1 undecodable, -2 a
 * LOGIN user name or password with a NUL (Cyrus would cut it there; PLAIN refuses it too),
 * -3 an empty LOGIN user name (Cyrus's LOGIN plugin leaks the password that follows one) */
static int session_auth_decode(struct session *s, const char *b64, bool initial)
{
	size_t blen = strlen(b64);
	unsigned outlen = 0;
	char *out = malloc(blen + 1);
	if (!out)
		return -1;
	if ((initial && !strcmp(b64, "=")) || (!initial && blen == 0)) {
		out[0] = '\0';
	} else if (blen == 0 || sasl_decode64(b64, (unsigned)blen, out, (unsigned)blen + 1, &outlen) != SASL_OK) {
		explicit_bzero(out, blen + 1);
		free(out);
		return -1;
	} else if (!strcasecmp(s->auth->mech, "LOGIN") && memchr(out, '\0', outlen)) {
		explicit_bzero(out, blen + 1);
		free(out);
		return -2;
	}
	if (!strcasecmp(s->auth->mech, "LOGIN") && s->auth->responses++ == 0 && outlen == 0) {
		free(out);
		return -3;
	}
	s->auth->input = out;
	s->auth->inlen = outlen;
	s->auth->have_input = true;
	return 0;
}

static void cmd_auth(struct session *s, struct smtp_cmd *c)
{
	if (!s->tls && s->mode != LISTEN_PLAIN) {
		session_error(s, "530 5.7.0 Must issue a STARTTLS command first");
		return;
	}
	if (s->state == SS_CONNECTED) {
		session_error(s, "503 5.5.1 Send EHLO first");
		return;
	}
	if (s->authed) {
		session_error(s, "503 5.5.1 Already authenticated");
		return;
	}
	if (s->state != SS_GREETED) {
		session_error(s, "503 5.5.1 AUTH not allowed during a mail transaction");
		return;
	}
	char *mech = c->arg, *initial = strchr(c->arg, ' ');
	if (initial)
		*initial++ = '\0';
	if (!mech[0]) {
		session_error(s, "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
		return;
	}
	if (!auth_mech_supported(mech)) {
		session_error(s, "504 5.5.4 Unrecognized authentication type");
		return;
	}
	if (!policy_auth_allowed(s->peer, NULL)) {
		log_info("%s smtp event=auth result=refused client=%s reason=lockout", s->idstr, s->peer);
		session_reply(s, "454 4.7.0 Too many authentication failures, try again later");
		return;
	}
	s->auth = auth_req_new(s->id, smtp_cfg->hostname);
	if (!s->auth) {
		session_reply(s, "454 4.7.0 Temporary authentication failure");
		return;
	}
	s->auth->start = true;
	snprintf(s->auth->mech, sizeof(s->auth->mech), "%s", mech);
	int drc = initial ? session_auth_decode(s, initial, true) : 0;
	if (drc == -3) {
		session_auth_empty_login(s);
		return;
	}
	if (drc < 0) {
		auth_req_free(s->auth);
		s->auth = NULL;
		session_error(s, drc == -2 ? "501 5.5.2 NUL in the user name or password" :
					     "501 5.5.2 Cannot decode the initial response");
		return;
	}
	session_enter_state(s, SS_AUTH);
	session_auth_submit(s);
}

/* a client line inside the AUTH exchange (RFC 4954 §4) */
static void session_auth_response(struct session *s, char *line)
{
	if (!strcmp(line, "*")) {
		session_auth_abandon(s);
		session_error(s, "501 5.0.0 Authentication aborted");
		return;
	}
	s->auth->start = false;
	int drc = session_auth_decode(s, line, false);
	if (drc == -3) {
		session_auth_empty_login(s);
		return;
	}
	if (drc < 0) {
		session_auth_abandon(s);
		session_error(s, drc == -2 ? "501 5.5.2 NUL in the user name or password" :
					     "501 5.5.2 Cannot decode the response");
		return;
	}
	session_auth_submit(s);
}

static void session_more(struct ev_loop *loop, ev_idle *w, int revents)
{
	(void)loop; (void)revents;
	session_process(w->data);
}

static void session_auth_fail_reply(struct session *s, bool locked)
{
	if (locked)
		session_reply(s, "454 4.7.0 Too many authentication failures, try again later");
	else
		session_error(s, "535 5.7.8 Authentication credentials invalid");
}

static void session_delay_done(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	(void)loop; (void)revents;
	s->busy = false;
	session_auth_fail_reply(s, s->delay_locked);
	session_process(s);
}

/* the user name the client tried, when it could name a user: every such name is counted,
 * whether or not it exists, so that a lockout does not tell which names exist */
static const char *session_auth_name(const struct auth_req *r)
{
	const char *name = r->attempted[0] ? r->attempted : r->user;
	return userdb_name_valid(name) ? name : NULL;
}

/* count a failed (or locked-out) AUTH, answer after the growing delay (RFC 4954 §4 leaves the
 * timing to us); a name locked now gets the slow hash for every password while it lasts */
static void session_auth_count(struct session *s, const char *name, bool locked)
{
	stats_inc(ST_AUTH_FAIL, 1);
	s->auth_failures++;
	double delay = policy_auth_failed(s->peer, name);
	if (name && !policy_auth_allowed(NULL, name))
		credcache_block(name, time(NULL) + (time_t)smtp_cfg->auth_lockout);
	if (delay <= 0) {
		session_auth_fail_reply(s, locked);
		return;
	}
	s->busy = true;
	s->delay_locked = locked;
	ev_timer_set(&s->delay, delay, 0.);
	ev_timer_start(smtp_loop, &s->delay);
}

/* AUTH LOGIN with an empty user name: a failed AUTH, answered here and not by Cyrus SASL */
static void session_auth_empty_login(struct session *s)
{
	log_info("%s smtp event=auth result=fail mech=LOGIN client=%s user=- reason=empty-user-name", s->idstr,
		 s->peer);
	session_auth_abandon(s);
	session_auth_count(s, NULL, false);
}

/* a failed AUTH */
static void session_auth_failed(struct session *s, struct auth_req *r)
{
	bool known = r->check == USERDB_BAD_PASSWORD;
	char v[LOG_VALUE_SIZE(255)];
	log_info("%s smtp event=auth result=fail mech=%s client=%s user=%s reason=%s", s->idstr, r->mech, s->peer,
		 known ? log_value(r->attempted, v, sizeof(v)) : "-", known ? "bad-password" : "bad-credentials");
	if (known) /* per-user counters only for real names */
		policy_count(r->attempted, PC_AUTH_FAIL);
	session_auth_count(s, session_auth_name(r), false);
}

/* AUTH for a locked-out name (or from an IP locked meanwhile): 454 whatever the password and
 * whether or not the name exists, counted and delayed like a failure (relayd.conf.5) */
static void session_auth_locked(struct session *s, struct auth_req *r)
{
	const char *name = session_auth_name(r);
	char v[LOG_VALUE_SIZE(255)];
	log_info("%s smtp event=auth result=refused mech=%s client=%s user=%s reason=lockout", s->idstr, r->mech,
		 s->peer, name ? log_value(name, v, sizeof(v)) : "-");
	session_auth_count(s, name, true);
}

/* a successful AUTH */
static void session_auth_ok(struct session *s, struct auth_req *r)
{
	policy_auth_ok(s->peer, r->user);
	stats_inc(ST_AUTH_OK, 1);
	if (r->cached)
		stats_inc(ST_AUTH_CACHED, 1);
	s->limits = r->limits;
	s->authed = true;
	s->junk = 0; /* progress */
	snprintf(s->user, sizeof(s->user), "%s", r->user);
	s->senders = r->senders;
	s->nsenders = r->nsenders;
	r->senders = NULL;
	r->nsenders = 0;
	char v[LOG_VALUE_SIZE(255)];
	log_info("%s smtp event=auth result=ok user=%s mech=%s", s->idstr, log_value(s->user, v, sizeof(v)), r->mech);
	session_reply(s, "235 2.7.0 Authentication successful");
}

static void session_auth_done(struct auth_req *r)
{
	struct session *s = session_find(r->session_id);
	if (!s || s->auth != r) {
		auth_req_free(r);
		return;
	}
	s->busy = false;
	switch (r->result) {
	case AUTH_CONTINUE:
		session_reply(s, "334 %s", r->challenge);
		break;
	case AUTH_OK:
	case AUTH_FAIL:
		/* the lockout of the name tried decides before the password's result does */
		if (!policy_auth_allowed(s->peer, session_auth_name(r)))
			session_auth_locked(s, r);
		else if (r->result == AUTH_OK)
			session_auth_ok(s, r);
		else
			session_auth_failed(s, r);
		break;
	case AUTH_TEMPFAIL:
		log_warn("%s smtp event=auth result=tempfail mech=%s", s->idstr, r->mech);
		session_reply(s, "454 4.7.0 Temporary authentication failure");
		break;
	case AUTH_BADMECH:
		session_error(s, "504 5.5.4 Unrecognized authentication type");
		break;
	case AUTH_BADPROT:
		session_error(s, "501 5.5.2 Malformed authentication exchange");
		break;
	}
	if (r->result != AUTH_CONTINUE) {
		auth_req_free(r);
		s->auth = NULL;
		if (s->state == SS_AUTH)
			session_enter_state(s, SS_GREETED);
	}
	if (!s->busy)
		session_process(s);
}

static bool session_need_greeting(struct session *s)
{
	if (s->state == SS_CONNECTED) {
		session_error(s, "503 5.5.1 Send EHLO first");
		return true;
	}
	return false;
}

/* a per-user limit reached: 450 4.7.1 with the wait (RFC 6409 §8: the client retries later);
 * a message larger than the whole byte limit could never go: 552 5.3.4 (RFC 1870), for good */
static bool session_over_limit(struct session *s, uint64_t msgs, uint64_t rcpts, uint64_t bytes)
{
	enum policy_metric metric;
	uint32_t wait;
	if (policy_check(s->user, &s->limits, msgs, rcpts, bytes, &metric, &wait) == 0)
		return false;
	char lim[64];
	ratelimit_format(s->limits.limit[metric], s->limits.window[metric], lim, sizeof(lim));
	policy_count(s->user, PC_REJECT_LIMIT);
	stats_inc(ST_REJECTED, 1);
	log_info("%s smtp event=reject reason=rate-limit user=%s metric=%s limit=%s wait=%u", s->idstr, s->user,
		 policy_metric_name(metric), lim, wait);
	if (wait == 0 && metric == POLICY_BYTES)
		session_reply(s, "552 5.3.4 A message of %llu bytes is larger than the limit of %s bytes for %s",
			      (unsigned long long)bytes, lim, s->user);
	else
		session_reply(s, "450 4.7.1 Limit of %s %s reached for %s, try again in %u seconds", lim,
			      policy_metric_name(metric), s->user, wait ? wait : s->limits.window[metric]);
	return true;
}

static void cmd_mail(struct session *s, struct smtp_cmd *c)
{
	struct smtp_mail_args m;
	const char *reply;
	if (session_need_greeting(s))
		return;
	if (!s->authed) {
		session_error(s, "530 5.7.0 Authentication required");
		return;
	}
	if (s->state != SS_GREETED) {
		session_error(s, "503 5.5.1 Nested MAIL command");
		return;
	}
	if (smtp_parse_mail(c->arg, &m, &reply) < 0) {
		session_error(s, reply);
		return;
	}
	if (m.size >= 0 && (size_t)m.size > smtp_cfg->max_message_size) {
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "552 5.3.4 Message size exceeds fixed limit");
		return;
	}
	if (m.size > 0 && smtp_body_mem + (size_t)m.size > smtp_cfg->message_memory) { /* RFC 1870 §6.1 */
		log_info("%s smtp event=defer reason=message-memory size=%lld held=%zu", s->idstr, (long long)m.size,
			 smtp_body_mem);
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "452 4.3.1 Insufficient system storage");
		return;
	}
	if (!userdb_sender_match(s->user, s->senders, s->nsenders, m.addr)) {
		log_info("%s smtp event=reject reason=sender-not-allowed user=%s from=<%s>", s->idstr, s->user, m.addr);
		policy_count(s->user, PC_REJECT_SENDER);
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "553 5.7.1 Sender address <%s> not allowed for user %s", m.addr, s->user);
		return;
	}
	if (session_over_limit(s, 1, 0, m.size > 0 ? (uint64_t)m.size : 0))
		return;
	session_reset_transaction(s);
	s->env.from = strdup(m.addr);
	s->env.user = strdup(s->user);
	s->env.ret = m.ret ? strdup(m.ret) : NULL;
	s->env.envid = m.envid ? strdup(m.envid) : NULL;
	s->env.body = m.body == SMTP_BODY_8BITMIME ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT;
	s->env.smtputf8 = m.smtputf8;
	if (!s->env.from || !s->env.user) {
		session_reply(s, "451 4.3.0 Out of memory");
		session_reset_transaction(s);
		return;
	}
	session_enter_state(s, SS_MAIL);
	session_reply(s, "250 2.1.0 Sender <%s> ok", m.addr);
}

static void cmd_rcpt(struct session *s, struct smtp_cmd *c)
{
	struct smtp_rcpt_args r;
	const char *reply;
	if (s->state != SS_MAIL && s->state != SS_RCPT) {
		session_error(s, s->authed ? "503 5.5.1 Need MAIL before RCPT" : "530 5.7.0 Authentication required");
		return;
	}
	if (s->env.nrcpt >= smtp_cfg->max_recipients) {
		session_reply(s, "452 4.5.3 Too many recipients");
		return;
	}
	if (smtp_parse_rcpt(c->arg, s->env.smtputf8, &r, &reply) < 0) {
		session_error(s, reply);
		return;
	}
	if (session_over_limit(s, 0, s->env.nrcpt + 1, 0))
		return;
	if (s->env.nrcpt == s->rcpt_cap) {
		size_t ncap = s->rcpt_cap ? s->rcpt_cap * 2 : 4;
		struct queue_rcpt *p = realloc(s->env.rcpt, ncap * sizeof(*p));
		if (!p) {
			session_reply(s, "452 4.3.0 Out of memory");
			return;
		}
		s->env.rcpt = p;
		s->rcpt_cap = ncap;
	}
	struct queue_rcpt *q = &s->env.rcpt[s->env.nrcpt];
	memset(q, 0, sizeof(*q));
	q->addr = strdup(r.addr);
	q->orcpt = r.orcpt ? strdup(r.orcpt) : NULL;
	q->notify = r.notify;
	if (!q->addr) {
		session_reply(s, "452 4.3.0 Out of memory");
		return;
	}
	s->env.nrcpt++;
	session_enter_state(s, SS_RCPT);
	session_reply(s, "250 2.1.5 Recipient <%s> ok", r.addr);
}

static void session_begin_body(struct session *s)
{
	queue_new_id(s->env.id);
	session_body_start(s);
}

static void cmd_data(struct session *s, struct smtp_cmd *c)
{
	if (c->arg[0]) {
		session_error(s, "501 5.5.4 Syntax: DATA");
		return;
	}
	if (s->bdat_used) {
		session_error(s, "503 5.5.1 DATA not allowed after BDAT");
		return;
	}
	if (s->state != SS_RCPT) {
		session_error(s, s->state == SS_MAIL ? "554 5.5.1 No valid recipients" : "503 5.5.1 Need RCPT before DATA");
		return;
	}
	session_begin_body(s);
	session_enter_state(s, SS_DATA);
	session_reply(s, "354 End data with <CR><LF>.<CR><LF>");
}

static void cmd_bdat(struct session *s, struct smtp_cmd *c)
{
	size_t size;
	bool last;
	const char *reply;
	if (smtp_parse_bdat(c->arg, &size, &last, &reply) < 0) {
		session_error(s, reply);
		return;
	}
	if (s->state != SS_RCPT) {
		/* RFC 3030 §2: the refused chunk must still be read to stay in sync */
		session_error(s, s->state == SS_MAIL ? "554 5.5.1 No valid recipients" : "503 5.5.1 Need RCPT before BDAT");
		if (s->state == SS_QUIT)
			return;
		s->bdat_return = s->state;
		s->bdat_discard = true;
		s->bdat_left = size;
		session_enter_state(s, SS_BDAT);
		return;
	}
	if (!s->bdat_used) {
		session_begin_body(s);
		s->bdat_used = true;
	}
	s->bdat_left = size;
	s->bdat_last = last;
	session_enter_state(s, SS_BDAT);
}

static void cmd_rset(struct session *s, struct smtp_cmd *c)
{
	(void)c;
	session_reset_transaction(s);
	session_reply(s, "250 2.0.0 Ok");
}

static void cmd_simple(struct session *s, struct smtp_cmd *c)
{
	switch (c->verb) {
	case SMTP_NOOP:
		session_reply(s, "250 2.0.0 Ok");
		break;
	case SMTP_QUIT:
		session_reply(s, "221 2.0.0 %s Bye", smtp_cfg->hostname);
		session_enter_state(s, SS_QUIT);
		break;
	case SMTP_HELP:
		session_reply(s, "214 2.0.0 relayd: EHLO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT");
		break;
	case SMTP_VRFY: /* RFC 5321 §4.1.1.6: "VRFY" SP String */
		if (!c->arg[0])
			session_error(s, "501 5.5.4 Syntax: VRFY string");
		else
			session_reply(s, "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery");
		break;
	case SMTP_EXPN:
		session_error(s, "502 5.5.1 EXPN not supported");
		break;
	default:
		session_error(s, "500 5.5.1 Command unrecognized");
		break;
	}
}

/* dispatch one complete command line (no CRLF) */
static void session_command(struct session *s, char *line)
{
	struct smtp_cmd c;
	smtp_parse_command(line, &c);
	log_debug("%s smtp event=command verb=%s", s->idstr, smtp_verb_name(c.verb));
	if (session_junk(s, &c))
		return;
	switch (c.verb) {
	case SMTP_EHLO: cmd_helo(s, &c, true); break;
	case SMTP_HELO: cmd_helo(s, &c, false); break;
	case SMTP_STARTTLS: cmd_starttls(s, &c); break;
	case SMTP_AUTH: cmd_auth(s, &c); break;
	case SMTP_MAIL: cmd_mail(s, &c); break;
	case SMTP_RCPT: cmd_rcpt(s, &c); break;
	case SMTP_DATA: cmd_data(s, &c); break;
	case SMTP_BDAT: cmd_bdat(s, &c); break;
	case SMTP_RSET: cmd_rset(s, &c); break;
	default: cmd_simple(s, &c); break;
	}
}

/* --- the message body --------------------------------------------------------- */

static void session_commit_done(uint64_t owner, const char *id, int qerrno);

/* the length of the received message's header section (RFC 5322 §2.2, §3.5: up to the
 * empty line, or to the first line that is not a header field when there is none: *nosep) */
static size_t session_header_len(const struct session *s, bool *nosep)
{
	return smtp_header_section(s->msg.data ? s->msg.data : "", s->msg.len, nosep);
}

/* RFC 6409 §8: Received always; Message-ID and Date when missing. Builds the message's new
 * header block (Received, the client's hlen bytes of headers, what was missing, and the
 * empty line when nosep: the client's text after it is the body) into head, to take the
 * place of those hlen bytes of s->msg */
static int session_new_headers(struct session *s, size_t hlen, bool nosep, struct buf *head)
{
	char date[64], tlsinfo[128];
	time_t now = time(NULL);
	struct tm tm;
	localtime_r(&now, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z", &tm);
	conn_tls_info(&s->conn, tlsinfo, sizeof(tlsinfo));
	const char *with = s->tls ? (s->authed ? "ESMTPSA" : "ESMTPS") : (s->authed ? "ESMTPA" : "ESMTP");
	if (s->env.smtputf8)
		with = s->tls ? "UTF8SMTPSA" : "UTF8SMTPA";
	char literal[sizeof(s->peer) + 8];
	smtp_addr_literal(s->peer, literal, sizeof(literal));
	int rc = buf_printf(head, "Received: from %s ([%s])\r\n\tby %s (relayd) with %s id %s", s->helo, literal,
			    smtp_cfg->hostname, with, s->env.id);
	if (tlsinfo[0])
		rc |= buf_printf(head, "\r\n\t(%s)", tlsinfo);
	if (s->env.nrcpt == 1)
		rc |= buf_printf(head, "\r\n\tfor <%s>", s->env.rcpt[0].addr);
	rc |= buf_printf(head, ";\r\n\t%s\r\n", date);
	const char *p = s->msg.data ? s->msg.data : "";
	rc |= buf_append(head, p, hlen);
	if (!smtp_header_present(p, hlen, "Message-ID"))
		rc |= buf_printf(head, "Message-ID: <%s.%lld@%s>\r\n", s->env.id, (long long)now, smtp_cfg->hostname);
	if (!smtp_header_present(p, hlen, "Date"))
		rc |= buf_printf(head, "Date: %s\r\n", date);
	if (nosep)
		rc |= buf_append(head, "\r\n", 2);
	return rc ? -1 : 0;
}

/* the From: header must name only addresses the user may send as (RFC 6409 §8.1 lets the
 * submission server enforce this); switched off with check_header_from no */
static bool session_header_from_ok(struct session *s, size_t hlen)
{
	char addrs[SMTP_FROM_MAX][256];
	const char *reply;
	if (!smtp_cfg->check_header_from)
		return true;
	const char *p = s->msg.data ? s->msg.data : "";
	int n = smtp_header_from(p, hlen, addrs, &reply);
	if (n < 0) {
		log_info("%s smtp event=reject reason=header-from-invalid user=%s", s->idstr, s->user);
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "%s", reply);
		return false;
	}
	for (int i = 0; i < n; i++) {
		if (!userdb_sender_match(s->user, s->senders, s->nsenders, addrs[i])) {
			policy_count(s->user, PC_REJECT_SENDER);
			stats_inc(ST_REJECTED, 1);
			log_info("%s smtp event=reject reason=header-from-not-allowed user=%s from=<%s>", s->idstr, s->user,
				 addrs[i]);
			session_reply(s, "553 5.7.1 From: header address <%s> not allowed for user %s", addrs[i], s->user);
			return false;
		}
	}
	return true;
}

/* the body so far is flagged (too large, bad line syntax, no memory): refuse it, and the
 * transaction is over */
static bool session_body_refused(struct session *s)
{
	const char *reply = smtp_body_error(&s->body);
	if (!reply)
		return false;
	stats_inc(ST_REJECTED, 1);
	log_info("%s smtp event=reject reason=\"%s\" user=%s", s->idstr, reply + 10, s->user);
	session_reply(s, "%s", reply);
	session_reset_transaction(s);
	return true;
}

/* the end of DATA or BDAT LAST: refuse bad content or commit */
static void session_end_body(struct session *s)
{
	if (session_body_refused(s))
		return;
	bool nosep;
	size_t hlen = session_header_len(s, &nosep);
	struct buf head = { 0 };
	if (session_new_headers(s, hlen, nosep, &head) < 0) {
		buf_free(&head);
		session_reply(s, "451 4.3.0 Out of memory");
		session_reset_transaction(s);
		return;
	}
	size_t size = s->msg.len - hlen + head.len;
	if (size > smtp_cfg->max_message_size + 4096) {
		buf_free(&head);
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "552 5.3.4 Message size exceeds fixed limit");
		session_reset_transaction(s);
		return;
	}
	/* the byte limit counts what the client sent (as SIZE= does), not the headers added here */
	s->counted_bytes = s->msg.len;
	if (!session_header_from_ok(s, hlen) || session_over_limit(s, 1, s->env.nrcpt, s->counted_bytes)) {
		buf_free(&head);
		session_reset_transaction(s);
		return;
	}
	/* the new header block in place of the client's: the body moves once, inside s->msg (a
	 * large message is not copied whole) */
	int rc = buf_replace(&s->msg, 0, hlen, head.data, head.len);
	buf_free(&head);
	if (rc < 0) {
		session_reply(s, "451 4.3.0 Out of memory");
		session_reset_transaction(s);
		return;
	}
	smtp_body_release(&s->body); /* the commit holds the bytes now, for the few ms it takes */
	s->env.size = s->msg.len;
	/* counted before the commit: the commit's syncfs makes the usage line durable too */
	s->counted_at = policy_record(s->user, s->env.nrcpt, s->counted_bytes);
	if (queue_commit(&s->env, &s->msg, session_commit_done, s->id) < 0) { /* it takes s->msg */
		policy_unrecord(s->user, s->counted_at, s->env.nrcpt, s->counted_bytes);
		session_reply(s, "451 4.3.0 Cannot queue the message");
		session_reset_transaction(s);
		return;
	}
	s->t_body_end = clock_mono();
	s->busy = true;
	conn_pause_read(&s->conn);
}

/* a message was accepted: its commit time, and the session's accept-to-250 once */
static void session_observe_latency(struct session *s)
{
	double now = clock_mono();
	stats_observe(SH_COMMIT, now - s->t_body_end);
	if (!s->first_250) {
		s->first_250 = true;
		stats_observe(SH_ACCEPT_TO_250, now - s->t_accept);
	}
}

static void session_commit_done(uint64_t owner, const char *id, int qerrno)
{
	struct session *s = session_find(owner);
	if (!s) {
		if (!qerrno) {
			log_info("%s smtp event=accepted-after-disconnect", id);
			forward_notify(id, 0);
		}
		return;
	}
	s->busy = false;
	if (qerrno == 0) {
		s->junk = 0; /* progress */
		policy_count(s->user, PC_ACCEPTED);
		session_observe_latency(s);
		stats_inc(ST_ACCEPTED, 1);
		stats_inc(ST_ACCEPTED_BYTES, s->env.size);
	}
	else
		policy_unrecord(s->user, s->counted_at, s->env.nrcpt, s->counted_bytes);
	if (qerrno == 0) {
		log_info("%s smtp event=accepted user=%s from=<%s> rcpts=%zu size=%zu session=%s", id, s->user, s->env.from,
			 s->env.nrcpt, s->env.size, s->idstr);
		session_reply(s, "250 2.0.0 Ok: queued as %s", id);
		forward_notify(id, s->env.size);
	} else if (qerrno == ENOSPC || qerrno == EDQUOT) {
		stats_inc(ST_REJECTED, 1);
		session_reply(s, "452 4.3.1 Insufficient system storage");
	} else {
		session_reply(s, "451 4.3.0 Local error writing the queue");
	}
	session_reset_transaction(s);
	session_process(s);
}

/* DATA: decode what the input holds; true when the final dot was seen */
static bool session_data_input(struct session *s)
{
	bool done;
	size_t used = smtp_body_data(&s->body, s->conn.in.data, s->conn.in.len, &done);
	buf_consume(&s->conn.in, used);
	return done;
}

/* BDAT: consume up to bdat_left raw bytes; returns true when the chunk is complete */
static bool session_bdat_input(struct session *s)
{
	struct buf *in = &s->conn.in;
	size_t take = in->len < s->bdat_left ? in->len : s->bdat_left;
	if (!s->bdat_discard)
		smtp_body_chunk(&s->body, in->data, take);
	buf_consume(in, take);
	s->bdat_left -= take;
	return s->bdat_left == 0;
}

static void session_bdat_chunk_done(struct session *s)
{
	if (s->bdat_discard) {
		s->bdat_discard = false;
		session_enter_state(s, s->bdat_return);
		return;
	}
	if (s->bdat_last) {
		/* the body must end with CRLF for SMTP relaying */
		if (s->msg.len > 0 && !(s->msg.len >= 2 && s->msg.data[s->msg.len - 2] == '\r' &&
					s->msg.data[s->msg.len - 1] == '\n'))
			smtp_body_chunk(&s->body, "\r\n", 2);
		session_end_body(s);
		return;
	}
	/* RFC 3030 §2: 250 only to a successful chunk; a failed one ends the transaction (the
	 * client sends no more BDAT, and one it sends anyway gets 503 and is discarded) */
	if (session_body_refused(s))
		return;
	session_enter_state(s, SS_RCPT);
	session_reply(s, "250 2.0.0 %zu octets received", s->msg.len);
}

/* --- the input loop ------------------------------------------------------------ */

static void session_auth_abandon(struct session *s)
{
	auth_req_free(s->auth);
	s->auth = NULL;
	session_enter_state(s, SS_GREETED);
}

/* the longest command line (CRLF included) that line's verb may have */
static size_t session_line_max(const char *line)
{
	if (!strncasecmp(line, "AUTH ", 5))
		return SMTP_AUTH_LINE_MAX;
	if (!strncasecmp(line, "MAIL ", 5) || !strncasecmp(line, "RCPT ", 5))
		return SMTP_MAIL_LINE_MAX;
	return SMTP_LINE_MAX;
}

/* one command line from the input; false when no complete line is there yet.
 * Lines up to SMTP_AUTH_LINE_MAX are buffered (AUTH initial responses are long); MAIL and
 * RCPT are limited to SMTP_MAIL_LINE_MAX, other commands to SMTP_LINE_MAX. A longer line is skipped up to its LF and
 * answered then, so the session stays in sync. */
static bool session_command_input(struct session *s)
{
	struct buf *in = &s->conn.in;
	char *nl = in->len ? memchr(in->data, '\n', in->len) : NULL; /* data is NULL when empty */
	bool in_auth = s->state == SS_AUTH;
	bool auth_line = in_auth || (in->len >= 5 && !strncasecmp(in->data, "AUTH ", 5));
	if (!nl) {
		if (in->len > SMTP_AUTH_LINE_MAX) {
			if (!s->discard_line)
				s->discard_auth = auth_line;
			s->discard_line = true;
			buf_consume(in, in->len);
		}
		return false;
	}
	size_t len = (size_t)(nl - in->data);
	bool too_long = s->discard_line || len + 1 > SMTP_AUTH_LINE_MAX;
	if (s->discard_line)
		auth_line = s->discard_auth;
	bool bare_lf = len == 0 || in->data[len - 1] != '\r';
	size_t text = bare_lf ? len : len - 1;
	bool nul = !too_long && memchr(in->data, '\0', text) != NULL;
	bool bare_cr = !too_long && memchr(in->data, '\r', text) != NULL;
	char line[SMTP_AUTH_LINE_MAX + 2];
	line[0] = '\0';
	if (!too_long) {
		memcpy(line, in->data, text);
		line[text] = '\0';
	}
	s->discard_line = false;
	buf_consume(in, len + 1);
	if (too_long) { /* RFC 4954 §6: 5.5.6 for an AUTH command or response line */
		session_error(s, auth_line ? "500 5.5.6 Authentication exchange line is too long" : "500 5.5.2 Line too long");
	} else if (bare_lf) {
		session_error(s, "500 5.5.2 Line must end with CRLF");
	} else if (nul) {
		session_error(s, "500 5.5.2 NUL byte in command line");
	} else if (bare_cr) {
		session_error(s, "500 5.5.2 Bare CR in command line");
	} else if (in_auth) {
		session_auth_response(s, line);
		return true;
	} else if (text + 2 > session_line_max(line)) {
		session_error(s, "500 5.5.2 Line too long");
	} else {
		session_command(s, line);
		return true;
	}
	if (in_auth && s->auth && !s->busy)
		session_auth_abandon(s);
	return true;
}

/* process as much buffered input as the state allows */
static void session_process(struct session *s)
{
	unsigned turn = 0;
	ev_idle_stop(smtp_loop, &s->more);
	while (!s->busy && s->state != SS_QUIT && s->state != SS_TLS_HANDSHAKE) {
		if (++turn > SMTP_BATCH && s->conn.in.len > 0) {
			ev_idle_start(smtp_loop, &s->more); /* other clients and timers go first */
			return;
		}
		if (smtp_draining && (s->state == SS_CONNECTED || s->state == SS_GREETED)) {
			/* RFC 5321 §3.8: the server may close with 421 between transactions */
			session_reply(s, "421 4.3.2 %s Service shutting down, try again later", smtp_cfg->hostname);
			session_enter_state(s, SS_QUIT);
			break;
		}
		if (s->conn.out.len > SMTP_OUT_HIGH) {
			s->out_blocked = true; /* resumed by on_drain */
			conn_pause_read(&s->conn);
			return;
		}
		if (s->state == SS_DATA) {
			if (!session_data_input(s))
				break;
			session_end_body(s);
		} else if (s->state == SS_BDAT) {
			if (!session_bdat_input(s))
				break;
			session_bdat_chunk_done(s);
		} else if (!session_command_input(s)) {
			break;
		}
		ev_timer_again(smtp_loop, &s->timer);
	}
	if (s->state == SS_QUIT)
		conn_pause_read(&s->conn);
	else if (!s->busy && s->state != SS_TLS_HANDSHAKE)
		conn_resume_read(&s->conn);
}

/* --- connection callbacks ----------------------------------------------------- */

static void session_on_read(struct conn *c, void *arg)
{
	struct session *s = arg;
	(void)c;
	if (s->state != SS_QUIT && clock_mono() - s->t_accept > smtp_cfg->timeout_session) {
		log_info("%s smtp event=timeout reason=session-too-long", s->idstr);
		session_reply(s, "421 4.4.2 %s Session too long, closing connection", smtp_cfg->hostname);
		session_enter_state(s, SS_QUIT);
		conn_pause_read(&s->conn);
		return;
	}
	ev_timer_again(smtp_loop, &s->timer);
	session_process(s);
}

static void session_greet(struct session *s)
{
	session_enter_state(s, SS_CONNECTED);
	session_reply(s, "220 %s ESMTP relayd", smtp_cfg->hostname);
}

static void session_on_tls(struct conn *c, void *arg)
{
	struct session *s = arg;
	char info[128];
	s->tls = true;
	stats_inc(ST_TLS_OK, 1);
	conn_tls_info(c, info, sizeof(info));
	log_info("%s smtp event=tls version=%s", s->idstr, info);
	if (s->mode == LISTEN_TLS)
		session_greet(s);
	else
		session_enter_state(s, SS_CONNECTED);
	session_process(s);
}

static void session_on_drain(struct conn *c, void *arg)
{
	struct session *s = arg;
	(void)c;
	if (s->state == SS_QUIT) {
		session_free(s, "quit");
		return;
	}
	if (s->out_blocked) {
		s->out_blocked = false;
		session_process(s);
	}
}

static void session_on_error(struct conn *c, void *arg, const char *why)
{
	(void)c;
	session_free(arg, why);
}

static const struct conn_ops session_conn_ops = {
	.on_read = session_on_read,
	.on_tls = session_on_tls,
	.on_drain = session_on_drain,
	.on_error = session_on_error,
};

static void session_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	(void)loop; (void)revents;
	if (s->state == SS_QUIT) { /* the client does not read its last reply */
		session_free(s, "timeout-closing");
		return;
	}
	log_info("%s smtp event=timeout state=%s", s->idstr, session_strstate(s->state));
	if (s->state == SS_TLS_HANDSHAKE) { /* no reply can go out mid-handshake: close now */
		session_free(s, "timeout-tls-handshake");
		return;
	}
	session_reply(s, "421 4.4.2 %s Idle timeout, closing connection", smtp_cfg->hostname);
	session_enter_state(s, SS_QUIT);
	conn_pause_read(&s->conn);
	s->timer.repeat = 10.;
	ev_timer_again(smtp_loop, &s->timer);
}

static void session_free(struct session *s, const char *reason)
{
	if (conn_cancel_offload(&s->conn))
		return; /* its handshake thread gives it back, then on_error frees it */
	if (s->state == SS_TLS_HANDSHAKE && !s->tls && strncmp(reason, "tls", 3) == 0)
		stats_inc(ST_TLS_FAIL, 1);
	log_info("%s smtp event=disconnect reason=\"%s\" duration=%.3f", s->idstr, reason,
		 clock_mono() - s->t_accept);
	session_unregister(s);
	policy_ip_disconnect(s->peer);
	ev_timer_stop(smtp_loop, &s->timer);
	ev_timer_stop(smtp_loop, &s->delay);
	ev_idle_stop(smtp_loop, &s->more);
	conn_close(&s->conn);
	smtp_creds_put(s->creds);
	if (s->auth && !s->busy)
		auth_req_free(s->auth); /* a busy request is freed when its step comes back */
	session_forget_auth(s);
	session_reset_transaction(s);
	free(s);
	if (smtp_sessions == 0)
		ev_timer_again(smtp_loop, &smtp_trim_timer); /* (re)starts the quiet period */
}

static void smtp_trim_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	ev_timer_stop(loop, w);
	if (smtp_sessions == 0)
		malloc_trim(0); /* give a burst's memory back to the system when all is quiet */
}

/* smtp_server_accept - a new session */
void smtp_server_accept(int fd, const struct sockaddr *sa, socklen_t salen, enum listen_mode mode)
{
	struct session *s = calloc(1, sizeof(*s));
	if (!s) {
		close(fd);
		return;
	}
	s->id = ++smtp_next_id;
	queue_new_id(s->idstr);
	s->mode = mode;
	s->t_accept = clock_mono();
	if (getnameinfo(sa, salen, s->peer, sizeof(s->peer), NULL, 0, NI_NUMERICHOST) != 0)
		snprintf(s->peer, sizeof(s->peer), "unknown");
	session_register(s);
	conn_init(&s->conn, smtp_loop, fd, &session_conn_ops, s);
	s->conn.in_max = SMTP_AUTH_LINE_MAX + 16384;
	ev_idle_init(&s->more, session_more);
	s->more.data = s;
	ev_init(&s->delay, session_delay_done);
	s->delay.data = s;
	ev_init(&s->timer, session_timeout);
	s->timer.repeat = smtp_cfg->timeout_idle;
	s->timer.data = s;
	ev_timer_again(smtp_loop, &s->timer);
	log_info("%s smtp event=connect client=%s mode=%s", s->idstr, s->peer, config_listen_mode_str(mode));
	const char *why = NULL;
	stats_inc(ST_CONNECTIONS, 1);
	if (policy_ip_connect(s->peer, &why) < 0) {
		stats_inc(ST_CONN_REFUSED, 1);
		log_info("%s smtp event=refused client=%s reason=%s", s->idstr, s->peer, why);
		if (mode == LISTEN_TLS) { /* a clear-text reply would break TLS: just close */
			session_free(s, why);
			return;
		}
		session_reply(s, "421 4.7.0 %s Too many connections from your address, try again later",
			      smtp_cfg->hostname);
		session_enter_state(s, SS_QUIT);
		conn_pause_read(&s->conn);
		return;
	}
	if (smtp_sessions > smtp_cfg->max_sessions) {
		stats_inc(ST_CONN_REFUSED, 1);
		log_info("%s smtp event=refused client=%s reason=max-sessions", s->idstr, s->peer);
		if (mode == LISTEN_TLS) { /* as above: no clear text before TLS */
			session_free(s, "max-sessions");
			return;
		}
		session_reply(s, "421 4.7.0 %s Too many connections, try again later", smtp_cfg->hostname);
		session_enter_state(s, SS_QUIT);
		conn_pause_read(&s->conn);
		return;
	}
	if (mode == LISTEN_TLS) {
		s->state = SS_TLS_HANDSHAKE;
		if (session_start_tls(s) < 0)
			session_free(s, "tls-init-failed");
		return;
	}
	session_greet(s);
}

/* smtp_server_init - module set-up */
void smtp_server_init(struct ev_loop *loop, const struct config *cfg, gnutls_certificate_credentials_t cred)
{
	smtp_loop = loop;
	smtp_cfg = cfg;
	smtp_creds_cur = smtp_creds_new(cred);
	ev_timer_init(&smtp_trim_timer, smtp_trim_cb, 0., SMTP_TRIM_QUIET);
	stats_add_section(smtp_server_stats);
}

/* smtp_server_set_creds - new sessions use this certificate; the old set is freed with its
 * last session (at once when none uses it) */
void smtp_server_set_creds(gnutls_certificate_credentials_t cred)
{
	struct smtp_creds *old = smtp_creds_cur;
	smtp_creds_cur = smtp_creds_new(cred);
	if (old && old->refs == 0) {
		smtp_creds_free(old);
	} else if (old) {
		old->next = smtp_creds_retired;
		smtp_creds_retired = old;
	}
}

/* smtp_server_free_creds - at exit: every set, used or not */
void smtp_server_free_creds(void)
{
	while (smtp_creds_retired) {
		struct smtp_creds *c = smtp_creds_retired;
		smtp_creds_retired = c->next;
		smtp_creds_free(c);
	}
	if (smtp_creds_cur)
		smtp_creds_free(smtp_creds_cur);
	smtp_creds_cur = NULL;
}

/* smtp_server_drain - stop taking new transactions; sessions end as their transaction does */
void smtp_server_drain(void)
{
	smtp_draining = true;
	for (int i = 0; i < SMTP_BUCKETS; i++) {
		for (struct session *s = smtp_registry[i], *next; s; s = next) {
			next = s->hnext;
			session_process(s);
		}
	}
}

static void smtp_server_stats(struct buf *out, bool prometheus)
{
	if (prometheus)
		buf_printf(out, "# HELP relayd_sessions Client sessions open now\n# TYPE relayd_sessions gauge\n"
			   "relayd_sessions %u\n# HELP relayd_message_memory_bytes Message bytes held by sessions now\n"
			   "# TYPE relayd_message_memory_bytes gauge\nrelayd_message_memory_bytes %zu\n", smtp_sessions,
			   smtp_body_mem);
	else
		buf_printf(out, "sessions=%u\nmessage_memory_bytes=%zu\nmessage_memory_limit=%zu\n", smtp_sessions,
			   smtp_body_mem, smtp_cfg->message_memory);
}

/* close s now: RFC 5321 §3.8 allows that only after a 421, which may come at any point of
 * the session (even in DATA). Best effort: what the socket takes at once goes out (the loop
 * does not turn again to send the rest); nothing can go out in a TLS handshake */
static void session_shutdown(struct session *s)
{
	if (s->state != SS_QUIT && s->state != SS_TLS_HANDSHAKE)
		session_reply(s, "421 4.3.2 %s Service shutting down, try again later", smtp_cfg->hostname);
	conn_flush(&s->conn);
	session_free(s, "shutdown"); /* one in a TLS handshake thread stays till exit */
}

/* smtp_server_shutdown - close every session, each with a 421 */
void smtp_server_shutdown(void)
{
	for (int i = 0; i < SMTP_BUCKETS; i++) {
		for (struct session *s = smtp_registry[i], *next; s; s = next) {
			next = s->hnext;
			session_shutdown(s);
		}
	}
}
