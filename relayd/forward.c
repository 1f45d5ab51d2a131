/*
 * forward - the outbound SMTP client (RFC 5321) with STARTTLS (RFC 3207) or implicit TLS
 * (RFC 8314), AUTH (RFC 4954, Cyrus SASL client: PLAIN, LOGIN), PIPELINING (RFC 2920),
 * SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and DSN parameters (RFC 3461).
 *
 * Two halves in one file:
 *  - the manager: every queued message is a struct fwd_msg, found by id. A message is
 *    routed to the first upstream (config order) it has not tried in this round and that
 *    is not marked down; it then waits in that upstream's list until a connection takes it
 *    and the upstream's pacing window allows. When every upstream failed for it, it gets a
 *    T record and waits for its backoff (retry_min doubling to retry_max); after
 *    queue_lifetime its pending recipients fail.
 *  - the session (struct fwd_session): mirrors smtp_server.c. Entering a state sends that
 *    state's command (fwd_enter_state), and forward_response() switches on the state.
 *    States: resolve -> connect -> [handshake] -> greeting -> ehlo -> [starttls ->
 *    handshake -> ehlo] -> [auth] -> ready -> prepare -> mail -> rcpt -> data -> body ->
 *    rset -> ready ... -> quit.
 *
 * Invariants:
 *  - nothing blocks the loop: getaddrinfo, body reads and every status append, bounce
 *    write and removal (fdatasync/fsync) run as workq jobs; jobs find their session or
 *    message again by id, never by pointer;
 *  - the disk work of one message is serialised (one job at a time, records batched);
 *  - with tls=starttls nothing but EHLO and STARTTLS is sent before the handshake, and a
 *    server that does not offer STARTTLS is a failure of that upstream;
 *  - a recipient is finished (D record) only on a 2xx or 5xx reply to it, or when its
 *    message expires; anything else leaves it pending;
 *  - a session is never freed inside a conn callback that uses it afterwards: freed
 *    sessions wait in a graveyard that is emptied from the loop;
 *  - the upstream's password is never logged, and wiped at shutdown.
 */
#include "forward.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <stdarg.h>
#include <netdb.h>
#include <sasl/sasl.h>
#include <sasl/saslutil.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "conn.h"
#include "dsn.h"
#include "log.h"
#include "queue.h"
#include "ratelimit.h"
#include "tls.h"
#include "workq.h"

#define FWD_TIMEOUT_CONNECT 30.
#define FWD_TIMEOUT_REPLY   300.    /* RFC 5321 §4.5.3.2: 5 minutes for most replies */
#define FWD_IDLE            10.     /* an unused connection is closed (QUIT) after this */
#define FWD_QUIT_WAIT       5.
#define FWD_REPLY_MAX       65536   /* a longer (multi-line) reply is a protocol error */
#define FWD_CHUNK           (256 * 1024)
#define FWD_BUCKETS         4096
#define FWD_DOWN_BASE_MAX   60u

enum fwd_state {
	FS_RESOLVE,    /* getaddrinfo on a worker */
	FS_CONNECT,    /* non-blocking connect */
	FS_HANDSHAKE,  /* TLS handshake (implicit, or after STARTTLS) */
	FS_GREETING,   /* waiting for 220 */
	FS_EHLO,
	FS_STARTTLS,
	FS_AUTH,
	FS_READY,      /* idle, can take a message */
	FS_PREPARE,    /* the message body is read on a worker */
	FS_MAIL,
	FS_RCPT,
	FS_DATA,
	FS_BODY,       /* body sent, waiting for the final reply */
	FS_RSET,
	FS_QUIT
};

enum fwd_mstate {
	MS_WAIT,       /* timer running until its next attempt */
	MS_QUEUED,     /* in an upstream's waiting list */
	MS_ACTIVE,     /* taken by a session */
	MS_FINISH,     /* every recipient is done: bounce/removal in progress */
	MS_IDLE        /* nothing scheduled (no upstream configured) */
};

struct fwd_upstream;

struct fwd_msg {
	char id[QUEUE_ID_LEN + 1];
	struct fwd_msg *hnext;          /* id table */
	struct fwd_msg *wnext;          /* upstream waiting list */
	struct fwd_upstream *waiting_at;
	enum fwd_mstate state;
	struct queue_envelope env;      /* envelope and status, kept up to date in memory */
	ev_timer timer;
	bool tried[CONFIG_MAX_UPSTREAM];
	char last_error[512];
	/* disk work: one job at a time */
	bool io_busy;
	struct buf records;             /* status lines not yet appended */
};

struct fwd_session {
	uint64_t id;
	char idstr[QUEUE_ID_LEN + 1];
	struct fwd_session *next;       /* upstream's list */
	struct fwd_upstream *up;
	enum fwd_state state;
	bool dead;
	bool established;               /* reached READY once */
	bool authed;
	bool tls;
	struct conn conn;
	bool conn_live;
	int fd;                         /* while connecting */
	ev_io cio;
	ev_timer timer;
	struct addrinfo *ai, *ai_next;
	char last_connect_error[128];
	/* EHLO */
	bool ext_starttls, ext_pipelining, ext_8bitmime, ext_smtputf8, ext_dsn, ext_size;
	bool ext_plain, ext_login;
	unsigned long long ext_size_max;
	sasl_conn_t *sasl;
	sasl_callback_t sasl_cb[4];
	/* the reply being read */
	struct buf rtext;
	/* the transaction */
	struct fwd_msg *msg;
	size_t *rcpts;                  /* indices of the pending recipients */
	size_t nrcpts, rcpt_sent, rcpt_reply, naccepted;
	bool *accepted;
	int *rcode;                     /* final result per pending recipient, 0 = none */
	char **rreply;
	bool pipelined, mail_refused, body_abort, must_close;
	char *body;                     /* dot-stuffed message + ".\r\n" */
	size_t body_len, body_off;
	bool body_8bit;
	ev_tstamp tx_started;
};

struct fwd_upstream {
	int index;
	struct upstream_cfg conf;       /* a copy: a SIGHUP reload does not change it under us */
	const struct upstream_cfg *cfg;
	char name[300];                 /* host:port for logs */
	gnutls_certificate_credentials_t cred;
	char *user;
	sasl_secret_t *secret;
	struct fwd_session *sessions;
	unsigned nsessions, nsetup;
	struct fwd_msg *wait_head, *wait_tail;
	unsigned nwait;
	ev_tstamp down_until;
	unsigned fail_streak;
	struct ratelimit_window rate;
	ev_timer rate_timer;
	bool rate_waiting;
	/* stats */
	unsigned long long stat_msgs, stat_rcpts, stat_failures, stat_conns, stat_lat_n;
	double stat_lat_sum, stat_lat_last;
};

/* a queued disk job for one message: append records, and/or finish it */
struct fwd_io {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	char *records;
	bool finish;
	/* results */
	int rc;
	int err;
	const char *what;
	int delivered, failed;
	bool dropped, nobounce;
	char bounce_id[QUEUE_ID_LEN + 1];
	struct queue_envelope bounce;   /* loaded when a bounce was made */
	bool have_bounce;
};

struct fwd_load {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	struct queue_envelope env;
	int rc;
};

struct fwd_resolve {
	struct workq_job job;
	uint64_t sid;
	char host[256], port[16];
	struct addrinfo *res;
	int rc;
};

struct fwd_body {
	struct workq_job job;
	uint64_t sid;
	char id[QUEUE_ID_LEN + 1];
	size_t size;
	off_t offset;
	char *raw;                      /* raw message, for dsn-less checks */
	struct buf out;                 /* dot-stuffed */
	bool has8bit;
	int rc;
};

static struct ev_loop *fwd_loop;
static const struct config *fwd_cfg;
static struct fwd_upstream fwd_up[CONFIG_MAX_UPSTREAM];
static int fwd_nup;
static struct fwd_msg *fwd_table[FWD_BUCKETS];
static struct fwd_session *fwd_graveyard;
static ev_timer fwd_reaper;
static bool fwd_stopping;
static bool fwd_started;
static bool fwd_sasl;
static uint64_t fwd_next_sid;
static double fwd_reply_timeout = FWD_TIMEOUT_REPLY;
/* stats */
static unsigned long long fwd_stat_forwarded, fwd_stat_bounced, fwd_stat_dropped, fwd_stat_rcpt_ok,
	fwd_stat_rcpt_failed, fwd_stat_deferrals;

static void fwd_msg_route(struct fwd_msg *m);
static void fwd_msg_io(struct fwd_msg *m);
static void fwd_msg_finish(struct fwd_msg *m);
static void fwd_upstream_dispatch(struct fwd_upstream *u);
static void fwd_enter_state(struct fwd_session *s, enum fwd_state st);
static void fwd_session_fail(struct fwd_session *s, const char *why);
static void fwd_session_free(struct fwd_session *s);
static void fwd_session_ready(struct fwd_session *s);
static void fwd_tx_done(struct fwd_session *s, const char *why);

static const char *fwd_strstate(enum fwd_state st)
{
	static const char *names[] = { "resolve", "connect", "handshake", "greeting", "ehlo", "starttls", "auth",
				       "ready", "prepare", "mail", "rcpt", "data", "body", "rset", "quit" };
	return names[st];
}

