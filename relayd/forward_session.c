/*
 * forward_session - one outbound SMTP client connection to an upstream (RFC 5321), the
 * per-connection half of the forwarder (forward.c is the manager): STARTTLS (RFC 3207) or
 * implicit TLS (RFC 8314), AUTH (RFC 4954, Cyrus SASL client: PLAIN, LOGIN), PIPELINING
 * (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and the DSN
 * parameters (RFC 3461) passed on.
 *
 * Mirrors smtp_server.c: entering a state sends that state's command
 * (forward_session_enter_state), and forward_session_response() switches on the state.
 * States: resolve -> connect -> [handshake] -> greeting -> ehlo -> [starttls -> handshake ->
 * ehlo] -> [auth] -> ready -> prepare -> mail -> rcpt -> data -> body -> rset -> ready ...
 * -> quit. The results of a transaction go back to the manager through forward_tx_done().
 *
 * Invariants:
 *  - nothing blocks the loop: getaddrinfo and body reads run as workq jobs, which find
 *    their session again by id, never by pointer;
 *  - with tls=starttls nothing but EHLO and STARTTLS is sent before the handshake, and a
 *    server that does not offer STARTTLS is a failure of that upstream;
 *  - a session is never freed inside a conn callback that uses it afterwards: freed
 *    sessions wait in a graveyard that is emptied from the loop;
 *  - the upstream's password is never logged, and AUTH data is wiped after use.
 */
#include "forward_session.h"

#include <errno.h>
#include <ev.h>
#include <stdarg.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <sasl/sasl.h>
#include <sasl/saslutil.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "conn.h"
#include "dsn.h"
#include "log.h"
#include "queue.h"
#include "smtp_parse.h"
#include "smtp_reply.h"
#include "tls.h"
#include "workq.h"

#define FORWARD_TIMEOUT_CONNECT 30.     /* per address */

/* RFC 5321 §4.5.3.2: the least a client waits for each reply (upstream_timeout replaces them) */
#define FORWARD_TIMEOUT_REPLY   300.    /* the greeting, EHLO, MAIL, RCPT ... (§4.5.3.2.1-3) */
#define FORWARD_TIMEOUT_DATA    120.    /* 354 to DATA (§4.5.3.2.4) */
#define FORWARD_TIMEOUT_BLOCK   180.    /* each part of the body sent (§4.5.3.2.5) */
#define FORWARD_TIMEOUT_DOT     600.    /* after the final dot (§4.5.3.2.6: fewer duplicates) */
#define FORWARD_IDLE            10.     /* an unused connection is closed (QUIT) after this */
#define FORWARD_READ_CHUNK      65536   /* a message body is read from the queue in pieces of this */
#define FORWARD_QUIT_WAIT       5.
#define FORWARD_CHUNK           (256 * 1024)

struct forward_session_resolve {
	struct workq_job job;
	uint64_t sid;
	char host[256], port[16];
	struct addrinfo *res;
	int rc;
};

struct forward_session_body {
	struct workq_job job;
	uint64_t sid;
	char id[QUEUE_ID_LEN + 1];
	size_t size;                    /* on disk; then as sent (cut) */
	off_t offset;
	enum forward_cut cut;           /* a bounce: its returned message cut (dsn.c) */
	struct buf out;                 /* dot-stuffed */
	bool has8bit;
	bool in_body;                   /* past the header section (its empty line) */
	bool hdr8bit;                   /* 8-bit in the header section */
	int rc;
};

static struct forward_session *forward_session_graveyard;
static ev_timer forward_session_reaper;
static uint64_t forward_session_next_sid;

static void forward_session_enter_state(struct forward_session *s, enum forward_state st);
static void forward_session_ready(struct forward_session *s);
static void forward_session_fail(struct forward_session *s, const char *why);

static const char *forward_session_strstate(enum forward_state st)
{
	static const char *names[] = { "resolve", "connect", "handshake", "greeting", "ehlo", "starttls", "auth",
				       "ready", "prepare", "mail", "rcpt", "data", "body", "rset", "quit" };
	return names[st];
}

/* --- the session: set-up ----------------------------------------------------------- */

static struct forward_session *forward_session_find(uint64_t id)
{
	for (int i = 0; i < forward_nup; i++)
		for (struct forward_session *s = forward_up[i].sessions; s; s = s->next)
			if (s->id == id)
				return s;
	return NULL;
}

static void forward_session_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* the wait for a reply: RFC 5321's for it, or upstream_timeout for every one when set */
static double forward_session_wait(double rfc)
{
	return forward_cfg->upstream_timeout ? (double)forward_cfg->upstream_timeout : rfc;
}

/* the wait for a connection (per address) or a TLS handshake: upstream_timeout when shorter */
static double forward_session_wait_connect(void)
{
	double t = forward_cfg->upstream_timeout;
	return t && t < FORWARD_TIMEOUT_CONNECT ? t : FORWARD_TIMEOUT_CONNECT;
}

static void forward_session_timer(struct forward_session *s, double t)
{
	ev_timer_stop(forward_loop, &s->timer);
	ev_timer_set(&s->timer, t, 0.);
	ev_timer_start(forward_loop, &s->timer);
}

static void forward_session_resolve_run(struct workq_job *job)
{
	struct forward_session_resolve *j = (struct forward_session_resolve *)job;
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG };
	j->rc = getaddrinfo(j->host, j->port, &hints, &j->res);
}

static void forward_session_connect_next(struct forward_session *s);