/* text safe inside a log value in double quotes */
static void fwd_logsafe(const char *in, char *out, size_t outlen)
{
	size_t o = 0;
	for (const char *p = in ? in : ""; *p && o + 1 < outlen; p++)
		out[o++] = *p == '"' ? '\'' : ((unsigned char)*p < 0x20 ? ' ' : *p);
	out[o] = '\0';
}

/* --- messages: the id table ------------------------------------------------------ */

static unsigned fwd_hash(const char *id)
{
	unsigned h = 5381;
	for (const char *p = id; *p; p++)
		h = h * 33 + (unsigned char)*p;
	return h % FWD_BUCKETS;
}

static struct fwd_msg *fwd_msg_find(const char *id)
{
	for (struct fwd_msg *m = fwd_table[fwd_hash(id)]; m; m = m->hnext)
		if (!strcmp(m->id, id))
			return m;
	return NULL;
}

static void fwd_msg_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* take over a loaded envelope; NULL if the id is known already */
static struct fwd_msg *fwd_msg_new(struct queue_envelope *env)
{
	if (fwd_msg_find(env->id))
		return NULL;
	struct fwd_msg *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	memcpy(m->id, env->id, sizeof(m->id));
	m->env = *env;
	memset(env, 0, sizeof(*env));
	if (m->env.last_error)
		snprintf(m->last_error, sizeof(m->last_error), "%s", m->env.last_error);
	ev_init(&m->timer, fwd_msg_timer_cb);
	m->timer.data = m;
	m->state = MS_IDLE;
	unsigned h = fwd_hash(m->id);
	m->hnext = fwd_table[h];
	fwd_table[h] = m;
	return m;
}

static void fwd_msg_free(struct fwd_msg *m)
{
	for (struct fwd_msg **p = &fwd_table[fwd_hash(m->id)]; *p; p = &(*p)->hnext) {
		if (*p == m) {
			*p = m->hnext;
			break;
		}
	}
	ev_timer_stop(fwd_loop, &m->timer);
	queue_envelope_free(&m->env);
	buf_free(&m->records);
	free(m);
}

static bool fwd_msg_all_done(const struct fwd_msg *m)
{
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (m->env.rcpt[i].done_code == 0)
			return false;
	return true;
}

/* schedule the next attempt at time `when` (unix seconds; <= now means at once) */
static void fwd_msg_schedule(struct fwd_msg *m, time_t when)
{
	if (fwd_nup == 0) {
		m->state = MS_IDLE;
		return;
	}
	double delay = (double)(when - time(NULL));
	m->state = MS_WAIT;
	ev_timer_stop(fwd_loop, &m->timer);
	ev_timer_set(&m->timer, delay > 0 ? delay : 0., 0.);
	ev_timer_start(fwd_loop, &m->timer);
}

/* record recipient i as finished (in memory now, on disk through the next io job) */
static void fwd_msg_done_rcpt(struct fwd_msg *m, size_t i, int code, const char *text)
{
	struct queue_rcpt *r = &m->env.rcpt[i];
	char clean[1024];
	fwd_logsafe(text, clean, sizeof(clean));
	for (char *p = clean; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	r->done_code = code;
	free(r->done_text);
	r->done_text = strdup(clean);
	buf_printf(&m->records, "%sD %zu %d %s", m->records.len ? "\n" : "", i, code, clean);
}

/* pending recipients fail: the message is too old */
static void fwd_msg_expire(struct fwd_msg *m)
{
	char text[700];
	snprintf(text, sizeof(text), "4.4.7 Delivery time expired%s%.600s", m->last_error[0] ? ": last error: " : "",
		 m->last_error);
	for (size_t i = 0; i < m->env.nrcpt; i++) {
		if (m->env.rcpt[i].done_code)
			continue;
		log_info("%s forward event=expired rcpt=<%s> attempts=%u", m->id, m->env.rcpt[i].addr, m->env.attempts);
		fwd_stat_rcpt_failed++;
		fwd_msg_done_rcpt(m, i, 554, text);
	}
	fwd_msg_finish(m);
}

static bool fwd_msg_expired(const struct fwd_msg *m, time_t at)
{
	return fwd_cfg->queue_lifetime && at >= m->env.created + (time_t)fwd_cfg->queue_lifetime;
}

static unsigned fwd_backoff(unsigned attempts)
{
	unsigned d = fwd_cfg->retry_min;
	for (unsigned i = 1; i < attempts && d < fwd_cfg->retry_max; i++)
		d = d > fwd_cfg->retry_max / 2 ? fwd_cfg->retry_max : d * 2;
	return d < fwd_cfg->retry_max ? d : fwd_cfg->retry_max;
}

/* every upstream failed this round: T record and wait */
static void fwd_msg_defer(struct fwd_msg *m)
{
	time_t now = time(NULL);
	unsigned attempts = m->env.attempts + 1;
	unsigned delay = fwd_backoff(attempts);
	if (fwd_msg_expired(m, now + (time_t)delay)) {
		m->env.attempts = attempts;
		fwd_msg_expire(m);
		return;
	}
	char reason[600];
	fwd_logsafe(m->last_error[0] ? m->last_error : "no upstream available", reason, sizeof(reason));
	m->env.attempts = attempts;
	m->env.next_attempt = now + (time_t)delay;
	buf_printf(&m->records, "%sT %u %lld %s", m->records.len ? "\n" : "", attempts, (long long)m->env.next_attempt,
		   reason);
	fwd_stat_deferrals++;
	log_info("%s forward event=deferred attempts=%u retry=%us reason=\"%s\"", m->id, attempts, delay, reason);
	fwd_msg_schedule(m, m->env.next_attempt);
	fwd_msg_io(m);
}

/* the message's time came: start a round over the upstream list */
static void fwd_msg_due(struct fwd_msg *m)
{
	if (fwd_stopping)
		return;
	if (fwd_msg_all_done(m)) {
		fwd_msg_finish(m);
		return;
	}
	if (fwd_msg_expired(m, time(NULL))) {
		fwd_msg_expire(m);
		return;
	}
	memset(m->tried, 0, sizeof(m->tried));
	fwd_msg_route(m);
}

static void fwd_msg_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	fwd_msg_due(w->data);
}

/* the next upstream for this round: the first untried one that is up; when all untried
 * ones are down, the one back soonest, but only if nothing was tried yet this round */
static void fwd_msg_route(struct fwd_msg *m)
{
	ev_tstamp now = ev_now(fwd_loop);
	struct fwd_upstream *pick = NULL, *soonest = NULL;
	bool any_tried = false;
	for (int i = 0; i < fwd_nup; i++) {
		struct fwd_upstream *u = &fwd_up[i];
		if (m->tried[i]) {
			any_tried = true;
			continue;
		}
		if (u->down_until <= now) {
			pick = u;
			break;
		}
		if (!soonest || u->down_until < soonest->down_until)
			soonest = u;
	}
	if (!pick && !any_tried)
		pick = soonest;
	if (!pick) {
		fwd_msg_defer(m);
		return;
	}
	m->state = MS_QUEUED;
	m->waiting_at = pick;
	m->wnext = NULL;
	if (pick->wait_tail)
		pick->wait_tail->wnext = m;
	else
		pick->wait_head = m;
	pick->wait_tail = m;
	pick->nwait++;
	fwd_upstream_dispatch(pick);
}

/* --- messages: disk work on workers ---------------------------------------------- */

static void fwd_reload_later(const char *id);

/* the finish sequence: bounce for failed recipients (unless null sender), B record, remove */
static void fwd_io_finish(struct fwd_io *j)
{
	const char *dir = fwd_cfg->queue;
	struct queue_envelope env;
	if (queue_load(dir, j->id, &env) < 0) {
		j->rc = -1;
		j->err = errno ? errno : EIO;
		j->what = "load";
		return;
	}
	for (size_t i = 0; i < env.nrcpt; i++) {
		if (env.rcpt[i].done_code >= 200 && env.rcpt[i].done_code < 300)
			j->delivered++;
		else
			j->failed++;
	}
	if (j->failed && !env.from[0]) {
		j->dropped = true; /* never bounce a bounce (RFC 5321 §6.1) */
	} else if (j->failed && !env.bounce_id[0]) {
		char *body = NULL;
		struct buf dsn = { 0 };
		int n = -1;
		if (queue_read_body(dir, &env, &body) == 0)
			n = dsn_build(&env, body, env.size, fwd_cfg->hostname, time(NULL), &dsn);
		free(body);
		if (n < 0) {
			buf_free(&dsn);
			queue_envelope_free(&env);
			j->rc = -1;
			j->err = EIO;
			j->what = "bounce-build";
			return;
		}
		if (n == 0) {
			j->nobounce = true; /* NOTIFY=NEVER or without FAILURE */
		} else {
			struct queue_envelope b = { 0 };
			struct queue_rcpt r = { 0 };
			bool eight = false;
			for (size_t i = 0; i < dsn.len && !eight; i++)
				eight = (unsigned char)dsn.data[i] & 0x80;
			r.addr = env.from;
			r.notify = DSN_NOTIFY_NEVER;
			b.user = (char *)"MAILER-DAEMON";
			b.from = (char *)"";
			b.body = eight ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT;
			for (const char *p = env.from; *p; p++)
				if ((unsigned char)*p & 0x80)
					b.smtputf8 = true;
			b.rcpt = &r;
			b.nrcpt = 1;
			b.size = dsn.len;
			char rec[8 + QUEUE_ID_LEN];
			if (queue_write_sync(dir, &b, dsn.data, dsn.len) < 0) {
				j->rc = -1, j->err = errno, j->what = "bounce-write";
			} else {
				memcpy(j->bounce_id, b.id, sizeof(j->bounce_id));
				snprintf(rec, sizeof(rec), "B %s", b.id);
				if (queue_append_status(dir, j->id, rec) < 0)
					j->rc = -1, j->err = errno, j->what = "append-B";
				else if (queue_load(dir, b.id, &j->bounce) == 0)
					j->have_bounce = true;
			}
		}
		buf_free(&dsn);
	} else if (j->failed) {
		memcpy(j->bounce_id, env.bounce_id, sizeof(j->bounce_id)); /* committed before a crash */
	}
	queue_envelope_free(&env);
	if (j->rc == 0 && queue_remove(dir, j->id) < 0)
		j->rc = -1, j->err = errno, j->what = "remove";
}

static void fwd_io_run(struct workq_job *job)
{
	struct fwd_io *j = (struct fwd_io *)job;
	if (j->records && queue_append_status(fwd_cfg->queue, j->id, j->records) < 0) {
		j->rc = -1;
		j->err = errno;
		j->what = "append";
		return;
	}
	if (j->finish)
		fwd_io_finish(j);
}

static void fwd_msg_add_loaded(struct queue_envelope *env, bool now);

static void fwd_io_done(struct workq_job *job)
{
	struct fwd_io *j = (struct fwd_io *)job;
	struct fwd_msg *m = fwd_stopping ? NULL : fwd_msg_find(j->id);
	if (fwd_stopping)
		goto out;
	if (j->rc < 0) {
		log_err("%s forward event=queue-error op=%s error=\"%s\"", j->id, j->what, strerror(j->err));
		/* forget what is in memory; the durable state is read again later */
		if (m)
			fwd_msg_free(m);
		fwd_reload_later(j->id);
		goto out;
	}
	if (j->finish) {
		if (j->dropped) {
			fwd_stat_dropped++;
			log_warn("%s forward event=dropped reason=bounce-undeliverable failed=%d", j->id, j->failed);
		} else if (j->nobounce) {
			log_info("%s forward event=failed-no-bounce reason=notify failed=%d", j->id, j->failed);
		} else if (j->failed) {
			fwd_stat_bounced++;
			log_info("%s forward event=bounced bounce=%s failed=%d delivered=%d", j->id, j->bounce_id, j->failed,
				 j->delivered);
		} else {
			fwd_stat_forwarded++;
		}
		log_info("%s forward event=removed delivered=%d failed=%d", j->id, j->delivered, j->failed);
		if (m)
			fwd_msg_free(m);
		if (j->have_bounce)
			fwd_msg_add_loaded(&j->bounce, true);
		goto out;
	}
	if (m) {
		m->io_busy = false;
		fwd_msg_io(m); /* more records, or the finish, may have come meanwhile */
	}
out:
	if (j->have_bounce)
		queue_envelope_free(&j->bounce);
	free(j->records);
	free(j);
}

/* start the next disk job of a message if none runs */
static void fwd_msg_io(struct fwd_msg *m)
{
	if (m->io_busy || fwd_stopping)
		return;
	bool finish = m->state == MS_FINISH;
	if (!finish && m->records.len == 0)
		return;
	struct fwd_io *j = calloc(1, sizeof(*j));
	if (!j) {
		log_err("%s forward event=out-of-memory", m->id);
		return;
	}
	memcpy(j->id, m->id, sizeof(j->id));
	if (m->records.len) {
		j->records = m->records.data; /* taken over */
		memset(&m->records, 0, sizeof(m->records));
	}
	j->finish = finish;
	j->job.run = fwd_io_run;
	j->job.done = fwd_io_done;
	m->io_busy = true;
	workq_submit(&j->job);
}

/* every recipient is done: bounce and remove (after the pending records) */
static void fwd_msg_finish(struct fwd_msg *m)
{
	ev_timer_stop(fwd_loop, &m->timer);
	m->state = MS_FINISH;
	fwd_msg_io(m);
}

/* a message read from the queue: keep it and schedule it */
static void fwd_msg_add_loaded(struct queue_envelope *env, bool now)
{
	struct fwd_msg *m = fwd_msg_new(env);
	if (!m) {
		queue_envelope_free(env);
		return;
	}
	fwd_msg_schedule(m, now ? 0 : m->env.next_attempt);
}

static void fwd_load_run(struct workq_job *job)
{
	struct fwd_load *j = (struct fwd_load *)job;
	j->rc = queue_load(fwd_cfg->queue, j->id, &j->env);
}

static void fwd_load_done(struct workq_job *job)
{
	struct fwd_load *j = (struct fwd_load *)job;
	if (j->rc == 0 && !fwd_stopping)
		fwd_msg_add_loaded(&j->env, true);
	else if (j->rc < 0 && !fwd_stopping)
		log_err("%s forward event=load-failed", j->id);
	if (j->rc == 0)
		queue_envelope_free(&j->env);
	free(j);
}

static void fwd_load(const char *id)
{
	if (fwd_stopping || fwd_msg_find(id))
		return;
	struct fwd_load *j = calloc(1, sizeof(*j));
	if (!j)
		return;
	snprintf(j->id, sizeof(j->id), "%s", id);
	j->job.run = fwd_load_run;
	j->job.done = fwd_load_done;
	workq_submit(&j->job);
}

struct fwd_reload {
	ev_timer timer;
	char id[QUEUE_ID_LEN + 1];
};

static void fwd_reload_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct fwd_reload *r = w->data;
	(void)revents;
	ev_timer_stop(loop, w);
	fwd_load(r->id);
	free(r);
}

/* after a disk error: read the message again from the queue in retry_min seconds */
static void fwd_reload_later(const char *id)
{
	struct fwd_reload *r = calloc(1, sizeof(*r));
	if (!r)
		return;
	snprintf(r->id, sizeof(r->id), "%s", id);
	ev_timer_init(&r->timer, fwd_reload_cb, (double)fwd_cfg->retry_min, 0.);
	r->timer.data = r;
	ev_timer_start(fwd_loop, &r->timer);
}

/* --- upstreams -------------------------------------------------------------------- */

static void fwd_rate_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct fwd_upstream *u = w->data;
	(void)loop; (void)revents;
	u->rate_waiting = false;
	fwd_upstream_dispatch(u);
}

/* may one more message start now? If not, wake up when the window allows */
static bool fwd_rate_allows(struct fwd_upstream *u)
{
	if (!u->cfg->rate_count)
		return true;
	time_t now = time(NULL);
	if (ratelimit_allows(&u->rate, now, 1))
		return true;
	if (!u->rate_waiting) {
		uint32_t wait = ratelimit_wait(&u->rate, now, 1);
		u->rate_waiting = true;
		ev_timer_set(&u->rate_timer, wait ? (double)wait : 1., 0.);
		ev_timer_start(fwd_loop, &u->rate_timer);
		log_info("forward event=paced upstream=%s rate=%u/%us waiting=%u wait=%us", u->name, u->cfg->rate_count,
			 u->cfg->rate_window, u->nwait, wait);
	}
	return false;
}

static struct fwd_msg *fwd_upstream_pop(struct fwd_upstream *u)
{
	struct fwd_msg *m = u->wait_head;
	if (!m)
		return NULL;
	u->wait_head = m->wnext;
	if (!u->wait_head)
		u->wait_tail = NULL;
	u->nwait--;
	m->wnext = NULL;
	m->waiting_at = NULL;
	return m;
}

static struct fwd_session *fwd_session_new(struct fwd_upstream *u);
static void fwd_session_take(struct fwd_session *s, struct fwd_msg *m);

/* hand waiting messages to idle sessions, and open sessions for the rest */
static void fwd_upstream_dispatch(struct fwd_upstream *u)
{
	if (fwd_stopping)
		return;
	while (u->wait_head) {
		if (!fwd_rate_allows(u))
			return; /* held in memory until the window has room (rate_timer) */
		struct fwd_session *s;
		for (s = u->sessions; s; s = s->next)
			if (!s->dead && s->state == FS_READY)
				break;
		if (!s)
			break;
		struct fwd_msg *m = fwd_upstream_pop(u);
		if (u->cfg->rate_count)
			ratelimit_add(&u->rate, time(NULL), 1);
		fwd_session_take(s, m);
	}
	while (u->nwait > u->nsetup && u->nsessions < u->cfg->max_connections)
		if (!fwd_session_new(u))
			break;
}