static void forward_session_resolve_done(struct workq_job *job)
{
	struct forward_session_resolve *j = (struct forward_session_resolve *)job;
	struct forward_session *s = forward_stopping ? NULL : forward_session_find(j->sid);
	if (!s || s->dead || s->state != FS_RESOLVE) {
		if (j->res)
			freeaddrinfo(j->res);
		free(j);
		return;
	}
	if (j->rc != 0) {
		char why[300];
		snprintf(why, sizeof(why), "cannot resolve %s: %s", j->host, gai_strerror(j->rc));
		free(j);
		forward_session_fail(s, why);
		return;
	}
	s->ai = s->ai_next = j->res;
	free(j);
	forward_session_enter_state(s, FS_CONNECT);
}

static const struct conn_ops forward_session_conn_ops;

static void forward_session_connect_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct forward_session *s = w->data;
	int err = 0;
	socklen_t len = sizeof(err);
	(void)revents;
	ev_io_stop(loop, w);
	if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err) {
		snprintf(s->last_connect_error, sizeof(s->last_connect_error), "connect: %s", strerror(err));
		close(s->fd);
		s->fd = -1;
		forward_session_connect_next(s);
		return;
	}
	int fd = s->fd;
	s->fd = -1;
	conn_init(&s->conn, forward_loop, fd, &forward_session_conn_ops, s);
	s->conn_live = true;
	s->up->stat_conns++;
	if (s->up->cfg->tls == UPSTREAM_TLS_IMPLICIT) {
		forward_session_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->creds->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			forward_session_fail(s, "cannot start TLS");
		return;
	}
	forward_session_enter_state(s, FS_GREETING);
}

/* connect to the next address of the upstream (non-blocking) */
static void forward_session_connect_next(struct forward_session *s)
{
	while (s->ai_next) {
		struct addrinfo *ai = s->ai_next;
		s->ai_next = ai->ai_next;
		int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			snprintf(s->last_connect_error, sizeof(s->last_connect_error), "socket: %s", strerror(errno));
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
			snprintf(s->last_connect_error, sizeof(s->last_connect_error), "connect: %s", strerror(errno));
			close(fd);
			continue;
		}
		s->fd = fd;
		ev_io_init(&s->cio, forward_session_connect_cb, fd, EV_WRITE);
		s->cio.data = s;
		ev_io_start(forward_loop, &s->cio);
		forward_session_timer(s, forward_session_wait_connect()); /* each address its own */
		return;
	}
	forward_session_fail(s, s->last_connect_error[0] ? s->last_connect_error : "no address");
}

static int forward_session_sasl_simple(void *ctx, int id, const char **result, unsigned *len)
{
	struct forward_creds *c = ctx;
	if (id == SASL_CB_AUTHNAME)
		*result = c->user;
	else if (id == SASL_CB_USER)
		*result = ""; /* no authorization identity: act as the authentication identity */
	else
		return SASL_BADPARAM;
	if (len)
		*len = (unsigned)strlen(*result);
	return SASL_OK;
}

static int forward_session_sasl_pass(sasl_conn_t *conn, void *ctx, int id, sasl_secret_t **secret)
{
	struct forward_creds *c = ctx;
	(void)conn;
	if (id != SASL_CB_PASS || !c->secret)
		return SASL_BADPARAM;
	*secret = c->secret;
	return SASL_OK;
}

/* forward_session_new - a new connection to upstream u (resolve first); NULL when out of memory */
struct forward_session *forward_session_new(struct forward_upstream *u)
{
	struct forward_session *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->id = ++forward_session_next_sid;
	queue_new_id(s->idstr);
	s->up = u;
	s->creds = forward_creds_get(u->creds);
	s->fd = -1;
	ev_init(&s->timer, forward_session_timeout_cb);
	s->timer.data = s;
	s->next = u->sessions;
	u->sessions = s;
	u->nsessions++;
	u->nsetup++;
	log_debug("%s forward event=connecting upstream=%s", s->idstr, u->name);
	struct forward_session_resolve *j = calloc(1, sizeof(*j));
	if (!j) {
		forward_session_fail(s, "out of memory");
		return NULL;
	}
	j->sid = s->id;
	snprintf(j->host, sizeof(j->host), "%s", u->cfg->host);
	snprintf(j->port, sizeof(j->port), "%s", u->cfg->port);
	j->job.run = forward_session_resolve_run;
	j->job.done = forward_session_resolve_done;
	forward_session_enter_state(s, FS_RESOLVE);
	workq_submit(&j->job);
	return s;
}

static void forward_session_reaper_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	while (forward_session_graveyard) {
		struct forward_session *s = forward_session_graveyard;
		forward_session_graveyard = s->next;
		free(s);
	}
}

/* forward_session_tx_clear - forget the transaction (not the message) */
void forward_session_tx_clear(struct forward_session *s)
{
	for (size_t i = 0; i < s->nrcpts; i++)
		free(s->rreply ? s->rreply[i] : NULL);
	free(s->rcpts);
	free(s->accepted);
	free(s->rcode);
	free(s->rreply);
	s->rcpts = NULL;
	s->accepted = NULL;
	s->rcode = NULL;
	s->rreply = NULL;
	s->nrcpts = s->rcpt_sent = s->rcpt_reply = s->naccepted = 0;
	s->pipelined = s->mail_refused = s->body_abort = false;
	free(s->body);
	s->body = NULL;
	s->body_len = s->body_off = s->body_size = 0;
	s->cut = FORWARD_CUT_NONE;
	s->msg = NULL;
}