/* messages waiting at an upstream that has no working session left try the next one */
static void fwd_upstream_reroute(struct fwd_upstream *u, const char *why)
{
	for (struct fwd_session *s = u->sessions; s; s = s->next)
		if (!s->dead && s->established)
			return;
	struct fwd_msg *list = NULL, **tail = &list, *m;
	while ((m = fwd_upstream_pop(u))) {
		*tail = m;
		tail = &m->wnext;
	}
	while ((m = list)) {
		list = m->wnext;
		m->wnext = NULL;
		m->tried[u->index] = true;
		snprintf(m->last_error, sizeof(m->last_error), "%.200s: %.300s", u->name, why);
		fwd_msg_route(m);
	}
}

static void fwd_upstream_failed(struct fwd_upstream *u)
{
	unsigned base = fwd_cfg->retry_min < FWD_DOWN_BASE_MAX ? fwd_cfg->retry_min : FWD_DOWN_BASE_MAX;
	unsigned down = base;
	u->fail_streak++;
	u->stat_failures++;
	for (unsigned i = 1; i < u->fail_streak && down < fwd_cfg->retry_max; i++)
		down *= 2;
	if (down > fwd_cfg->retry_max)
		down = fwd_cfg->retry_max;
	u->down_until = ev_now(fwd_loop) + down;
}

/* --- the session: set-up ----------------------------------------------------------- */

static struct fwd_session *fwd_session_find(uint64_t id)
{
	for (int i = 0; i < fwd_nup; i++)
		for (struct fwd_session *s = fwd_up[i].sessions; s; s = s->next)
			if (s->id == id)
				return s;
	return NULL;
}

static void fwd_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void fwd_timer(struct fwd_session *s, double t)
{
	ev_timer_stop(fwd_loop, &s->timer);
	ev_timer_set(&s->timer, t, 0.);
	ev_timer_start(fwd_loop, &s->timer);
}

static void fwd_resolve_run(struct workq_job *job)
{
	struct fwd_resolve *j = (struct fwd_resolve *)job;
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG };
	j->rc = getaddrinfo(j->host, j->port, &hints, &j->res);
}

static void fwd_connect_next(struct fwd_session *s);

static void fwd_resolve_done(struct workq_job *job)
{
	struct fwd_resolve *j = (struct fwd_resolve *)job;
	struct fwd_session *s = fwd_stopping ? NULL : fwd_session_find(j->sid);
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
		fwd_session_fail(s, why);
		return;
	}
	s->ai = s->ai_next = j->res;
	free(j);
	fwd_enter_state(s, FS_CONNECT);
}

static const struct conn_ops fwd_conn_ops;

static void fwd_connect_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct fwd_session *s = w->data;
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
		fwd_connect_next(s);
		return;
	}
	int fd = s->fd;
	s->fd = -1;
	conn_init(&s->conn, fwd_loop, fd, &fwd_conn_ops, s);
	s->conn_live = true;
	s->up->stat_conns++;
	if (s->up->cfg->tls == UPSTREAM_TLS_IMPLICIT) {
		fwd_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->up->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			fwd_session_fail(s, "cannot start TLS");
		return;
	}
	fwd_enter_state(s, FS_GREETING);
}

/* connect to the next address of the upstream (non-blocking) */
static void fwd_connect_next(struct fwd_session *s)
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
		ev_io_init(&s->cio, fwd_connect_cb, fd, EV_WRITE);
		s->cio.data = s;
		ev_io_start(fwd_loop, &s->cio);
		return;
	}
	fwd_session_fail(s, s->last_connect_error[0] ? s->last_connect_error : "no address");
}

static int fwd_sasl_simple(void *ctx, int id, const char **result, unsigned *len)
{
	struct fwd_upstream *u = ctx;
	if (id == SASL_CB_AUTHNAME)
		*result = u->user;
	else if (id == SASL_CB_USER)
		*result = ""; /* no authorization identity: act as the authentication identity */
	else
		return SASL_BADPARAM;
	if (len)
		*len = (unsigned)strlen(*result);
	return SASL_OK;
}

static int fwd_sasl_pass(sasl_conn_t *conn, void *ctx, int id, sasl_secret_t **secret)
{
	struct fwd_upstream *u = ctx;
	(void)conn;
	if (id != SASL_CB_PASS || !u->secret)
		return SASL_BADPARAM;
	*secret = u->secret;
	return SASL_OK;
}

static struct fwd_session *fwd_session_new(struct fwd_upstream *u)
{
	struct fwd_session *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->id = ++fwd_next_sid;
	queue_new_id(s->idstr);
	s->up = u;
	s->fd = -1;
	ev_init(&s->timer, fwd_timeout_cb);
	s->timer.data = s;
	s->next = u->sessions;
	u->sessions = s;
	u->nsessions++;
	u->nsetup++;
	log_debug("%s forward event=connecting upstream=%s", s->idstr, u->name);
	struct fwd_resolve *j = calloc(1, sizeof(*j));
	if (!j) {
		fwd_session_fail(s, "out of memory");
		return NULL;
	}
	j->sid = s->id;
	snprintf(j->host, sizeof(j->host), "%s", u->cfg->host);
	snprintf(j->port, sizeof(j->port), "%s", u->cfg->port);
	j->job.run = fwd_resolve_run;
	j->job.done = fwd_resolve_done;
	fwd_enter_state(s, FS_RESOLVE);
	workq_submit(&j->job);
	return s;
}

static void fwd_reaper_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	while (fwd_graveyard) {
		struct fwd_session *s = fwd_graveyard;
		fwd_graveyard = s->next;
		free(s);
	}
}

static void fwd_tx_clear(struct fwd_session *s)
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
	s->body_len = s->body_off = 0;
	s->msg = NULL;
}

/* release everything but the struct itself, which the reaper frees from the loop */
static void fwd_session_free(struct fwd_session *s)
{
	if (s->dead)
		return;
	struct fwd_upstream *u = s->up;
	s->dead = true;
	if (s->msg)
		fwd_tx_done(s, "connection closed");
	for (struct fwd_session **p = &u->sessions; *p; p = &(*p)->next) {
		if (*p == s) {
			*p = s->next;
			break;
		}
	}
	u->nsessions--;
	if (!s->established)
		u->nsetup--;
	ev_timer_stop(fwd_loop, &s->timer);
	ev_io_stop(fwd_loop, &s->cio);
	if (s->fd >= 0)
		close(s->fd);
	if (s->conn_live)
		conn_close(&s->conn);
	if (s->sasl)
		sasl_dispose(&s->sasl);
	if (s->ai)
		freeaddrinfo(s->ai);
	buf_free(&s->rtext);
	fwd_tx_clear(s);
	log_debug("%s forward event=closed upstream=%s", s->idstr, u->name);
	s->next = fwd_graveyard;
	fwd_graveyard = s;
	if (!ev_is_active(&fwd_reaper)) {
		ev_timer_set(&fwd_reaper, 0., 0.);
		ev_timer_start(fwd_loop, &fwd_reaper);
	}
}

/* the connection or the upstream failed: mark it down, the messages try elsewhere */
static void fwd_session_fail(struct fwd_session *s, const char *why)
{
	if (s->dead)
		return;
	struct fwd_upstream *u = s->up;
	char reason[512];
	fwd_logsafe(why, reason, sizeof(reason));
	log_warn("%s forward event=upstream-failed upstream=%s state=%s reason=\"%s\"", s->idstr, u->name,
		 fwd_strstate(s->state), reason);
	fwd_upstream_failed(u);
	char text[600];
	snprintf(text, sizeof(text), "%s (%s)", reason, fwd_strstate(s->state));
	if (s->msg)
		fwd_tx_done(s, text);
	fwd_session_free(s);
	fwd_upstream_reroute(u, text);
	fwd_upstream_dispatch(u);
}

/* an orderly end (idle QUIT, upstream closing an idle connection): no failure */
static void fwd_session_close(struct fwd_session *s)
{
	struct fwd_upstream *u = s->up;
	fwd_session_free(s);
	fwd_upstream_dispatch(u);
}

/* --- the session: commands ---------------------------------------------------------- */

static void fwd_send(struct fwd_session *s, const struct buf *b)
{
	if (b->len)
		conn_write(&s->conn, b->data, b->len);
}

static void fwd_sendline(struct fwd_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fwd_sendline(struct fwd_session *s, const char *fmt, ...)
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

static void fwd_notify_param(unsigned notify, char *out, size_t outlen)
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

static void fwd_add_rcpt(struct fwd_session *s, struct buf *b, size_t j)
{
	const struct queue_rcpt *r = &s->msg->env.rcpt[s->rcpts[j]];
	char notify[64] = "";
	buf_printf(b, "RCPT TO:<%s>", r->addr);
	if (s->ext_dsn && r->notify) {
		fwd_notify_param(r->notify, notify, sizeof(notify));
		buf_printf(b, "%s", notify);
	}
	if (s->ext_dsn && r->orcpt)
		buf_printf(b, " ORCPT=%s", r->orcpt);
	buf_printf(b, "\r\n");
}

static bool fwd_has_8bit(const char *p)
{
	for (; *p; p++)
		if ((unsigned char)*p & 0x80)
			return true;
	return false;
}

/* does the message need SMTPUTF8 (RFC 6531): flagged, and non-ASCII in it somewhere? */
static bool fwd_needs_utf8(const struct fwd_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	if (!env->smtputf8)
		return false;
	if (fwd_has_8bit(env->from) || s->body_8bit)
		return true;
	for (size_t i = 0; i < env->nrcpt; i++)
		if (fwd_has_8bit(env->rcpt[i].addr))
			return true;
	return false;
}

static void fwd_send_mail(struct fwd_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	struct buf b = { 0 };
	buf_printf(&b, "MAIL FROM:<%s>", env->from);
	if (s->ext_size)
		buf_printf(&b, " SIZE=%zu", env->size);
	if (s->ext_8bitmime && (env->body != QUEUE_BODY_7BIT || s->body_8bit))
		buf_printf(&b, " BODY=8BITMIME");
	if (s->ext_smtputf8 && fwd_needs_utf8(s))
		buf_printf(&b, " SMTPUTF8");
	if (s->ext_dsn && env->ret)
		buf_printf(&b, " RET=%s", env->ret);
	if (s->ext_dsn && env->envid)
		buf_printf(&b, " ENVID=%s", env->envid);
	buf_printf(&b, "\r\n");
	s->pipelined = s->ext_pipelining;
	if (s->pipelined) { /* RFC 2920 §3.1: MAIL, every RCPT and DATA in one go */
		for (size_t j = 0; j < s->nrcpts; j++)
			fwd_add_rcpt(s, &b, j);
		s->rcpt_sent = s->nrcpts;
		buf_printf(&b, "DATA\r\n");
	}
	fwd_send(s, &b);
	buf_free(&b);
}

/* write the next part of the body while the output buffer is low */
static void fwd_body_push(struct fwd_session *s)
{
	while (s->body_off < s->body_len && s->conn.out.len < FWD_CHUNK) {
		size_t n = s->body_len - s->body_off;
		if (n > FWD_CHUNK)
			n = FWD_CHUNK;
		if (conn_write(&s->conn, s->body + s->body_off, n) < 0)
			return;
		s->body_off += n;
	}
}

static void fwd_auth_start(struct fwd_session *s)
{
	struct fwd_upstream *u = s->up;
	const char *mechlist = s->ext_plain && s->ext_login ? "PLAIN LOGIN" : s->ext_plain ? "PLAIN" : "LOGIN";
	if (!s->ext_plain && !s->ext_login) {
		fwd_session_fail(s, "upstream offers neither AUTH PLAIN nor AUTH LOGIN");
		return;
	}
	s->sasl_cb[0] = (sasl_callback_t){ SASL_CB_AUTHNAME, (int (*)(void))(void (*)(void))fwd_sasl_simple, u };
	s->sasl_cb[1] = (sasl_callback_t){ SASL_CB_USER, (int (*)(void))(void (*)(void))fwd_sasl_simple, u };
	s->sasl_cb[2] = (sasl_callback_t){ SASL_CB_PASS, (int (*)(void))(void (*)(void))fwd_sasl_pass, u };
	s->sasl_cb[3] = (sasl_callback_t){ SASL_CB_LIST_END, NULL, NULL };
	int rc = sasl_client_new("smtp", u->cfg->host, NULL, NULL, s->sasl_cb, 0, &s->sasl);
	if (rc != SASL_OK) {
		fwd_session_fail(s, sasl_errstring(rc, NULL, NULL));
		return;
	}
	const char *out = NULL, *mech = NULL;
	unsigned outlen = 0;
	rc = sasl_client_start(s->sasl, mechlist, NULL, &out, &outlen, &mech);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		char why[256];
		snprintf(why, sizeof(why), "sasl_client_start: %s", sasl_errdetail(s->sasl));
		fwd_session_fail(s, why);
		return;
	}
	if (!out) {
		fwd_sendline(s, "AUTH %s", mech);
	} else if (outlen == 0) {
		fwd_sendline(s, "AUTH %s =", mech);
	} else {
		unsigned blen = (outlen + 2) / 3 * 4 + 1, elen = 0;
		char *b64 = malloc(blen);
		if (!b64 || sasl_encode64(out, outlen, b64, blen, &elen) != SASL_OK) {
			free(b64);
			fwd_session_fail(s, "cannot encode the AUTH response");
			return;
		}
		struct buf b = { 0 };
		buf_printf(&b, "AUTH %s %s\r\n", mech, b64);
		fwd_send(s, &b);
		explicit_bzero(b64, elen);
		explicit_bzero(b.data, b.len);
		free(b64);
		buf_free(&b);
	}
	log_debug("%s forward event=auth-start upstream=%s mech=%s", s->idstr, u->name, mech);
}

/* a 334 challenge: one SASL step, the base64 answer on its own line */
static void fwd_auth_step(struct fwd_session *s, const char *challenge)
{
	size_t clen = strlen(challenge);
	unsigned inlen = 0, outlen = 0;
	const char *out = NULL;
	char *in = malloc(clen + 1);
	if (!in || (clen && sasl_decode64(challenge, (unsigned)clen, in, (unsigned)clen + 1, &inlen) != SASL_OK)) {
		free(in);
		fwd_sendline(s, "*");
		fwd_session_fail(s, "AUTH: cannot decode the server challenge");
		return;
	}
	int rc = sasl_client_step(s->sasl, in, inlen, NULL, &out, &outlen);
	free(in);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		fwd_sendline(s, "*");
		fwd_session_fail(s, "AUTH: SASL step failed");
		return;
	}
	unsigned blen = (outlen + 2) / 3 * 4 + 3, elen = 0;
	char *b64 = malloc(blen);
	if (!b64 || (outlen && sasl_encode64(out, outlen, b64, blen, &elen) != SASL_OK)) {
		free(b64);
		fwd_session_fail(s, "AUTH: cannot encode the response");
		return;
	}
	b64[elen++] = '\r';
	b64[elen++] = '\n';
	conn_write(&s->conn, b64, elen);
	explicit_bzero(b64, elen);
	free(b64);
}

/* enter a state: sends that state's command */
static void fwd_enter_state(struct fwd_session *s, enum fwd_state st)
{
	log_debug("%s forward event=state from=%s to=%s", s->idstr, fwd_strstate(s->state), fwd_strstate(st));
	s->state = st;
	switch (st) {
	case FS_RESOLVE:
		fwd_timer(s, FWD_TIMEOUT_CONNECT);
		break;
	case FS_CONNECT:
		fwd_timer(s, FWD_TIMEOUT_CONNECT);
		fwd_connect_next(s);
		break;
	case FS_HANDSHAKE:
		fwd_timer(s, FWD_TIMEOUT_CONNECT);
		break;
	case FS_GREETING:
		fwd_timer(s, fwd_reply_timeout);
		break;
	case FS_EHLO:
		fwd_timer(s, fwd_reply_timeout);
		fwd_sendline(s, "EHLO %s", fwd_cfg->hostname);
		break;
	case FS_STARTTLS:
		fwd_timer(s, fwd_reply_timeout);
		fwd_sendline(s, "STARTTLS");
		break;
	case FS_AUTH:
		fwd_timer(s, fwd_reply_timeout);
		fwd_auth_start(s);
		break;
	case FS_READY:
		fwd_timer(s, FWD_IDLE);
		break;
	case FS_PREPARE:
		fwd_timer(s, fwd_reply_timeout);
		break;
	case FS_MAIL:
		fwd_timer(s, fwd_reply_timeout);
		fwd_send_mail(s);
		break;
	case FS_RCPT:
		fwd_timer(s, fwd_reply_timeout);
		if (!s->pipelined) {
			struct buf b = { 0 };
			fwd_add_rcpt(s, &b, s->rcpt_sent++);
			fwd_send(s, &b);
			buf_free(&b);
		}
		break;
	case FS_DATA:
		fwd_timer(s, fwd_reply_timeout);
		if (!s->pipelined)
			fwd_sendline(s, "DATA");
		break;
	case FS_BODY:
		fwd_timer(s, 2 * fwd_reply_timeout); /* RFC 5321 §4.5.3.2.6: 10 minutes after the dot */
		if (s->body_abort)
			fwd_sendline(s, ".");
		else
			fwd_body_push(s);
		break;
	case FS_RSET:
		fwd_timer(s, fwd_reply_timeout);
		fwd_sendline(s, "RSET");
		break;
	case FS_QUIT:
		fwd_timer(s, FWD_QUIT_WAIT);
		fwd_sendline(s, "QUIT");
		break;
	}
}

/* --- the session: a message ----------------------------------------------------------- */

static void fwd_body_run(struct workq_job *job)
{
	struct fwd_body *j = (struct fwd_body *)job;
	struct queue_envelope env = { 0 };
	memcpy(env.id, j->id, sizeof(env.id));
	env.size = j->size;
	env.body_offset = j->offset;
	char *raw = NULL;
	if (queue_read_body(fwd_cfg->queue, &env, &raw) < 0) {
		j->rc = -1;
		return;
	}
	/* RFC 5321 §4.5.2: a line starting with '.' gets another one */
	int rc = 0;
	size_t start = 0;
	bool line_start = true;
	for (size_t i = 0; i < j->size; i++) {
		unsigned char ch = (unsigned char)raw[i];
		if (ch & 0x80)
			j->has8bit = true;
		if (line_start && ch == '.') {
			rc |= buf_append(&j->out, raw + start, i - start);
			rc |= buf_append(&j->out, ".", 1);
			start = i;
		}
		line_start = ch == '\n';
	}
	rc |= buf_append(&j->out, raw + start, j->size - start);
	if (j->size > 0 && !(j->size >= 2 && raw[j->size - 2] == '\r' && raw[j->size - 1] == '\n'))
		rc |= buf_append(&j->out, "\r\n", 2);
	rc |= buf_append(&j->out, ".\r\n", 3);
	free(raw);
	j->rc = rc ? -1 : 0;
}