/* forward_session_free - release everything but the struct itself, which the reaper frees from the loop */
void forward_session_free(struct forward_session *s)
{
	if (s->dead)
		return;
	struct forward_upstream *u = s->up;
	s->dead = true;
	if (s->msg)
		forward_tx_done(s, "connection closed");
	for (struct forward_session **p = &u->sessions; *p; p = &(*p)->next) {
		if (*p == s) {
			*p = s->next;
			break;
		}
	}
	u->nsessions--;
	if (!s->established)
		u->nsetup--;
	ev_timer_stop(forward_loop, &s->timer);
	ev_io_stop(forward_loop, &s->cio);
	if (s->fd >= 0)
		close(s->fd);
	if (s->conn_live)
		conn_close(&s->conn);
	if (s->sasl)
		sasl_dispose(&s->sasl);
	forward_creds_put(s->creds); /* after the TLS session and the SASL context that used them */
	s->creds = NULL;
	if (s->ai)
		freeaddrinfo(s->ai);
	forward_session_tx_clear(s);
	log_debug("%s forward event=closed upstream=%s", s->idstr, u->name);
	s->next = forward_session_graveyard;
	forward_session_graveyard = s;
	if (!ev_is_active(&forward_session_reaper)) {
		ev_timer_set(&forward_session_reaper, 0., 0.);
		ev_timer_start(forward_loop, &forward_session_reaper);
	}
}

/* the connection or the upstream failed: mark it down, the messages try elsewhere */
static void forward_session_fail(struct forward_session *s, const char *why)
{
	if (s->dead)
		return;
	struct forward_upstream *u = s->up;
	char reason[512];
	forward_logsafe(why, reason, sizeof(reason));
	log_warn("%s forward event=upstream-failed upstream=%s state=%s reason=\"%s\"", s->idstr, u->name,
		 forward_session_strstate(s->state), reason);
	forward_upstream_failed(u);
	char text[600];
	snprintf(text, sizeof(text), "%s (%s)", reason, forward_session_strstate(s->state));
	if (s->msg)
		forward_tx_done(s, text);
	forward_session_free(s);
	forward_upstream_reroute(u, text);
	forward_upstream_dispatch(u);
}

/* an orderly end (idle QUIT, upstream closing an idle connection): no failure */
static void forward_session_close(struct forward_session *s)
{
	struct forward_upstream *u = s->up;
	forward_session_free(s);
	forward_upstream_dispatch(u);
}

/* --- the session: commands ---------------------------------------------------------- */

static void forward_session_send(struct forward_session *s, const struct buf *b)
{
	if (b->len)
		conn_write(&s->conn, b->data, b->len);
}

static void forward_session_sendline(struct forward_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void forward_session_sendline(struct forward_session *s, const char *fmt, ...)
{
	char line[1100];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n > sizeof(line) - 3)
		n = (int)sizeof(line) - 3;
	line[n++] = '\r';
	line[n++] = '\n';
	conn_write(&s->conn, line, (size_t)n);
}

/* EHLO with hostname when it is a domain name with a dot; else (localhost, a bare machine
 * name) with this connection's address literal, as RFC 5321 §4.1.4 asks of a client without
 * a meaningful name: smarthosts with reject_non_fqdn_helo_hostname refuse the bare name */
static void forward_session_ehlo(struct forward_session *s)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char ip[INET6_ADDRSTRLEN], literal[INET6_ADDRSTRLEN + 8];
	if (strchr(forward_cfg->hostname, '.') ||
	    getsockname(s->conn.fd, (struct sockaddr *)&ss, &sl) < 0 ||
	    getnameinfo((struct sockaddr *)&ss, sl, ip, sizeof(ip), NULL, 0, NI_NUMERICHOST) != 0) {
		forward_session_sendline(s, "EHLO %s", forward_cfg->hostname);
		return;
	}
	smtp_addr_literal(ip, literal, sizeof(literal));
	forward_session_sendline(s, "EHLO [%s]", literal);
}

static void forward_session_notify_param(unsigned notify, char *out, size_t outlen)
{
	if (notify & DSN_NOTIFY_NEVER) {
		snprintf(out, outlen, " NOTIFY=NEVER");
		return;
	}
	snprintf(out, outlen, " NOTIFY=%s%s%s%s", notify & DSN_NOTIFY_SUCCESS ? "SUCCESS," : "",
		 notify & DSN_NOTIFY_FAILURE ? "FAILURE," : "", notify & DSN_NOTIFY_DELAY ? "DELAY," : "", "");
	size_t n = strlen(out);
	if (n && out[n - 1] == ',')
		out[n - 1] = '\0';
}

static void forward_session_add_rcpt(struct forward_session *s, struct buf *b, size_t j)
{
	const struct queue_rcpt *r = &s->msg->env.rcpt[s->rcpts[j]];
	char notify[64] = "";
	buf_printf(b, "RCPT TO:<%s>", r->addr);
	if (s->ext.dsn && r->notify) {
		forward_session_notify_param(r->notify, notify, sizeof(notify));
		buf_printf(b, "%s", notify);
	}
	if (s->ext.dsn && r->orcpt)
		buf_printf(b, " ORCPT=%s", r->orcpt);
	buf_printf(b, "\r\n");
}

static bool forward_session_has_8bit(const char *p)
{
	for (; *p; p++)
		if ((unsigned char)*p & 0x80)
			return true;
	return false;
}

/* does the message need SMTPUTF8: flagged, and non-ASCII in the envelope or the header
 * section (RFC 6531 §3.4: not for an 8-bit body alone, which needs only 8BITMIME) */
static bool forward_session_needs_utf8(const struct forward_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	if (!env->smtputf8)
		return false;
	if (forward_session_has_8bit(env->from) || s->hdr_8bit)
		return true;
	for (size_t i = 0; i < env->nrcpt; i++)
		if (forward_session_has_8bit(env->rcpt[i].addr))
			return true;
	return false;
}

static void forward_session_send_mail(struct forward_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	struct buf b = { 0 };
	buf_printf(&b, "MAIL FROM:<%s>", env->from);
	if (s->ext.size)
		buf_printf(&b, " SIZE=%zu", s->body_size);
	if (s->ext.eightbitmime && (env->body != QUEUE_BODY_7BIT || s->body_8bit))
		buf_printf(&b, " BODY=8BITMIME");
	if (s->ext.smtputf8 && forward_session_needs_utf8(s))
		buf_printf(&b, " SMTPUTF8");
	if (s->ext.dsn && env->ret)
		buf_printf(&b, " RET=%s", env->ret);
	if (s->ext.dsn && env->envid)
		buf_printf(&b, " ENVID=%s", env->envid);
	buf_printf(&b, "\r\n");
	s->pipelined = s->ext.pipelining;
	if (s->pipelined) { /* RFC 2920 §3.1: MAIL, every RCPT and DATA in one go */
		for (size_t j = 0; j < s->nrcpts; j++)
			forward_session_add_rcpt(s, &b, j);
		s->rcpt_sent = s->nrcpts;
		buf_printf(&b, "DATA\r\n");
	}
	forward_session_send(s, &b);
	buf_free(&b);
}

/* write the next part of the body while the output buffer is low */
static void forward_session_body_push(struct forward_session *s)
{
	while (s->body_off < s->body_len && s->conn.out.len < FORWARD_CHUNK) {
		size_t n = s->body_len - s->body_off;
		if (n > FORWARD_CHUNK)
			n = FORWARD_CHUNK;
		if (conn_write(&s->conn, s->body + s->body_off, n) < 0)
			return;
		s->body_off += n;
	}
}

static void forward_session_auth_start(struct forward_session *s)
{
	struct forward_upstream *u = s->up;
	const char *mechlist = s->ext.auth_plain && s->ext.auth_login ? "PLAIN LOGIN" : s->ext.auth_plain ? "PLAIN" : "LOGIN";
	if (!s->ext.auth_plain && !s->ext.auth_login) {
		forward_session_fail(s, "upstream offers neither AUTH PLAIN nor AUTH LOGIN");
		return;
	}
	s->sasl_cb[0] = (sasl_callback_t){ SASL_CB_AUTHNAME, (int (*)(void))(void (*)(void))forward_session_sasl_simple, s->creds };
	s->sasl_cb[1] = (sasl_callback_t){ SASL_CB_USER, (int (*)(void))(void (*)(void))forward_session_sasl_simple, s->creds };
	s->sasl_cb[2] = (sasl_callback_t){ SASL_CB_PASS, (int (*)(void))(void (*)(void))forward_session_sasl_pass, s->creds };
	s->sasl_cb[3] = (sasl_callback_t){ SASL_CB_LIST_END, NULL, NULL };
	int rc = sasl_client_new("smtp", u->cfg->host, NULL, NULL, s->sasl_cb, 0, &s->sasl);
	if (rc != SASL_OK) {
		forward_session_fail(s, sasl_errstring(rc, NULL, NULL));
		return;
	}
	const char *out = NULL, *mech = NULL;
	unsigned outlen = 0;
	rc = sasl_client_start(s->sasl, mechlist, NULL, &out, &outlen, &mech);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		char why[256];
		snprintf(why, sizeof(why), "sasl_client_start: %s", sasl_errdetail(s->sasl));
		forward_session_fail(s, why);
		return;
	}
	if (!out) {
		forward_session_sendline(s, "AUTH %s", mech);
	} else if (outlen == 0) {
		forward_session_sendline(s, "AUTH %s =", mech);
	} else {
		unsigned blen = (outlen + 2) / 3 * 4 + 1, elen = 0;
		char *b64 = malloc(blen);
		if (!b64 || sasl_encode64(out, outlen, b64, blen, &elen) != SASL_OK) {
			free(b64);
			forward_session_fail(s, "cannot encode the AUTH response");
			return;
		}
		struct buf b = { 0 };
		buf_printf(&b, "AUTH %s %s\r\n", mech, b64);
		forward_session_send(s, &b);
		explicit_bzero(b64, elen);
		explicit_bzero(b.data, b.len);
		free(b64);
		buf_free(&b);
	}
	log_debug("%s forward event=auth-start upstream=%s mech=%s", s->idstr, u->name, mech);
}

/* a 334 challenge: one SASL step, the base64 answer on its own line */
static void forward_session_auth_step(struct forward_session *s, const char *challenge)
{
	size_t clen = strlen(challenge);
	unsigned inlen = 0, outlen = 0;
	const char *out = NULL;
	char *in = malloc(clen + 1);
	if (!in || (clen && sasl_decode64(challenge, (unsigned)clen, in, (unsigned)clen + 1, &inlen) != SASL_OK)) {
		free(in);
		forward_session_sendline(s, "*");
		forward_session_fail(s, "AUTH: cannot decode the server challenge");
		return;
	}
	int rc = sasl_client_step(s->sasl, in, inlen, NULL, &out, &outlen);
	free(in);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		forward_session_sendline(s, "*");
		forward_session_fail(s, "AUTH: SASL step failed");
		return;
	}
	unsigned blen = (outlen + 2) / 3 * 4 + 3, elen = 0;
	char *b64 = malloc(blen);
	if (!b64 || (outlen && sasl_encode64(out, outlen, b64, blen, &elen) != SASL_OK)) {
		free(b64);
		forward_session_fail(s, "AUTH: cannot encode the response");
		return;
	}
	b64[elen++] = '\r';
	b64[elen++] = '\n';
	conn_write(&s->conn, b64, elen);
	explicit_bzero(b64, elen);
	free(b64);
}