/* a transaction cannot start: every pending recipient fails for good with this reply */
static void fwd_tx_refuse(struct fwd_session *s, int code, const char *text)
{
	for (size_t j = 0; j < s->nrcpts; j++) {
		s->rcode[j] = code;
		s->rreply[j] = strdup(text);
	}
	fwd_tx_done(s, text);
	fwd_session_ready(s);
}

static void fwd_body_done(struct workq_job *job)
{
	struct fwd_body *j = (struct fwd_body *)job;
	struct fwd_session *s = fwd_stopping ? NULL : fwd_session_find(j->sid);
	if (!s || s->dead || s->state != FS_PREPARE || !s->msg || strcmp(s->msg->id, j->id)) {
		buf_free(&j->out);
		free(j);
		return;
	}
	if (j->rc < 0) {
		buf_free(&j->out);
		free(j);
		fwd_tx_done(s, "cannot read the message from the queue");
		fwd_session_ready(s);
		return;
	}
	s->body = j->out.data;
	s->body_len = j->out.len;
	s->body_8bit = j->has8bit;
	free(j);
	/* what this upstream cannot take fails now, for good (never a retry loop) */
	char text[300];
	if (s->ext_size && s->ext_size_max && s->msg->env.size > s->ext_size_max) {
		snprintf(text, sizeof(text), "5.3.4 Message size %zu exceeds the upstream's limit of %llu",
			 s->msg->env.size, s->ext_size_max);
		fwd_tx_refuse(s, 552, text);
	} else if (s->body_8bit && !s->ext_8bitmime) {
		fwd_tx_refuse(s, 554, "5.6.3 8-bit content, and the upstream does not support 8BITMIME");
	} else if (fwd_needs_utf8(s) && !s->ext_smtputf8) {
		fwd_tx_refuse(s, 553, "5.6.7 Internationalized message, and the upstream does not support SMTPUTF8");
	} else {
		s->tx_started = ev_now(fwd_loop);
		fwd_enter_state(s, FS_MAIL);
	}
}

/* an idle session takes a message: its body is read on a worker first */
static void fwd_session_take(struct fwd_session *s, struct fwd_msg *m)
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
	struct fwd_body *j = calloc(1, sizeof(*j));
	if (!s->rcpts || !s->accepted || !s->rcode || !s->rreply || !j) {
		free(j);
		fwd_tx_done(s, "out of memory");
		fwd_session_ready(s);
		return;
	}
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (!m->env.rcpt[i].done_code)
			s->rcpts[s->nrcpts++] = i;
	fwd_enter_state(s, FS_PREPARE);
	j->sid = s->id;
	memcpy(j->id, m->id, sizeof(j->id));
	j->size = m->env.size;
	j->offset = m->env.body_offset;
	j->job.run = fwd_body_run;
	j->job.done = fwd_body_done;
	workq_submit(&j->job);
}

/* the transaction ended (or could not happen): per-recipient results go to the message,
 * which then finishes, or tries the next upstream for what is still pending */
static void fwd_tx_done(struct fwd_session *s, const char *why)
{
	struct fwd_msg *m = s->msg;
	struct fwd_upstream *u = s->up;
	if (!m)
		return;
	double now = ev_now(fwd_loop);
	double delay = (double)time(NULL) - (double)m->env.created;
	bool any_ok = false;
	const char *transient = NULL;
	for (size_t j = 0; j < s->nrcpts; j++) {
		size_t i = s->rcpts[j];
		int code = s->rcode[j];
		const char *reply = s->rreply[j] ? s->rreply[j] : why;
		char logreply[600], text[1024];
		fwd_logsafe(reply, logreply, sizeof(logreply));
		if (code >= 200 && code < 300) {
			snprintf(text, sizeof(text), "[%s] %s", u->cfg->host, reply);
			log_info("%s forward event=delivered upstream=%s rcpt=<%s> reply=\"%d %s\" delay=%.2f", m->id,
				 u->name, m->env.rcpt[i].addr, code, logreply, delay);
			fwd_msg_done_rcpt(m, i, code, text);
			fwd_stat_rcpt_ok++;
			u->stat_rcpts++;
			any_ok = true;
		} else if (code >= 500) {
			snprintf(text, sizeof(text), "[%s] %s", u->cfg->host, reply);
			log_info("%s forward event=failed upstream=%s rcpt=<%s> reply=\"%d %s\" delay=%.2f", m->id, u->name,
				 m->env.rcpt[i].addr, code, logreply, delay);
			fwd_msg_done_rcpt(m, i, code, text);
			fwd_stat_rcpt_failed++;
		} else {
			if (code)
				snprintf(m->last_error, sizeof(m->last_error), "%.200s said: %d %.290s", u->name, code, logreply);
			else
				snprintf(m->last_error, sizeof(m->last_error), "%.200s: %.300s", u->name, logreply);
			transient = m->last_error;
		}
	}
	if (any_ok) {
		u->stat_msgs++;
		u->stat_lat_last = now - s->tx_started;
		u->stat_lat_sum += u->stat_lat_last;
		u->stat_lat_n++;
	}
	fwd_tx_clear(s);
	if (fwd_stopping)
		return;
	if (fwd_msg_all_done(m)) {
		fwd_msg_finish(m);
		return;
	}
	fwd_msg_io(m);
	if (transient)
		log_info("%s forward event=attempt-failed upstream=%s reason=\"%s\"", m->id, u->name, transient);
	m->tried[u->index] = true;
	fwd_msg_route(m);
}