/* enter a state: sends that state's command */
static void forward_session_enter_state(struct forward_session *s, enum forward_state st)
{
	log_debug("%s forward event=state from=%s to=%s", s->idstr, forward_session_strstate(s->state), forward_session_strstate(st));
	s->state = st;
	switch (st) {
	case FS_RESOLVE:
		forward_session_timer(s, FORWARD_TIMEOUT_CONNECT);
		break;
	case FS_CONNECT:
		forward_session_connect_next(s);
		break;
	case FS_HANDSHAKE:
		forward_session_timer(s, forward_session_wait_connect());
		break;
	case FS_GREETING:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		break;
	case FS_EHLO:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		forward_session_ehlo(s);
		break;
	case FS_STARTTLS:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		forward_session_sendline(s, "STARTTLS");
		break;
	case FS_AUTH:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		forward_session_auth_start(s);
		break;
	case FS_READY:
		forward_session_timer(s, FORWARD_IDLE);
		break;
	case FS_PREPARE:
		forward_session_timer(s, FORWARD_TIMEOUT_REPLY); /* reading the queue, not the upstream */
		break;
	case FS_MAIL:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		forward_session_send_mail(s);
		break;
	case FS_RCPT:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		if (!s->pipelined) {
			struct buf b = { 0 };
			forward_session_add_rcpt(s, &b, s->rcpt_sent++);
			forward_session_send(s, &b);
			buf_free(&b);
		}
		break;
	case FS_DATA:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_DATA));
		if (!s->pipelined)
			forward_session_sendline(s, "DATA");
		break;
	case FS_BODY:
		s->dot_sent = false;
		/* the block wait while the body goes out; the dot's wait once it is all out (on_drain) */
		forward_session_timer(s, forward_session_wait(s->body_abort ? FORWARD_TIMEOUT_DOT : FORWARD_TIMEOUT_BLOCK));
		if (s->body_abort)
			forward_session_sendline(s, ".");
		else
			forward_session_body_push(s);
		break;
	case FS_RSET:
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_REPLY));
		forward_session_sendline(s, "RSET");
		break;
	case FS_QUIT:
		forward_session_timer(s, FORWARD_QUIT_WAIT);
		forward_session_sendline(s, "QUIT");
		break;
	}
}

/* --- the session: a message ----------------------------------------------------------- */

/* RFC 5321 §4.5.2: p[0..n) into j->out, a line starting with '.' getting another one;
 * *line_start carries over from the bytes before */
static int forward_session_stuff(struct forward_session_body *j, const char *p, size_t n, bool *line_start)
{
	int rc = 0;
	size_t start = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)p[i];
		if (*line_start && (ch == '\r' || ch == '\n'))
			j->in_body = true;
		if (ch & 0x80) {
			j->has8bit = true;
			j->hdr8bit |= !j->in_body;
		}
		if (*line_start && ch == '.') {
			rc |= buf_append(&j->out, p + start, i - start);
			rc |= buf_append(&j->out, ".", 1);
			start = i;
		}
		*line_start = ch == '\n';
	}
	rc |= buf_append(&j->out, p + start, n - start);
	return rc ? -1 : 0;
}

/* j->out ends in CRLF "." CRLF */
static int forward_session_stuff_end(struct forward_session_body *j)
{
	/* stuffing adds a dot only before a dot, so the body ends in CRLF exactly when out does */
	const struct buf *o = &j->out;
	int rc = 0;
	if (j->size > 0 && !(o->len >= 2 && o->data[o->len - 2] == '\r' && o->data[o->len - 1] == '\n'))
		rc |= buf_append(&j->out, "\r\n", 2);
	rc |= buf_append(&j->out, ".\r\n", 3);
	return rc ? -1 : 0;
}

/* the body read from fd a chunk at a time (a large message is never in memory twice) and
 * dot-stuffed into j->out */
static int forward_session_stuff_file(struct forward_session_body *j, int fd)
{
	char chunk[FORWARD_READ_CHUNK];
	bool line_start = true;
	if (buf_reserve(&j->out, j->size + j->size / 256 + 8) < 0) /* room for some dots */
		return -1;
	for (size_t done = 0; done < j->size;) {
		size_t want = j->size - done < sizeof(chunk) ? j->size - done : sizeof(chunk);
		ssize_t r = pread(fd, chunk, want, j->offset + (off_t)done);
		if (r <= 0 || forward_session_stuff(j, chunk, (size_t)r, &line_start) < 0)
			return -1;
		done += (size_t)r;
	}
	return forward_session_stuff_end(j);
}

/* a bounce read whole, its returned message cut to the headers or left out, dot-stuffed
 * into j->out; one that cannot be cut (not a bounce that returns it) goes as it is */
static int forward_session_stuff_cut(struct forward_session_body *j)
{
	struct queue_envelope where = { .size = j->size, .body_offset = j->offset };
	char *raw;
	struct buf cut = { 0 };
	bool line_start = true;
	memcpy(where.id, j->id, sizeof(where.id));
	int rc = queue_read_body(forward_queue, &where, &raw);
	if (rc == 0 && (j->cut == FORWARD_CUT_HEADERS ? dsn_headers_only(raw, j->size, &cut)
						       : dsn_without_content(raw, j->size, &cut)) == 0) {
		j->size = cut.len;
		rc = forward_session_stuff(j, cut.data, cut.len, &line_start);
	} else if (rc == 0) {
		rc = forward_session_stuff(j, raw, j->size, &line_start);
	}
	free(raw);
	buf_free(&cut);
	return rc < 0 ? -1 : forward_session_stuff_end(j);
}

static void forward_session_body_run(struct workq_job *job)
{
	struct forward_session_body *j = (struct forward_session_body *)job;
	if (j->cut != FORWARD_CUT_NONE) {
		j->rc = forward_session_stuff_cut(j);
		return;
	}
	int fd = queue_open_message(forward_queue, j->id);
	j->rc = fd < 0 ? -1 : forward_session_stuff_file(j, fd);
	if (fd >= 0)
		close(fd);
}

/* a transaction cannot start: what this upstream cannot take (SIZE, 8BITMIME, SMTPUTF8) goes
 * to the next upstream of this round; at the last one every pending recipient fails for good
 * with this reply (never a retry loop) */
static void forward_session_tx_refuse(struct forward_session *s, int code, const char *text)
{
	for (int i = 0; i < forward_nup; i++)
		if (i != s->up->index && !s->msg->tried[i])
			code = 0;
	for (size_t j = 0; j < s->nrcpts; j++) {
		s->rcode[j] = code;
		s->rreply[j] = strdup(text);
	}
	forward_tx_done(s, text);
	forward_session_ready(s);
}

/* what this upstream cannot take: the reply code (text into text), or 0 */
static int forward_session_cannot(const struct forward_session *s, char *text, size_t textlen)
{
	if (s->ext.size && s->ext.size_max && s->body_size > s->ext.size_max) {
		snprintf(text, textlen, "5.3.4 Message size %zu exceeds the upstream's limit of %llu", s->body_size,
			 s->ext.size_max);
		return 552;
	}
	if (s->body_8bit && !s->ext.eightbitmime) {
		snprintf(text, textlen, "5.6.3 8-bit content, and the upstream does not support 8BITMIME");
		return 554;
	}
	if (forward_session_needs_utf8(s) && !s->ext.smtputf8) {
		snprintf(text, textlen, "5.6.7 Internationalized message, and the upstream does not support SMTPUTF8");
		return 553;
	}
	return 0;
}

static void forward_session_read_body(struct forward_session *s, enum forward_cut cut);

static void forward_session_body_done(struct workq_job *job)
{
	struct forward_session_body *j = (struct forward_session_body *)job;
	struct forward_session *s = forward_stopping ? NULL : forward_session_find(j->sid);
	if (!s || s->dead || s->state != FS_PREPARE || !s->msg || strcmp(s->msg->id, j->id)) {
		buf_free(&j->out);
		free(j);
		return;
	}
	if (j->rc < 0) {
		buf_free(&j->out);
		free(j);
		forward_tx_done(s, "cannot read the message from the queue");
		forward_session_ready(s);
		return;
	}
	free(s->body);
	s->body = j->out.data;
	s->body_len = j->out.len;
	s->body_8bit = j->has8bit;
	s->hdr_8bit = j->hdr8bit;
	s->body_size = j->size;
	free(j);
	char text[300];
	int code = forward_session_cannot(s, text, sizeof(text));
	if (code && code != 553 && !s->msg->env.from[0] && s->cut != FORWARD_CUT_ALL) {
		/* a bounce too big or 8-bit for this upstream: its returned message cut to the
		 * headers, as RET=HDRS makes it (RFC 3461 §4.3 leaves that to us), and if even the
		 * headers cannot go (8-bit) the report alone; not dropped */
		forward_session_read_body(s, s->cut + 1);
	} else if (code) {
		forward_session_tx_refuse(s, code, text);
	} else {
		s->tx_started = clock_mono();
		forward_session_enter_state(s, FS_MAIL);
	}
}

/* read s->msg's body from the queue: on the loop when small (FORWARD_INLINE_MAX: cheaper than a
 * worker's hand-overs), else on a worker; cut: a bounce with its returned message cut */
static void forward_session_read_body(struct forward_session *s, enum forward_cut cut)
{
	struct forward_session_body *j = calloc(1, sizeof(*j));
	if (!j) {
		forward_tx_done(s, "out of memory");
		forward_session_ready(s);
		return;
	}
	s->cut = cut;
	j->sid = s->id;
	memcpy(j->id, s->msg->id, sizeof(j->id));
	j->size = s->msg->env.size;
	j->offset = s->msg->env.body_offset;
	j->cut = cut;
	j->job.run = forward_session_body_run;
	j->job.done = forward_session_body_done;
	workq_run(&j->job, j->size <= FORWARD_INLINE_MAX);
}

/* forward_session_take - an idle session takes a message: its body is read first */
void forward_session_take(struct forward_session *s, struct forward_msg *m)
{
	size_t n = 0;
	m->state = MS_ACTIVE;
	s->msg = m;
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (!m->env.rcpt[i].done_code)
			n++;
	s->rcpts = calloc(n ? n : 1, sizeof(*s->rcpts));
	s->accepted = calloc(n ? n : 1, sizeof(*s->accepted));
	s->rcode = calloc(n ? n : 1, sizeof(*s->rcode));
	s->rreply = calloc(n ? n : 1, sizeof(*s->rreply));
	if (!s->rcpts || !s->accepted || !s->rcode || !s->rreply) {
		forward_tx_done(s, "out of memory");
		forward_session_ready(s);
		return;
	}
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (!m->env.rcpt[i].done_code)
			s->rcpts[s->nrcpts++] = i;
	forward_session_enter_state(s, FS_PREPARE);
	forward_session_read_body(s, FORWARD_CUT_NONE);
}

/* the session can take the next message (or idles) */
static void forward_session_ready(struct forward_session *s)
{
	struct forward_upstream *u = s->up;
	if (s->dead)
		return;
	if (s->must_close) {
		forward_session_close(s);
		return;
	}
	if (!s->established) {
		s->established = true;
		u->nsetup--;
		u->fail_streak = 0;
		u->down_until = 0;
		char info[128];
		conn_tls_info(&s->conn, info, sizeof(info));
		log_info("%s forward event=connected upstream=%s tls=\"%s\" auth=%s", s->idstr, u->name,
			 info[0] ? info : "none", s->authed ? "yes" : "no");
	}
	if (forward_stopping) {
		forward_session_enter_state(s, FS_QUIT);
		return;
	}
	forward_session_enter_state(s, FS_READY);
	forward_upstream_dispatch(u);
}