/* the session can take the next message (or idles) */
static void fwd_session_ready(struct fwd_session *s)
{
	struct fwd_upstream *u = s->up;
	if (s->dead)
		return;
	if (s->must_close) {
		fwd_session_close(s);
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
	if (fwd_stopping) {
		fwd_enter_state(s, FS_QUIT);
		return;
	}
	fwd_enter_state(s, FS_READY);
	fwd_upstream_dispatch(u);
}

/* --- the session: replies ----------------------------------------------------------------- */

static void fwd_parse_ehlo(struct fwd_session *s, const char *text)
{
	s->ext_starttls = s->ext_pipelining = s->ext_8bitmime = s->ext_smtputf8 = s->ext_dsn = s->ext_size = false;
	s->ext_plain = s->ext_login = false;
	s->ext_size_max = 0;
	const char *line = strchr(text, '\n'); /* the first line is the greeting */
	while (line) {
		line++;
		const char *end = strchr(line, '\n');
		size_t len = end ? (size_t)(end - line) : strlen(line);
		char kw[512];
		snprintf(kw, sizeof(kw), "%.*s", (int)(len < sizeof(kw) - 1 ? len : sizeof(kw) - 1), line);
		char *arg = kw + strcspn(kw, " =");
		if (*arg)
			*arg++ = '\0';
		if (!strcasecmp(kw, "STARTTLS"))
			s->ext_starttls = true;
		else if (!strcasecmp(kw, "PIPELINING"))
			s->ext_pipelining = true;
		else if (!strcasecmp(kw, "8BITMIME"))
			s->ext_8bitmime = true;
		else if (!strcasecmp(kw, "SMTPUTF8"))
			s->ext_smtputf8 = true;
		else if (!strcasecmp(kw, "DSN"))
			s->ext_dsn = true;
		else if (!strcasecmp(kw, "SIZE")) {
			s->ext_size = true;
			s->ext_size_max = strtoull(arg, NULL, 10);
		} else if (!strcasecmp(kw, "AUTH")) {
			for (char *tok = strtok(arg, " "); tok; tok = strtok(NULL, " ")) {
				if (!strcasecmp(tok, "PLAIN"))
					s->ext_plain = true;
				else if (!strcasecmp(tok, "LOGIN"))
					s->ext_login = true;
			}
		}
		line = end;
	}
}

/* the reply's first line, for logs and records */
static void fwd_reply_line(const struct fwd_session *s, char *out, size_t outlen)
{
	const char *t = s->rtext.data ? s->rtext.data : "";
	size_t n = strcspn(t, "\n");
	snprintf(out, outlen, "%.*s", (int)(n < outlen - 1 ? n : outlen - 1), t);
}

/* one complete reply: the state decides */
static void forward_response(struct fwd_session *s, int code)
{
	char line[600], why[700];
	fwd_reply_line(s, line, sizeof(line));
	snprintf(why, sizeof(why), "%d %s", code, line);
	int cls = code / 100;
	/* RFC 5321 §3.8: 421 means the server closes; the transaction, if any, is transient */
	if (code == 421 && s->state >= FS_READY && s->state != FS_QUIT) {
		s->must_close = true;
		if (s->msg) {
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j])
					s->rcode[j] = 0;
			fwd_tx_done(s, why);
		}
		fwd_session_close(s);
		return;
	}
	switch (s->state) {
	case FS_RESOLVE:
	case FS_CONNECT:
	case FS_HANDSHAKE:
		break;
	case FS_GREETING:
		if (cls == 2)
			fwd_enter_state(s, FS_EHLO);
		else
			fwd_session_fail(s, why);
		break;
	case FS_EHLO:
		if (cls != 2) {
			fwd_session_fail(s, why);
			break;
		}
		fwd_parse_ehlo(s, s->rtext.data ? s->rtext.data : "");
		if (s->up->cfg->tls == UPSTREAM_TLS_STARTTLS && !s->tls) {
			if (s->ext_starttls)
				fwd_enter_state(s, FS_STARTTLS);
			else
				fwd_session_fail(s, "upstream does not offer STARTTLS (tls=starttls: never sent in clear)");
		} else if (s->up->user && !s->authed) {
			fwd_enter_state(s, FS_AUTH);
		} else {
			fwd_session_ready(s);
		}
		break;
	case FS_STARTTLS:
		if (code != 220) {
			fwd_session_fail(s, why);
			break;
		}
		fwd_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->up->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			fwd_session_fail(s, "cannot start TLS");
		break;
	case FS_AUTH:
		if (code == 334) {
			const char *sp = s->rtext.data ? s->rtext.data : "";
			fwd_auth_step(s, sp);
		} else if (code == 235) {
			s->authed = true;
			sasl_dispose(&s->sasl);
			fwd_session_ready(s);
		} else {
			snprintf(why, sizeof(why), "AUTH refused: %d %s", code, line);
			fwd_session_fail(s, why);
		}
		break;
	case FS_READY:
	case FS_PREPARE:
		log_info("%s forward event=unexpected-reply upstream=%s state=%s reply=\"%d\"", s->idstr, s->up->name,
			 fwd_strstate(s->state), code);
		break;
	case FS_MAIL:
		if (cls == 2) {
			fwd_enter_state(s, FS_RCPT);
			break;
		}
		for (size_t j = 0; j < s->nrcpts; j++) { /* 5xx: all fail; 4xx: all wait */
			s->rcode[j] = cls == 5 ? code : 0;
			s->rreply[j] = strdup(line);
		}
		if (s->pipelined) { /* the RCPT and DATA replies still come */
			s->mail_refused = true;
			fwd_enter_state(s, FS_RCPT);
		} else {
			fwd_tx_done(s, why);
			fwd_enter_state(s, FS_RSET);
		}
		break;
	case FS_RCPT: {
		size_t j = s->rcpt_reply++;
		if (j < s->nrcpts && !s->mail_refused) {
			if (cls == 2) {
				s->accepted[j] = true;
				s->naccepted++;
			} else {
				s->rcode[j] = cls == 5 ? code : 0;
				free(s->rreply[j]);
				s->rreply[j] = strdup(line);
			}
		}
		if (s->rcpt_reply < s->nrcpts) {
			if (!s->pipelined)
				fwd_enter_state(s, FS_RCPT);
			break;
		}
		if (s->pipelined || s->naccepted > 0) {
			fwd_enter_state(s, FS_DATA);
		} else {
			fwd_tx_done(s, why);
			fwd_enter_state(s, FS_RSET);
		}
		break;
	}
	case FS_DATA:
		if (code == 354) {
			/* RFC 2920 §3.1: 354 after every RCPT failed: send the lone dot */
			s->body_abort = s->mail_refused || s->naccepted == 0;
			fwd_enter_state(s, FS_BODY);
			break;
		}
		if (!s->mail_refused)
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j]) {
					s->rcode[j] = cls == 5 ? code : 0;
					free(s->rreply[j]);
					s->rreply[j] = strdup(line);
				}
		fwd_tx_done(s, why);
		fwd_enter_state(s, FS_RSET);
		break;
	case FS_BODY:
		if (s->body_off < s->body_len && !s->body_abort)
			s->must_close = true; /* replied before the body was complete: out of sync */
		if (!s->body_abort && !s->mail_refused)
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j]) {
					s->rcode[j] = cls == 2 || cls == 5 ? code : 0;
					free(s->rreply[j]);
					s->rreply[j] = strdup(line);
				}
		fwd_tx_done(s, why);
		if (s->must_close)
			fwd_session_close(s);
		else
			fwd_enter_state(s, FS_RSET);
		break;
	case FS_RSET:
		if (cls == 2)
			fwd_session_ready(s);
		else
			fwd_session_close(s);
		break;
	case FS_QUIT:
		fwd_session_free(s);
		break;
	}
}

/* split c->in into replies (RFC 5321 §4.2.1: "ddd-" continues, "ddd " or "ddd" ends) */
static void fwd_on_read(struct conn *c, void *arg)
{
	struct fwd_session *s = arg;
	while (!s->dead && s->state != FS_HANDSHAKE) {
		char *nl = memchr(c->in.data, '\n', c->in.len);
		if (!nl) {
			if (c->in.len > FWD_REPLY_MAX)
				fwd_session_fail(s, "reply line too long");
			return;
		}
		size_t len = (size_t)(nl - c->in.data);
		size_t tl = len && c->in.data[len - 1] == '\r' ? len - 1 : len;
		char *p = c->in.data;
		if (tl < 3 || p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9' ||
		    (tl > 3 && p[3] != ' ' && p[3] != '-')) {
			fwd_session_fail(s, "malformed reply from the upstream");
			return;
		}
		int code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
		bool more = tl > 3 && p[3] == '-';
		if (s->rtext.len)
			buf_append(&s->rtext, "\n", 1);
		if (tl > 4)
			buf_append(&s->rtext, p + 4, tl - 4);
		buf_consume(&c->in, len + 1);
		if (s->rtext.len > FWD_REPLY_MAX) {
			fwd_session_fail(s, "reply too long");
			return;
		}
		if (more)
			continue;
		forward_response(s, code);
		buf_reset(&s->rtext);
	}
}

static void fwd_on_tls(struct conn *c, void *arg)
{
	struct fwd_session *s = arg;
	char info[128];
	if (s->dead)
		return;
	s->tls = true;
	conn_tls_info(c, info, sizeof(info));
	log_debug("%s forward event=tls upstream=%s version=\"%s\" verify=%s", s->idstr, s->up->name, info,
		  s->up->cfg->verify ? "yes" : "no");
	if (s->up->cfg->tls == UPSTREAM_TLS_IMPLICIT)
		fwd_enter_state(s, FS_GREETING);
	else
		fwd_enter_state(s, FS_EHLO); /* RFC 3207 §4.2: forget what EHLO said before */
}

static void fwd_on_drain(struct conn *c, void *arg)
{
	struct fwd_session *s = arg;
	(void)c;
	if (s->dead || s->state != FS_BODY || s->body_abort)
		return;
	if (s->body_off < s->body_len) {
		fwd_timer(s, 2 * fwd_reply_timeout);
		fwd_body_push(s);
	}
}

static void fwd_on_error(struct conn *c, void *arg, const char *why)
{
	struct fwd_session *s = arg;
	(void)c;
	if (s->dead)
		return;
	if (s->state == FS_QUIT) {
		fwd_session_free(s);
		return;
	}
	if (s->state == FS_READY && s->established) { /* the upstream closed an idle connection */
		fwd_session_close(s);
		return;
	}
	fwd_session_fail(s, why);
}

static const struct conn_ops fwd_conn_ops = {
	.on_read = fwd_on_read,
	.on_tls = fwd_on_tls,
	.on_drain = fwd_on_drain,
	.on_error = fwd_on_error,
};

static void fwd_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct fwd_session *s = w->data;
	(void)loop; (void)revents;
	if (s->dead)
		return;
	if (s->state == FS_READY) {
		fwd_enter_state(s, FS_QUIT);
		return;
	}
	if (s->state == FS_QUIT) {
		fwd_session_free(s);
		return;
	}
	char why[64];
	snprintf(why, sizeof(why), "timeout in state %s", fwd_strstate(s->state));
	fwd_session_fail(s, why);
}

/* --- start, stop, control ---------------------------------------------------------------- */

/* "username:password" from a file only relayd can read */
static int fwd_read_secret(struct fwd_upstream *u, char *err, size_t errlen)
{
	const char *path = u->cfg->auth_file;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(err, errlen, "%s:%d: cannot read auth file %s: %s", fwd_cfg->path, u->cfg->line, path,
			 strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (st.st_mode & (S_IRGRP | S_IROTH)) {
		log_warn("forward event=insecure-secret file=%s mode=%03o hint=\"chmod 600 %s\"", path,
			 (unsigned)(st.st_mode & 0777), path);
		snprintf(err, errlen, "%s:%d: auth file %s is readable by group or others: refused (chmod 600 it)",
			 fwd_cfg->path, u->cfg->line, path);
		close(fd);
		return -1;
	}
	char line[1024];
	ssize_t n = read(fd, line, sizeof(line) - 1);
	close(fd);
	if (n < 0)
		n = 0;
	line[n] = '\0';
	line[strcspn(line, "\r\n")] = '\0';
	char *colon = strchr(line, ':');
	if (!colon || colon == line) {
		explicit_bzero(line, sizeof(line));
		snprintf(err, errlen, "%s:%d: auth file %s must hold one line username:password", fwd_cfg->path,
			 u->cfg->line, path);
		return -1;
	}
	*colon = '\0';
	size_t plen = strlen(colon + 1);
	u->user = strdup(line);
	u->secret = malloc(sizeof(sasl_secret_t) + plen + 1);
	if (!u->user || !u->secret) {
		explicit_bzero(line, sizeof(line));
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	u->secret->len = plen;
	memcpy(u->secret->data, colon + 1, plen + 1);
	explicit_bzero(line, sizeof(line));
	return 0;
}

struct fwd_recovery {
	int n, bad;
};

static void fwd_recover_one(const char *id, void *arg)
{
	struct fwd_recovery *r = arg;
	struct queue_envelope env;
	if (queue_load(fwd_cfg->queue, id, &env) < 0) {
		r->bad++;
		return;
	}
	r->n++;
	fwd_msg_add_loaded(&env, false);
}

/* forward_init - credentials, secrets, SASL, recovery */
int forward_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen)
{
	fwd_loop = loop;
	fwd_cfg = cfg;
	fwd_nup = cfg->nupstream;
	if (cfg->timeout_idle && cfg->timeout_idle < FWD_TIMEOUT_REPLY)
		fwd_reply_timeout = cfg->timeout_idle < 10 ? 10. : (double)cfg->timeout_idle;
	ev_init(&fwd_reaper, fwd_reaper_cb);
	for (int i = 0; i < fwd_nup; i++) {
		struct fwd_upstream *u = &fwd_up[i];
		memset(u, 0, sizeof(*u));
		u->index = i;
		u->conf = cfg->upstream[i];
		u->cfg = &u->conf;
		snprintf(u->name, sizeof(u->name), "%s:%s", u->cfg->host, u->cfg->port);
		ev_init(&u->rate_timer, fwd_rate_cb);
		u->rate_timer.data = u;
		if (u->cfg->rate_count)
			ratelimit_set(&u->rate, u->cfg->rate_count, u->cfg->rate_window);
		if (u->cfg->tls != UPSTREAM_TLS_NONE) {
			char terr[512];
			u->cred = tls_client_creds(u->cfg->ca, terr, sizeof(terr));
			if (!u->cred) {
				snprintf(err, errlen, "%s:%d: upstream %s: %s", cfg->path, u->cfg->line, u->name, terr);
				return -1;
			}
		}
		if (u->cfg->auth_file[0]) {
			if (fwd_read_secret(u, err, errlen) < 0)
				return -1;
			if (u->cfg->tls == UPSTREAM_TLS_NONE)
				log_warn("forward event=insecure-auth upstream=%s reason=\"AUTH over tls=none sends the "
					 "password in clear\"", u->name);
			fwd_sasl = true;
		}
	}
	if (fwd_sasl) {
		int rc = sasl_client_init(NULL);
		if (rc != SASL_OK) {
			snprintf(err, errlen, "sasl_client_init: %s", sasl_errstring(rc, NULL, NULL));
			return -1;
		}
	}
	fwd_started = true;
	struct fwd_recovery r = { 0 };
	queue_scan(cfg->queue, fwd_recover_one, &r);
	if (fwd_nup == 0)
		log_warn("forward event=no-upstream messages=%d reason=\"no upstream line: mail stays queued\"", r.n);
	else
		log_info("forward event=started upstreams=%d messages=%d", fwd_nup, r.n);
	return 0;
}

/* forward_notify - a fresh message */
void forward_notify(const char *id)
{
	if (!fwd_started || fwd_stopping)
		return;
	fwd_load(id);
}

/* forward_flush - retry everything deferred now */
void forward_flush(void)
{
	if (!fwd_started || fwd_stopping)
		return;
	for (int i = 0; i < fwd_nup; i++)
		fwd_up[i].down_until = 0;
	int n = 0;
	for (int b = 0; b < FWD_BUCKETS; b++)
		for (struct fwd_msg *m = fwd_table[b]; m; m = m->hnext)
			if (m->state == MS_WAIT) {
				fwd_msg_schedule(m, 0);
				n++;
			}
	log_info("forward event=flush messages=%d", n);
}

/* forward_stats - counters as key=value lines */
void forward_stats(struct buf *out)
{
	unsigned long long queued = 0, deferred = 0, active = 0, waiting = 0;
	for (int b = 0; b < FWD_BUCKETS; b++)
		for (struct fwd_msg *m = fwd_table[b]; m; m = m->hnext) {
			queued++;
			if (m->state == MS_WAIT && m->env.attempts > 0)
				deferred++;
			else if (m->state == MS_ACTIVE)
				active++;
			else if (m->state == MS_QUEUED)
				waiting++;
		}
	buf_printf(out, "queued=%llu\ndeferred=%llu\nactive=%llu\nwaiting=%llu\nforwarded=%llu\nbounced=%llu\n"
		   "dropped=%llu\nrcpt_delivered=%llu\nrcpt_failed=%llu\ndeferrals=%llu\n", queued, deferred, active,
		   waiting, fwd_stat_forwarded, fwd_stat_bounced, fwd_stat_dropped, fwd_stat_rcpt_ok, fwd_stat_rcpt_failed,
		   fwd_stat_deferrals);
	ev_tstamp now = fwd_loop ? ev_now(fwd_loop) : 0;
	for (int i = 0; i < fwd_nup; i++) {
		struct fwd_upstream *u = &fwd_up[i];
		buf_printf(out, "upstream.%d.name=%s\nupstream.%d.state=%s\nupstream.%d.connections=%u\n"
			   "upstream.%d.waiting=%u\nupstream.%d.messages=%llu\nupstream.%d.recipients=%llu\n"
			   "upstream.%d.failures=%llu\nupstream.%d.connects=%llu\n"
			   "upstream.%d.latency_avg_ms=%.0f\nupstream.%d.latency_last_ms=%.0f\n",
			   i, u->name, i, u->down_until > now ? "down" : "up", i, u->nsessions, i, u->nwait, i, u->stat_msgs,
			   i, u->stat_rcpts, i, u->stat_failures, i, u->stat_conns, i,
			   u->stat_lat_n ? 1000. * u->stat_lat_sum / (double)u->stat_lat_n : 0., i,
			   1000. * u->stat_lat_last);
	}
}

static unsigned fwd_live_sessions(void)
{
	unsigned n = 0;
	for (int i = 0; i < fwd_nup; i++)
		n += fwd_up[i].nsessions;
	return n;
}

static void fwd_shutdown_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w; (void)revents;
	ev_break(loop, EVBREAK_ONE);
}

/* forward_shutdown - QUIT what is idle, drop what is busy, free everything */
void forward_shutdown(void)
{
	if (!fwd_started || fwd_stopping)
		return;
	fwd_stopping = true;
	for (int i = 0; i < fwd_nup; i++) {
		struct fwd_upstream *u = &fwd_up[i];
		ev_timer_stop(fwd_loop, &u->rate_timer);
		struct fwd_session *next;
		for (struct fwd_session *s = u->sessions; s; s = next) {
			next = s->next;
			if (s->state == FS_READY || s->state == FS_PREPARE || s->state == FS_RSET) {
				fwd_tx_clear(s); /* a message not yet sent stays as it is on disk */
				fwd_enter_state(s, FS_QUIT);
			} else if (s->state != FS_QUIT) {
				fwd_session_free(s); /* mid-transaction: no D record, sent again next time */
			}
		}
	}
	/* give the QUITs a moment on the loop (it has stopped running by now) */
	if (fwd_live_sessions() > 0) {
		ev_timer t;
		ev_timer_init(&t, fwd_shutdown_timeout, 2., 0.);
		ev_timer_start(fwd_loop, &t);
		while (fwd_live_sessions() > 0 && ev_is_active(&t))
			ev_run(fwd_loop, EVRUN_ONCE);
		ev_timer_stop(fwd_loop, &t);
	}
	for (int i = 0; i < fwd_nup; i++)
		while (fwd_up[i].sessions)
			fwd_session_free(fwd_up[i].sessions);
	ev_timer_stop(fwd_loop, &fwd_reaper);
	fwd_reaper_cb(fwd_loop, &fwd_reaper, 0);
	for (int b = 0; b < FWD_BUCKETS; b++)
		while (fwd_table[b])
			fwd_msg_free(fwd_table[b]);
	for (int i = 0; i < fwd_nup; i++) {
		struct fwd_upstream *u = &fwd_up[i];
		u->wait_head = u->wait_tail = NULL;
		u->nwait = 0;
		if (u->cred)
			gnutls_certificate_free_credentials(u->cred);
		u->cred = NULL;
		if (u->secret) {
			explicit_bzero(u->secret->data, u->secret->len);
			free(u->secret);
			u->secret = NULL;
		}
		free(u->user);
		u->user = NULL;
	}
	if (fwd_sasl)
		sasl_client_done();
	log_info("forward event=stopped");
}