/* --- the session: replies ----------------------------------------------------------------- */

/* a 552 to RCPT becomes 452, and its enhanced status 5.x.x 4.x.x */
static void forward_session_552_as_452(int *code, char *line)
{
	*code = 452;
	if (line[0] == '5' && line[1] == '.')
		line[0] = '4';
}

/* one complete reply: the state decides */
/* the connection ends in the middle of things (a 421, a reply out of sync): the recipients of
 * the transaction in progress, if any, stay pending (retried: at least once, never a delivery
 * the upstream did not get), then the close */
static void forward_session_abandon(struct forward_session *s, const char *why)
{
	s->must_close = true;
	if (s->msg) {
		for (size_t j = 0; j < s->nrcpts; j++)
			if (s->accepted[j])
				s->rcode[j] = 0;
		forward_tx_done(s, why);
	}
	forward_session_close(s);
}

static void forward_session_response(struct forward_session *s, int code)
{
	char line[600], why[700], head[81], v[LOG_VALUE_SIZE(80)];
	smtp_reply_line(&s->reply, line, sizeof(line));
	snprintf(why, sizeof(why), "%d %s", code, line);
	int cls = code / 100;
	snprintf(head, sizeof(head), "%.80s", s->state == FS_AUTH ? "..." : line);
	log_debug("%s forward event=reply state=%s reply=\"%d %s\"", s->idstr, forward_session_strstate(s->state), code,
		  log_value(head, v, sizeof(v)));
	/* RFC 5321 §3.8: 421 means the server closes; the transaction, if any, is transient */
	if (code == 421 && s->state >= FS_READY && s->state != FS_QUIT) {
		s->closed_by_421 = true;
		forward_session_abandon(s, why);
		return;
	}
	switch (s->state) {
	case FS_RESOLVE:
	case FS_CONNECT:
	case FS_HANDSHAKE:
		break;
	case FS_GREETING:
		if (cls == 2)
			forward_session_enter_state(s, FS_EHLO);
		else
			forward_session_fail(s, why);
		break;
	case FS_EHLO:
		if (cls != 2) {
			forward_session_fail(s, why);
			break;
		}
		smtp_reply_ehlo(s->reply.text, &s->ext);
		if (s->up->cfg->tls == UPSTREAM_TLS_STARTTLS && !s->tls) {
			if (s->ext.starttls)
				forward_session_enter_state(s, FS_STARTTLS);
			else
				forward_session_fail(s, "upstream does not offer STARTTLS (tls=starttls: never sent in clear)");
		} else if (s->creds->user && !s->authed) {
			forward_session_enter_state(s, FS_AUTH);
		} else {
			forward_session_ready(s);
		}
		break;
	case FS_STARTTLS:
		if (code != 220) {
			forward_session_fail(s, why);
			break;
		}
		forward_session_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->creds->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			forward_session_fail(s, "cannot start TLS");
		break;
	case FS_AUTH:
		if (code == 334) {
			forward_session_auth_step(s, s->reply.text);
		} else if (code == 235) {
			s->authed = true;
			sasl_dispose(&s->sasl);
			forward_session_ready(s);
		} else {
			snprintf(why, sizeof(why), "AUTH refused: %d %s", code, line);
			forward_session_fail(s, why);
		}
		break;
	case FS_READY:
	case FS_PREPARE:
		log_info("%s forward event=unexpected-reply upstream=%s state=%s reply=\"%d\"", s->idstr, s->up->name,
			 forward_session_strstate(s->state), code);
		break;
	case FS_MAIL:
		if (cls == 2) {
			forward_session_enter_state(s, FS_RCPT);
			break;
		}
		for (size_t j = 0; j < s->nrcpts; j++) { /* 5xx: all fail; 4xx: all wait */
			s->rcode[j] = cls == 4 || cls == 5 ? code : 0;
			s->rreply[j] = strdup(line);
		}
		if (s->pipelined) { /* the RCPT and DATA replies still come */
			s->mail_refused = true;
			forward_session_enter_state(s, FS_RCPT);
		} else {
			forward_tx_done(s, why);
			forward_session_enter_state(s, FS_RSET);
		}
		break;
	case FS_RCPT: {
		size_t j = s->rcpt_reply++;
		if (j < s->nrcpts && !s->mail_refused) {
			if (cls == 2) {
				s->accepted[j] = true;
				s->naccepted++;
			} else {
				if (code == 552) /* RFC 5321 §4.5.3.1.10: RFC 821's "too many recipients": temporary */
					forward_session_552_as_452(&code, line);
				s->rcode[j] = cls == 4 || cls == 5 ? code : 0;
				free(s->rreply[j]);
				s->rreply[j] = strdup(line);
			}
		}
		if (s->rcpt_reply < s->nrcpts) {
			if (!s->pipelined)
				forward_session_enter_state(s, FS_RCPT);
			break;
		}
		if (s->pipelined || s->naccepted > 0) {
			forward_session_enter_state(s, FS_DATA);
		} else {
			forward_tx_done(s, why);
			forward_session_enter_state(s, FS_RSET);
		}
		break;
	}
	case FS_DATA:
		if (code == 354) {
			/* RFC 2920 §3.1: 354 after every RCPT failed: send the lone dot */
			s->body_abort = s->mail_refused || s->naccepted == 0;
			forward_session_enter_state(s, FS_BODY);
			break;
		}
		if (!s->mail_refused)
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j]) {
					s->rcode[j] = cls == 4 || cls == 5 ? code : 0;
					free(s->rreply[j]);
					s->rreply[j] = strdup(line);
				}
		forward_tx_done(s, why);
		forward_session_enter_state(s, FS_RSET);
		break;
	case FS_BODY:
		if (!s->body_abort && !s->dot_sent) {
			/* RFC 5321 §4.1.1.4: the reply to the message follows its final dot; one before
			 * the dot went out is out of sync, never taken as the message's */
			char oos[760];
			snprintf(oos, sizeof(oos), "reply before the end of the message was sent (out of sync): %s", why);
			forward_session_abandon(s, oos);
			break;
		}
		if (!s->body_abort && !s->mail_refused)
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j]) {
					s->rcode[j] = cls >= 2 && cls <= 5 && cls != 3 ? code : 0;
					free(s->rreply[j]);
					s->rreply[j] = strdup(line);
				}
		forward_tx_done(s, why);
		if (s->must_close)
			forward_session_close(s);
		else if (cls == 2) /* RFC 5321 §4.1.1.4: the transaction is over; no RSET needed */
			forward_session_ready(s);
		else
			forward_session_enter_state(s, FS_RSET);
		break;
	case FS_RSET:
		if (cls == 2)
			forward_session_ready(s);
		else
			forward_session_close(s);
		break;
	case FS_QUIT:
		forward_session_free(s);
		break;
	}
}

/* c->in into replies (smtp_reply.c), each handed to forward_session_response(). conn stops
 * reading once c->in holds in_max bytes (a burst of replies to a pipelined group); everything
 * complete is consumed here, at most one partial line stays, so reading always resumes */
static void forward_session_on_read(struct conn *c, void *arg)
{
	struct forward_session *s = arg;
	while (!s->dead && s->state != FS_HANDSHAKE && c->in.len) {
		size_t used = 0;
		int rc = smtp_reply_parse(c->in.data, c->in.len, &s->reply, &used);
		if (rc < 0) {
			forward_session_fail(s, "malformed reply from the upstream");
			return;
		}
		buf_consume(&c->in, used);
		if (rc == 0)
			break;
		forward_session_response(s, s->reply.code);
	}
	if (!s->dead && c->read_paused)
		conn_resume_read(c);
}

static void forward_session_on_tls(struct conn *c, void *arg)
{
	struct forward_session *s = arg;
	char info[128];
	if (s->dead)
		return;
	s->tls = true;
	conn_tls_info(c, info, sizeof(info));
	log_debug("%s forward event=tls upstream=%s version=\"%s\" verify=%s", s->idstr, s->up->name, info,
		  s->up->cfg->verify ? "yes" : "no");
	if (s->up->cfg->tls == UPSTREAM_TLS_IMPLICIT)
		forward_session_enter_state(s, FS_GREETING);
	else
		forward_session_enter_state(s, FS_EHLO); /* RFC 3207 §4.2: forget what EHLO said before */
}

static void forward_session_on_drain(struct conn *c, void *arg)
{
	struct forward_session *s = arg;
	(void)c;
	if (s->dead || s->state != FS_BODY || s->body_abort)
		return;
	if (s->body_off < s->body_len) {
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_BLOCK));
		forward_session_body_push(s);
	} else {
		s->dot_sent = true;
		forward_session_timer(s, forward_session_wait(FORWARD_TIMEOUT_DOT)); /* all sent, the dot too */
	}
}

static void forward_session_on_error(struct conn *c, void *arg, const char *why)
{
	struct forward_session *s = arg;
	(void)c;
	if (s->dead)
		return;
	if (s->state == FS_QUIT) {
		forward_session_free(s);
		return;
	}
	if (s->state == FS_READY && s->established) { /* the upstream closed an idle connection */
		forward_session_close(s);
		return;
	}
	forward_session_fail(s, why);
}

static const struct conn_ops forward_session_conn_ops = {
	.on_read = forward_session_on_read,
	.on_tls = forward_session_on_tls,
	.on_drain = forward_session_on_drain,
	.on_error = forward_session_on_error,
};

static void forward_session_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct forward_session *s = w->data;
	(void)loop; (void)revents;
	if (s->dead)
		return;
	if (s->state == FS_READY) {
		forward_session_enter_state(s, FS_QUIT);
		return;
	}
	if (s->state == FS_QUIT) {
		forward_session_free(s);
		return;
	}
	if (s->state == FS_CONNECT && s->ai_next) { /* no answer from this address (a dead IPv6 path): the next */
		ev_io_stop(forward_loop, &s->cio);
		close(s->fd);
		s->fd = -1;
		snprintf(s->last_connect_error, sizeof(s->last_connect_error), "connect: timed out");
		forward_session_connect_next(s);
		return;
	}
	char why[64];
	snprintf(why, sizeof(why), "timeout in state %s", forward_session_strstate(s->state));
	forward_session_fail(s, why);
}


/* --- the manager's calls ------------------------------------------------------------------ */

/* forward_session_init - the reaper */
void forward_session_init(const struct config *cfg)
{
	(void)cfg;
	ev_init(&forward_session_reaper, forward_session_reaper_cb);
}

/* forward_session_shutdown - QUIT an idle session (a message not yet sent stays as it is on
 * disk); drop a busy one (mid-transaction: no D record, sent again next time) */
void forward_session_shutdown(struct forward_session *s)
{
	if (s->state == FS_READY || s->state == FS_PREPARE || s->state == FS_RSET) {
		forward_session_tx_clear(s);
		forward_session_enter_state(s, FS_QUIT);
	} else if (s->state != FS_QUIT) {
		forward_session_free(s);
	}
}

/* forward_session_reap - free the freed sessions now (at shutdown) */
void forward_session_reap(void)
{
	ev_timer_stop(forward_loop, &forward_session_reaper);
	forward_session_reaper_cb(forward_loop, &forward_session_reaper, 0);
}
