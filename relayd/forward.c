/*
 * forward - the outbound SMTP client (RFC 5321) with STARTTLS (RFC 3207) or implicit TLS
 * (RFC 8314), AUTH (RFC 4954, Cyrus SASL client: PLAIN, LOGIN), PIPELINING (RFC 2920),
 * SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and DSN parameters (RFC 3461).
 *
 * Two halves in one file:
 *  - the manager: every queued message is a struct forward_msg, found by id. A message is
 *    routed to the first upstream (config order) it has not tried in this round and that
 *    is not marked down; it then waits in that upstream's list until a connection takes it
 *    and the upstream's pacing window allows. When every upstream failed for it, it gets a
 *    T record and waits for its backoff (retry_min doubling to retry_max); after
 *    queue_lifetime its pending recipients fail.
 *  - the session (struct forward_session): mirrors smtp_server.c. Entering a state sends that
 *    state's command (forward_enter_state), and forward_response() switches on the state.
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

#define FORWARD_TIMEOUT_CONNECT 30.
#define FORWARD_TIMEOUT_REPLY   300.    /* RFC 5321 §4.5.3.2: 5 minutes for most replies */
#define FORWARD_IDLE            10.     /* an unused connection is closed (QUIT) after this */
#define FORWARD_QUIT_WAIT       5.
#define FORWARD_REPLY_MAX       65536   /* a longer (multi-line) reply is a protocol error */
#define FORWARD_CHUNK           (256 * 1024)
#define FORWARD_BUCKETS         4096
#define FORWARD_DOWN_BASE_MAX   60u

enum forward_state {
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

enum forward_mstate {
	MS_WAIT,       /* timer running until its next attempt */
	MS_QUEUED,     /* in an upstream's waiting list */
	MS_ACTIVE,     /* taken by a session */
	MS_FINISH,     /* every recipient is done: bounce/removal in progress */
	MS_IDLE        /* nothing scheduled (no upstream configured) */
};

struct forward_upstream;

struct forward_msg {
	char id[QUEUE_ID_LEN + 1];
	struct forward_msg *hnext;          /* id table */
	struct forward_msg *wnext;          /* upstream waiting list */
	struct forward_upstream *waiting_at;
	enum forward_mstate state;
	struct queue_envelope env;      /* envelope and status, kept up to date in memory */
	ev_timer timer;
	bool tried[CONFIG_MAX_UPSTREAM];
	char last_error[512];
	bool gone;                      /* forgotten while a session held it: freed by forward_tx_done */
	/* disk work: one job at a time */
	bool io_busy;
	struct buf records;             /* status lines not yet appended */
};

struct forward_session {
	uint64_t id;
	char idstr[QUEUE_ID_LEN + 1];
	struct forward_session *next;       /* upstream's list */
	struct forward_upstream *up;
	enum forward_state state;
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
	struct forward_msg *msg;
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

struct forward_upstream {
	int index;
	struct upstream_cfg conf;       /* a copy: a SIGHUP reload does not change it under us */
	const struct upstream_cfg *cfg;
	char name[300];                 /* host:port for logs */
	gnutls_certificate_credentials_t cred;
	char *user;
	sasl_secret_t *secret;
	struct forward_session *sessions;
	unsigned nsessions, nsetup;
	struct forward_msg *wait_head, *wait_tail;
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
struct forward_io {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	char *records;
	bool finish;
	bool all_delivered;             /* finish by removal alone: no D records, no bounce */
	int nrcpt;
	char hostname[256];             /* for the bounce (copied: a reload may change it) */
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

struct forward_load {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	struct queue_envelope env;
	int rc;
};

struct forward_resolve {
	struct workq_job job;
	uint64_t sid;
	char host[256], port[16];
	struct addrinfo *res;
	int rc;
};

struct forward_body {
	struct workq_job job;
	uint64_t sid;
	char id[QUEUE_ID_LEN + 1];
	size_t size;
	off_t offset;
	struct buf out;                 /* dot-stuffed */
	bool has8bit;
	int rc;
};

static struct ev_loop *forward_loop;
static const struct config *forward_cfg;
static struct forward_upstream forward_up[CONFIG_MAX_UPSTREAM];
static int forward_nup;
static struct forward_msg *forward_table[FORWARD_BUCKETS];
static struct forward_session *forward_graveyard;
static ev_timer forward_reaper;
static bool forward_stopping;
static bool forward_started;
static bool forward_sasl;
static uint64_t forward_next_sid;
static double forward_reply_timeout = FORWARD_TIMEOUT_REPLY;
static char forward_queue[PATH_MAX];  /* read by workers: a copy, never changed after init */
/* stats */
static unsigned long long forward_stat_forwarded, forward_stat_bounced, forward_stat_dropped, forward_stat_rcpt_ok,
	forward_stat_rcpt_failed, forward_stat_deferrals;

static void forward_msg_route(struct forward_msg *m);
static void forward_msg_io(struct forward_msg *m);
static void forward_msg_finish(struct forward_msg *m);
static void forward_upstream_dispatch(struct forward_upstream *u);
static void forward_enter_state(struct forward_session *s, enum forward_state st);
static void forward_session_fail(struct forward_session *s, const char *why);
static void forward_session_free(struct forward_session *s);
static void forward_session_ready(struct forward_session *s);
static void forward_tx_done(struct forward_session *s, const char *why);

static const char *forward_strstate(enum forward_state st)
{
	static const char *names[] = { "resolve", "connect", "handshake", "greeting", "ehlo", "starttls", "auth",
				       "ready", "prepare", "mail", "rcpt", "data", "body", "rset", "quit" };
	return names[st];
}

/* text safe inside a log value in double quotes */
static void forward_logsafe(const char *in, char *out, size_t outlen)
{
	size_t o = 0;
	for (const char *p = in ? in : ""; *p && o + 1 < outlen; p++)
		out[o++] = *p == '"' ? '\'' : ((unsigned char)*p < 0x20 ? ' ' : *p);
	out[o] = '\0';
}

/* --- messages: the id table ------------------------------------------------------ */

static unsigned forward_hash(const char *id)
{
	unsigned h = 5381;
	for (const char *p = id; *p; p++)
		h = h * 33 + (unsigned char)*p;
	return h % FORWARD_BUCKETS;
}

static struct forward_msg *forward_msg_find(const char *id)
{
	for (struct forward_msg *m = forward_table[forward_hash(id)]; m; m = m->hnext)
		if (!m->gone && !strcmp(m->id, id))
			return m;
	return NULL;
}

static void forward_msg_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* take over a loaded envelope; NULL if the id is known already */
static struct forward_msg *forward_msg_new(struct queue_envelope *env)
{
	if (forward_msg_find(env->id))
		return NULL;
	struct forward_msg *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	memcpy(m->id, env->id, sizeof(m->id));
	m->env = *env;
	memset(env, 0, sizeof(*env));
	if (m->env.last_error)
		snprintf(m->last_error, sizeof(m->last_error), "%s", m->env.last_error);
	ev_init(&m->timer, forward_msg_timer_cb);
	m->timer.data = m;
	m->state = MS_IDLE;
	unsigned h = forward_hash(m->id);
	m->hnext = forward_table[h];
	forward_table[h] = m;
	return m;
}

static void forward_msg_free(struct forward_msg *m)
{
	for (struct forward_msg **p = &forward_table[forward_hash(m->id)]; *p; p = &(*p)->hnext) {
		if (*p == m) {
			*p = m->hnext;
			break;
		}
	}
	ev_timer_stop(forward_loop, &m->timer);
	queue_envelope_free(&m->env);
	buf_free(&m->records);
	free(m);
}

/* drop a message from memory wherever it is (its file changed under us, or went away) */
static void forward_msg_forget(struct forward_msg *m)
{
	if (m->state == MS_ACTIVE) {
		m->gone = true;
		return;
	}
	if (m->state == MS_QUEUED && m->waiting_at) {
		struct forward_upstream *u = m->waiting_at;
		struct forward_msg *prev = NULL;
		for (struct forward_msg *w = u->wait_head; w; prev = w, w = w->wnext) {
			if (w != m)
				continue;
			if (prev)
				prev->wnext = m->wnext;
			else
				u->wait_head = m->wnext;
			if (u->wait_tail == m)
				u->wait_tail = prev;
			u->nwait--;
			break;
		}
	}
	forward_msg_free(m);
}

static bool forward_msg_all_done(const struct forward_msg *m)
{
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (m->env.rcpt[i].done_code == 0)
			return false;
	return true;
}

/* schedule the next attempt at time `when` (unix seconds; <= now means at once) */
static void forward_msg_schedule(struct forward_msg *m, time_t when)
{
	if (forward_nup == 0) {
		m->state = MS_IDLE;
		return;
	}
	double delay = (double)(when - time(NULL));
	m->state = MS_WAIT;
	ev_timer_stop(forward_loop, &m->timer);
	ev_timer_set(&m->timer, delay > 0 ? delay : 0., 0.);
	ev_timer_start(forward_loop, &m->timer);
}

/* record recipient i as finished (in memory now, on disk through the next io job) */
static void forward_msg_done_rcpt(struct forward_msg *m, size_t i, int code, const char *text)
{
	struct queue_rcpt *r = &m->env.rcpt[i];
	char clean[1024];
	forward_logsafe(text, clean, sizeof(clean));
	for (char *p = clean; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	r->done_code = code;
	free(r->done_text);
	r->done_text = strdup(clean);
	buf_printf(&m->records, "%sD %zu %d %s", m->records.len ? "\n" : "", i, code, clean);
}

/* pending recipients fail: the message is too old */
static void forward_msg_expire(struct forward_msg *m)
{
	char text[700];
	snprintf(text, sizeof(text), "4.4.7 Delivery time expired%s%.600s", m->last_error[0] ? ": last error: " : "",
		 m->last_error);
	for (size_t i = 0; i < m->env.nrcpt; i++) {
		if (m->env.rcpt[i].done_code)
			continue;
		log_info("%s forward event=expired rcpt=<%s> attempts=%u", m->id, m->env.rcpt[i].addr, m->env.attempts);
		forward_stat_rcpt_failed++;
		forward_msg_done_rcpt(m, i, 554, text);
	}
	forward_msg_finish(m);
}

static bool forward_msg_expired(const struct forward_msg *m, time_t at)
{
	return forward_cfg->queue_lifetime && at >= m->env.created + (time_t)forward_cfg->queue_lifetime;
}

static unsigned forward_backoff(unsigned attempts)
{
	unsigned d = forward_cfg->retry_min;
	for (unsigned i = 1; i < attempts && d < forward_cfg->retry_max; i++)
		d = d > forward_cfg->retry_max / 2 ? forward_cfg->retry_max : d * 2;
	return d < forward_cfg->retry_max ? d : forward_cfg->retry_max;
}

/* every upstream failed this round: T record and wait */
static void forward_msg_defer(struct forward_msg *m)
{
	time_t now = time(NULL);
	unsigned attempts = m->env.attempts + 1;
	unsigned delay = forward_backoff(attempts);
	if (forward_msg_expired(m, now + (time_t)delay)) {
		m->env.attempts = attempts;
		forward_msg_expire(m);
		return;
	}
	char reason[600];
	forward_logsafe(m->last_error[0] ? m->last_error : "no upstream available", reason, sizeof(reason));
	m->env.attempts = attempts;
	m->env.next_attempt = now + (time_t)delay;
	buf_printf(&m->records, "%sT %u %lld %s", m->records.len ? "\n" : "", attempts, (long long)m->env.next_attempt,
		   reason);
	forward_stat_deferrals++;
	log_info("%s forward event=deferred attempts=%u retry=%us reason=\"%s\"", m->id, attempts, delay, reason);
	forward_msg_schedule(m, m->env.next_attempt);
	forward_msg_io(m);
}

/* the message's time came: start a round over the upstream list */
static void forward_msg_due(struct forward_msg *m)
{
	if (forward_stopping)
		return;
	if (forward_msg_all_done(m)) {
		forward_msg_finish(m);
		return;
	}
	if (forward_msg_expired(m, time(NULL))) {
		forward_msg_expire(m);
		return;
	}
	memset(m->tried, 0, sizeof(m->tried));
	forward_msg_route(m);
}

static void forward_msg_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	forward_msg_due(w->data);
}

/* the next upstream for this round: the first untried one that is up; when all untried
 * ones are down, the one back soonest, but only if nothing was tried yet this round */
static void forward_msg_route(struct forward_msg *m)
{
	ev_tstamp now = ev_now(forward_loop);
	struct forward_upstream *pick = NULL, *soonest = NULL;
	bool any_tried = false;
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
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
		forward_msg_defer(m);
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
	forward_upstream_dispatch(pick);
}

/* --- messages: disk work on workers ---------------------------------------------- */

static void forward_reload_later(const char *id);

/* the finish sequence: bounce for failed recipients (unless null sender), B record, remove */
static void forward_io_finish(struct forward_io *j)
{
	const char *dir = forward_queue;
	struct queue_envelope env;
	if (j->all_delivered) {
		j->delivered = j->nrcpt;
		if (queue_remove(dir, j->id) < 0)
			j->rc = -1, j->err = errno, j->what = "remove";
		return;
	}
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
			n = dsn_build(&env, body, env.size, j->hostname, time(NULL), &dsn);
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

static void forward_io_run(struct workq_job *job)
{
	struct forward_io *j = (struct forward_io *)job;
	if (j->records && queue_append_status(forward_queue, j->id, j->records) < 0) {
		j->rc = -1;
		j->err = errno;
		j->what = "append";
		return;
	}
	if (j->finish)
		forward_io_finish(j);
}

static void forward_msg_add_loaded(struct queue_envelope *env, bool now);

static void forward_io_done(struct workq_job *job)
{
	struct forward_io *j = (struct forward_io *)job;
	struct forward_msg *m = forward_stopping ? NULL : forward_msg_find(j->id);
	if (forward_stopping)
		goto out;
	if (j->rc < 0 && j->err == ENOENT) { /* deleted from the queue meanwhile (relayctl queue delete) */
		log_info("%s forward event=vanished op=%s", j->id, j->what);
		if (m)
			forward_msg_forget(m);
		goto out;
	}
	if (j->rc < 0) {
		log_err("%s forward event=queue-error op=%s error=\"%s\"", j->id, j->what, strerror(j->err));
		/* forget what is in memory; the durable state is read again later */
		if (m)
			forward_msg_forget(m);
		forward_reload_later(j->id);
		goto out;
	}
	if (j->finish) {
		if (j->dropped) {
			forward_stat_dropped++;
			log_warn("%s forward event=dropped reason=bounce-undeliverable failed=%d", j->id, j->failed);
		} else if (j->nobounce) {
			log_info("%s forward event=failed-no-bounce reason=notify failed=%d", j->id, j->failed);
		} else if (j->failed) {
			forward_stat_bounced++;
			log_info("%s forward event=bounced bounce=%s failed=%d delivered=%d", j->id, j->bounce_id, j->failed,
				 j->delivered);
		} else {
			forward_stat_forwarded++;
		}
		log_info("%s forward event=removed delivered=%d failed=%d", j->id, j->delivered, j->failed);
		if (m)
			forward_msg_free(m);
		if (j->have_bounce)
			forward_msg_add_loaded(&j->bounce, true);
		goto out;
	}
	if (m) {
		m->io_busy = false;
		forward_msg_io(m); /* more records, or the finish, may have come meanwhile */
	}
out:
	if (j->have_bounce)
		queue_envelope_free(&j->bounce);
	free(j->records);
	free(j);
}

/* start the next disk job of a message if none runs */
static void forward_msg_io(struct forward_msg *m)
{
	if (m->io_busy || forward_stopping)
		return;
	bool finish = m->state == MS_FINISH;
	if (!finish && m->records.len == 0)
		return;
	struct forward_io *j = calloc(1, sizeof(*j));
	if (!j) {
		log_err("%s forward event=out-of-memory", m->id);
		return;
	}
	memcpy(j->id, m->id, sizeof(j->id));
	j->finish = finish;
	if (finish) {
		j->all_delivered = true;
		for (size_t i = 0; i < m->env.nrcpt; i++)
			if (m->env.rcpt[i].done_code < 200 || m->env.rcpt[i].done_code >= 300)
				j->all_delivered = false;
		j->nrcpt = (int)m->env.nrcpt;
	}
	if (j->all_delivered) {
		buf_reset(&m->records); /* the removal says it all: one fsync less per message */
	} else if (m->records.len) {
		j->records = m->records.data; /* taken over */
		memset(&m->records, 0, sizeof(m->records));
	}
	snprintf(j->hostname, sizeof(j->hostname), "%s", forward_cfg->hostname);
	j->job.run = forward_io_run;
	j->job.done = forward_io_done;
	m->io_busy = true;
	workq_submit(&j->job);
}

/* every recipient is done: bounce and remove (after the pending records) */
static void forward_msg_finish(struct forward_msg *m)
{
	ev_timer_stop(forward_loop, &m->timer);
	m->state = MS_FINISH;
	forward_msg_io(m);
}

/* a message read from the queue: keep it and schedule it */
static void forward_msg_add_loaded(struct queue_envelope *env, bool now)
{
	struct forward_msg *m = forward_msg_new(env);
	if (!m) {
		queue_envelope_free(env);
		return;
	}
	forward_msg_schedule(m, now ? 0 : m->env.next_attempt);
}

static void forward_load_run(struct workq_job *job)
{
	struct forward_load *j = (struct forward_load *)job;
	j->rc = queue_load(forward_queue, j->id, &j->env);
}

static void forward_load_done(struct workq_job *job)
{
	struct forward_load *j = (struct forward_load *)job;
	if (j->rc == 0 && !forward_stopping)
		forward_msg_add_loaded(&j->env, true);
	else if (j->rc < 0 && !forward_stopping)
		log_err("%s forward event=load-failed", j->id);
	if (j->rc == 0)
		queue_envelope_free(&j->env);
	free(j);
}

static void forward_load(const char *id)
{
	if (forward_stopping || forward_msg_find(id))
		return;
	struct forward_load *j = calloc(1, sizeof(*j));
	if (!j)
		return;
	snprintf(j->id, sizeof(j->id), "%s", id);
	j->job.run = forward_load_run;
	j->job.done = forward_load_done;
	workq_submit(&j->job);
}

struct forward_reload {
	ev_timer timer;
	char id[QUEUE_ID_LEN + 1];
};

static void forward_reload_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct forward_reload *r = w->data;
	(void)revents;
	ev_timer_stop(loop, w);
	forward_load(r->id);
	free(r);
}

/* after a disk error: read the message again from the queue in retry_min seconds */
static void forward_reload_later(const char *id)
{
	struct forward_reload *r = calloc(1, sizeof(*r));
	if (!r)
		return;
	snprintf(r->id, sizeof(r->id), "%s", id);
	ev_timer_init(&r->timer, forward_reload_cb, (double)forward_cfg->retry_min, 0.);
	r->timer.data = r;
	ev_timer_start(forward_loop, &r->timer);
}

/* --- upstreams -------------------------------------------------------------------- */

static void forward_rate_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct forward_upstream *u = w->data;
	(void)loop; (void)revents;
	u->rate_waiting = false;
	forward_upstream_dispatch(u);
}

/* may one more message start now? If not, wake up when the window allows */
static bool forward_rate_allows(struct forward_upstream *u)
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
		ev_timer_start(forward_loop, &u->rate_timer);
		log_info("forward event=paced upstream=%s rate=%u/%us waiting=%u wait=%us", u->name, u->cfg->rate_count,
			 u->cfg->rate_window, u->nwait, wait);
	}
	return false;
}

static struct forward_msg *forward_upstream_pop(struct forward_upstream *u)
{
	struct forward_msg *m = u->wait_head;
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

static struct forward_session *forward_session_new(struct forward_upstream *u);
static void forward_session_take(struct forward_session *s, struct forward_msg *m);

/* hand waiting messages to idle sessions, and open sessions for the rest */
static void forward_upstream_dispatch(struct forward_upstream *u)
{
	if (forward_stopping)
		return;
	while (u->wait_head) {
		if (!forward_rate_allows(u))
			return; /* held in memory until the window has room (rate_timer) */
		struct forward_session *s;
		for (s = u->sessions; s; s = s->next)
			if (!s->dead && s->state == FS_READY)
				break;
		if (!s)
			break;
		struct forward_msg *m = forward_upstream_pop(u);
		if (u->cfg->rate_count)
			ratelimit_add(&u->rate, time(NULL), 1);
		forward_session_take(s, m);
	}
	while (u->nwait > u->nsetup && u->nsessions < u->cfg->max_connections)
		if (!forward_session_new(u))
			break;
}

/* messages waiting at an upstream that has no working session left try the next one */
static void forward_upstream_reroute(struct forward_upstream *u, const char *why)
{
	for (struct forward_session *s = u->sessions; s; s = s->next)
		if (!s->dead && s->established)
			return;
	struct forward_msg *list = NULL, **tail = &list, *m;
	while ((m = forward_upstream_pop(u))) {
		*tail = m;
		tail = &m->wnext;
	}
	while ((m = list)) {
		list = m->wnext;
		m->wnext = NULL;
		m->tried[u->index] = true;
		snprintf(m->last_error, sizeof(m->last_error), "%.200s: %.300s", u->name, why);
		forward_msg_route(m);
	}
}

static void forward_upstream_failed(struct forward_upstream *u)
{
	unsigned base = forward_cfg->retry_min < FORWARD_DOWN_BASE_MAX ? forward_cfg->retry_min : FORWARD_DOWN_BASE_MAX;
	unsigned down = base;
	u->fail_streak++;
	u->stat_failures++;
	for (unsigned i = 1; i < u->fail_streak && down < forward_cfg->retry_max; i++)
		down *= 2;
	if (down > forward_cfg->retry_max)
		down = forward_cfg->retry_max;
	u->down_until = ev_now(forward_loop) + down;
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

static void forward_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void forward_timer(struct forward_session *s, double t)
{
	ev_timer_stop(forward_loop, &s->timer);
	ev_timer_set(&s->timer, t, 0.);
	ev_timer_start(forward_loop, &s->timer);
}

static void forward_resolve_run(struct workq_job *job)
{
	struct forward_resolve *j = (struct forward_resolve *)job;
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG };
	j->rc = getaddrinfo(j->host, j->port, &hints, &j->res);
}

static void forward_connect_next(struct forward_session *s);

static void forward_resolve_done(struct workq_job *job)
{
	struct forward_resolve *j = (struct forward_resolve *)job;
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
	forward_enter_state(s, FS_CONNECT);
}

static const struct conn_ops forward_conn_ops;

static void forward_connect_cb(struct ev_loop *loop, ev_io *w, int revents)
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
		forward_connect_next(s);
		return;
	}
	int fd = s->fd;
	s->fd = -1;
	conn_init(&s->conn, forward_loop, fd, &forward_conn_ops, s);
	s->conn_live = true;
	s->up->stat_conns++;
	if (s->up->cfg->tls == UPSTREAM_TLS_IMPLICIT) {
		forward_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->up->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			forward_session_fail(s, "cannot start TLS");
		return;
	}
	forward_enter_state(s, FS_GREETING);
}

/* connect to the next address of the upstream (non-blocking) */
static void forward_connect_next(struct forward_session *s)
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
		ev_io_init(&s->cio, forward_connect_cb, fd, EV_WRITE);
		s->cio.data = s;
		ev_io_start(forward_loop, &s->cio);
		return;
	}
	forward_session_fail(s, s->last_connect_error[0] ? s->last_connect_error : "no address");
}

static int forward_sasl_simple(void *ctx, int id, const char **result, unsigned *len)
{
	struct forward_upstream *u = ctx;
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

static int forward_sasl_pass(sasl_conn_t *conn, void *ctx, int id, sasl_secret_t **secret)
{
	struct forward_upstream *u = ctx;
	(void)conn;
	if (id != SASL_CB_PASS || !u->secret)
		return SASL_BADPARAM;
	*secret = u->secret;
	return SASL_OK;
}

static struct forward_session *forward_session_new(struct forward_upstream *u)
{
	struct forward_session *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->id = ++forward_next_sid;
	queue_new_id(s->idstr);
	s->up = u;
	s->fd = -1;
	ev_init(&s->timer, forward_timeout_cb);
	s->timer.data = s;
	s->next = u->sessions;
	u->sessions = s;
	u->nsessions++;
	u->nsetup++;
	log_debug("%s forward event=connecting upstream=%s", s->idstr, u->name);
	struct forward_resolve *j = calloc(1, sizeof(*j));
	if (!j) {
		forward_session_fail(s, "out of memory");
		return NULL;
	}
	j->sid = s->id;
	snprintf(j->host, sizeof(j->host), "%s", u->cfg->host);
	snprintf(j->port, sizeof(j->port), "%s", u->cfg->port);
	j->job.run = forward_resolve_run;
	j->job.done = forward_resolve_done;
	forward_enter_state(s, FS_RESOLVE);
	workq_submit(&j->job);
	return s;
}

static void forward_reaper_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	while (forward_graveyard) {
		struct forward_session *s = forward_graveyard;
		forward_graveyard = s->next;
		free(s);
	}
}

static void forward_tx_clear(struct forward_session *s)
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
static void forward_session_free(struct forward_session *s)
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
	if (s->ai)
		freeaddrinfo(s->ai);
	buf_free(&s->rtext);
	forward_tx_clear(s);
	log_debug("%s forward event=closed upstream=%s", s->idstr, u->name);
	s->next = forward_graveyard;
	forward_graveyard = s;
	if (!ev_is_active(&forward_reaper)) {
		ev_timer_set(&forward_reaper, 0., 0.);
		ev_timer_start(forward_loop, &forward_reaper);
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
		 forward_strstate(s->state), reason);
	forward_upstream_failed(u);
	char text[600];
	snprintf(text, sizeof(text), "%s (%s)", reason, forward_strstate(s->state));
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

static void forward_send(struct forward_session *s, const struct buf *b)
{
	if (b->len)
		conn_write(&s->conn, b->data, b->len);
}

static void forward_sendline(struct forward_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void forward_sendline(struct forward_session *s, const char *fmt, ...)
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

static void forward_notify_param(unsigned notify, char *out, size_t outlen)
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

static void forward_add_rcpt(struct forward_session *s, struct buf *b, size_t j)
{
	const struct queue_rcpt *r = &s->msg->env.rcpt[s->rcpts[j]];
	char notify[64] = "";
	buf_printf(b, "RCPT TO:<%s>", r->addr);
	if (s->ext_dsn && r->notify) {
		forward_notify_param(r->notify, notify, sizeof(notify));
		buf_printf(b, "%s", notify);
	}
	if (s->ext_dsn && r->orcpt)
		buf_printf(b, " ORCPT=%s", r->orcpt);
	buf_printf(b, "\r\n");
}

static bool forward_has_8bit(const char *p)
{
	for (; *p; p++)
		if ((unsigned char)*p & 0x80)
			return true;
	return false;
}

/* does the message need SMTPUTF8 (RFC 6531): flagged, and non-ASCII in it somewhere? */
static bool forward_needs_utf8(const struct forward_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	if (!env->smtputf8)
		return false;
	if (forward_has_8bit(env->from) || s->body_8bit)
		return true;
	for (size_t i = 0; i < env->nrcpt; i++)
		if (forward_has_8bit(env->rcpt[i].addr))
			return true;
	return false;
}

static void forward_send_mail(struct forward_session *s)
{
	const struct queue_envelope *env = &s->msg->env;
	struct buf b = { 0 };
	buf_printf(&b, "MAIL FROM:<%s>", env->from);
	if (s->ext_size)
		buf_printf(&b, " SIZE=%zu", env->size);
	if (s->ext_8bitmime && (env->body != QUEUE_BODY_7BIT || s->body_8bit))
		buf_printf(&b, " BODY=8BITMIME");
	if (s->ext_smtputf8 && forward_needs_utf8(s))
		buf_printf(&b, " SMTPUTF8");
	if (s->ext_dsn && env->ret)
		buf_printf(&b, " RET=%s", env->ret);
	if (s->ext_dsn && env->envid)
		buf_printf(&b, " ENVID=%s", env->envid);
	buf_printf(&b, "\r\n");
	s->pipelined = s->ext_pipelining;
	if (s->pipelined) { /* RFC 2920 §3.1: MAIL, every RCPT and DATA in one go */
		for (size_t j = 0; j < s->nrcpts; j++)
			forward_add_rcpt(s, &b, j);
		s->rcpt_sent = s->nrcpts;
		buf_printf(&b, "DATA\r\n");
	}
	forward_send(s, &b);
	buf_free(&b);
}

/* write the next part of the body while the output buffer is low */
static void forward_body_push(struct forward_session *s)
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

static void forward_auth_start(struct forward_session *s)
{
	struct forward_upstream *u = s->up;
	const char *mechlist = s->ext_plain && s->ext_login ? "PLAIN LOGIN" : s->ext_plain ? "PLAIN" : "LOGIN";
	if (!s->ext_plain && !s->ext_login) {
		forward_session_fail(s, "upstream offers neither AUTH PLAIN nor AUTH LOGIN");
		return;
	}
	s->sasl_cb[0] = (sasl_callback_t){ SASL_CB_AUTHNAME, (int (*)(void))(void (*)(void))forward_sasl_simple, u };
	s->sasl_cb[1] = (sasl_callback_t){ SASL_CB_USER, (int (*)(void))(void (*)(void))forward_sasl_simple, u };
	s->sasl_cb[2] = (sasl_callback_t){ SASL_CB_PASS, (int (*)(void))(void (*)(void))forward_sasl_pass, u };
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
		forward_sendline(s, "AUTH %s", mech);
	} else if (outlen == 0) {
		forward_sendline(s, "AUTH %s =", mech);
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
		forward_send(s, &b);
		explicit_bzero(b64, elen);
		explicit_bzero(b.data, b.len);
		free(b64);
		buf_free(&b);
	}
	log_debug("%s forward event=auth-start upstream=%s mech=%s", s->idstr, u->name, mech);
}

/* a 334 challenge: one SASL step, the base64 answer on its own line */
static void forward_auth_step(struct forward_session *s, const char *challenge)
{
	size_t clen = strlen(challenge);
	unsigned inlen = 0, outlen = 0;
	const char *out = NULL;
	char *in = malloc(clen + 1);
	if (!in || (clen && sasl_decode64(challenge, (unsigned)clen, in, (unsigned)clen + 1, &inlen) != SASL_OK)) {
		free(in);
		forward_sendline(s, "*");
		forward_session_fail(s, "AUTH: cannot decode the server challenge");
		return;
	}
	int rc = sasl_client_step(s->sasl, in, inlen, NULL, &out, &outlen);
	free(in);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		forward_sendline(s, "*");
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
static void forward_enter_state(struct forward_session *s, enum forward_state st)
{
	log_debug("%s forward event=state from=%s to=%s", s->idstr, forward_strstate(s->state), forward_strstate(st));
	s->state = st;
	switch (st) {
	case FS_RESOLVE:
		forward_timer(s, FORWARD_TIMEOUT_CONNECT);
		break;
	case FS_CONNECT:
		forward_timer(s, FORWARD_TIMEOUT_CONNECT);
		forward_connect_next(s);
		break;
	case FS_HANDSHAKE:
		forward_timer(s, FORWARD_TIMEOUT_CONNECT);
		break;
	case FS_GREETING:
		forward_timer(s, forward_reply_timeout);
		break;
	case FS_EHLO:
		forward_timer(s, forward_reply_timeout);
		forward_sendline(s, "EHLO %s", forward_cfg->hostname);
		break;
	case FS_STARTTLS:
		forward_timer(s, forward_reply_timeout);
		forward_sendline(s, "STARTTLS");
		break;
	case FS_AUTH:
		forward_timer(s, forward_reply_timeout);
		forward_auth_start(s);
		break;
	case FS_READY:
		forward_timer(s, FORWARD_IDLE);
		break;
	case FS_PREPARE:
		forward_timer(s, forward_reply_timeout);
		break;
	case FS_MAIL:
		forward_timer(s, forward_reply_timeout);
		forward_send_mail(s);
		break;
	case FS_RCPT:
		forward_timer(s, forward_reply_timeout);
		if (!s->pipelined) {
			struct buf b = { 0 };
			forward_add_rcpt(s, &b, s->rcpt_sent++);
			forward_send(s, &b);
			buf_free(&b);
		}
		break;
	case FS_DATA:
		forward_timer(s, forward_reply_timeout);
		if (!s->pipelined)
			forward_sendline(s, "DATA");
		break;
	case FS_BODY:
		forward_timer(s, 2 * forward_reply_timeout); /* RFC 5321 §4.5.3.2.6: 10 minutes after the dot */
		if (s->body_abort)
			forward_sendline(s, ".");
		else
			forward_body_push(s);
		break;
	case FS_RSET:
		forward_timer(s, forward_reply_timeout);
		forward_sendline(s, "RSET");
		break;
	case FS_QUIT:
		forward_timer(s, FORWARD_QUIT_WAIT);
		forward_sendline(s, "QUIT");
		break;
	}
}

/* --- the session: a message ----------------------------------------------------------- */

static void forward_body_run(struct workq_job *job)
{
	struct forward_body *j = (struct forward_body *)job;
	struct queue_envelope env = { 0 };
	memcpy(env.id, j->id, sizeof(env.id));
	env.size = j->size;
	env.body_offset = j->offset;
	char *raw = NULL;
	if (queue_read_body(forward_queue, &env, &raw) < 0) {
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
static void forward_tx_refuse(struct forward_session *s, int code, const char *text)
{
	for (size_t j = 0; j < s->nrcpts; j++) {
		s->rcode[j] = code;
		s->rreply[j] = strdup(text);
	}
	forward_tx_done(s, text);
	forward_session_ready(s);
}

static void forward_body_done(struct workq_job *job)
{
	struct forward_body *j = (struct forward_body *)job;
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
	s->body = j->out.data;
	s->body_len = j->out.len;
	s->body_8bit = j->has8bit;
	free(j);
	/* what this upstream cannot take fails now, for good (never a retry loop) */
	char text[300];
	if (s->ext_size && s->ext_size_max && s->msg->env.size > s->ext_size_max) {
		snprintf(text, sizeof(text), "5.3.4 Message size %zu exceeds the upstream's limit of %llu",
			 s->msg->env.size, s->ext_size_max);
		forward_tx_refuse(s, 552, text);
	} else if (s->body_8bit && !s->ext_8bitmime) {
		forward_tx_refuse(s, 554, "5.6.3 8-bit content, and the upstream does not support 8BITMIME");
	} else if (forward_needs_utf8(s) && !s->ext_smtputf8) {
		forward_tx_refuse(s, 553, "5.6.7 Internationalized message, and the upstream does not support SMTPUTF8");
	} else {
		s->tx_started = ev_now(forward_loop);
		forward_enter_state(s, FS_MAIL);
	}
}

/* an idle session takes a message: its body is read on a worker first */
static void forward_session_take(struct forward_session *s, struct forward_msg *m)
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
	struct forward_body *j = calloc(1, sizeof(*j));
	if (!s->rcpts || !s->accepted || !s->rcode || !s->rreply || !j) {
		free(j);
		forward_tx_done(s, "out of memory");
		forward_session_ready(s);
		return;
	}
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (!m->env.rcpt[i].done_code)
			s->rcpts[s->nrcpts++] = i;
	forward_enter_state(s, FS_PREPARE);
	j->sid = s->id;
	memcpy(j->id, m->id, sizeof(j->id));
	j->size = m->env.size;
	j->offset = m->env.body_offset;
	j->job.run = forward_body_run;
	j->job.done = forward_body_done;
	workq_submit(&j->job);
}

/* the transaction ended (or could not happen): per-recipient results go to the message,
 * which then finishes, or tries the next upstream for what is still pending */
static void forward_tx_done(struct forward_session *s, const char *why)
{
	struct forward_msg *m = s->msg;
	struct forward_upstream *u = s->up;
	if (!m)
		return;
	double now = ev_now(forward_loop);
	double delay = (double)time(NULL) - (double)m->env.created;
	bool any_ok = false;
	const char *transient = NULL;
	for (size_t j = 0; j < s->nrcpts; j++) {
		size_t i = s->rcpts[j];
		int code = s->rcode[j];
		const char *reply = s->rreply[j] ? s->rreply[j] : why;
		char logreply[600], text[1024];
		forward_logsafe(reply, logreply, sizeof(logreply));
		if (code >= 200 && code < 300) {
			snprintf(text, sizeof(text), "[%s] %s", u->cfg->host, reply);
			log_info("%s forward event=delivered upstream=%s rcpt=<%s> reply=\"%d %s\" delay=%.2f", m->id,
				 u->name, m->env.rcpt[i].addr, code, logreply, delay);
			forward_msg_done_rcpt(m, i, code, text);
			forward_stat_rcpt_ok++;
			u->stat_rcpts++;
			any_ok = true;
		} else if (code >= 500) {
			snprintf(text, sizeof(text), "[%s] %s", u->cfg->host, reply);
			log_info("%s forward event=failed upstream=%s rcpt=<%s> reply=\"%d %s\" delay=%.2f", m->id, u->name,
				 m->env.rcpt[i].addr, code, logreply, delay);
			forward_msg_done_rcpt(m, i, code, text);
			forward_stat_rcpt_failed++;
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
	forward_tx_clear(s);
	if (forward_stopping)
		return;
	if (m->gone) {
		forward_msg_free(m);
		return;
	}
	m->state = MS_IDLE;
	if (forward_msg_all_done(m)) {
		forward_msg_finish(m);
		return;
	}
	forward_msg_io(m);
	if (transient)
		log_info("%s forward event=attempt-failed upstream=%s reason=\"%s\"", m->id, u->name, transient);
	m->tried[u->index] = true;
	forward_msg_route(m);
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
		forward_enter_state(s, FS_QUIT);
		return;
	}
	forward_enter_state(s, FS_READY);
	forward_upstream_dispatch(u);
}

/* --- the session: replies ----------------------------------------------------------------- */

static void forward_parse_ehlo(struct forward_session *s, const char *text)
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
static void forward_reply_line(const struct forward_session *s, char *out, size_t outlen)
{
	const char *t = s->rtext.data ? s->rtext.data : "";
	size_t n = strcspn(t, "\n");
	snprintf(out, outlen, "%.*s", (int)(n < outlen - 1 ? n : outlen - 1), t);
}

/* one complete reply: the state decides */
static void forward_response(struct forward_session *s, int code)
{
	char line[600], why[700];
	forward_reply_line(s, line, sizeof(line));
	snprintf(why, sizeof(why), "%d %s", code, line);
	int cls = code / 100;
	log_debug("%s forward event=reply state=%s reply=\"%d %.80s\"", s->idstr, forward_strstate(s->state), code,
		  s->state == FS_AUTH ? "..." : line);
	/* RFC 5321 §3.8: 421 means the server closes; the transaction, if any, is transient */
	if (code == 421 && s->state >= FS_READY && s->state != FS_QUIT) {
		s->must_close = true;
		if (s->msg) {
			for (size_t j = 0; j < s->nrcpts; j++)
				if (s->accepted[j])
					s->rcode[j] = 0;
			forward_tx_done(s, why);
		}
		forward_session_close(s);
		return;
	}
	switch (s->state) {
	case FS_RESOLVE:
	case FS_CONNECT:
	case FS_HANDSHAKE:
		break;
	case FS_GREETING:
		if (cls == 2)
			forward_enter_state(s, FS_EHLO);
		else
			forward_session_fail(s, why);
		break;
	case FS_EHLO:
		if (cls != 2) {
			forward_session_fail(s, why);
			break;
		}
		forward_parse_ehlo(s, s->rtext.data ? s->rtext.data : "");
		if (s->up->cfg->tls == UPSTREAM_TLS_STARTTLS && !s->tls) {
			if (s->ext_starttls)
				forward_enter_state(s, FS_STARTTLS);
			else
				forward_session_fail(s, "upstream does not offer STARTTLS (tls=starttls: never sent in clear)");
		} else if (s->up->user && !s->authed) {
			forward_enter_state(s, FS_AUTH);
		} else {
			forward_session_ready(s);
		}
		break;
	case FS_STARTTLS:
		if (code != 220) {
			forward_session_fail(s, why);
			break;
		}
		forward_enter_state(s, FS_HANDSHAKE);
		if (conn_start_tls_client(&s->conn, s->up->cred, s->up->cfg->host, s->up->cfg->verify) < 0)
			forward_session_fail(s, "cannot start TLS");
		break;
	case FS_AUTH:
		if (code == 334) {
			const char *sp = s->rtext.data ? s->rtext.data : "";
			forward_auth_step(s, sp);
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
			 forward_strstate(s->state), code);
		break;
	case FS_MAIL:
		if (cls == 2) {
			forward_enter_state(s, FS_RCPT);
			break;
		}
		for (size_t j = 0; j < s->nrcpts; j++) { /* 5xx: all fail; 4xx: all wait */
			s->rcode[j] = cls == 4 || cls == 5 ? code : 0;
			s->rreply[j] = strdup(line);
		}
		if (s->pipelined) { /* the RCPT and DATA replies still come */
			s->mail_refused = true;
			forward_enter_state(s, FS_RCPT);
		} else {
			forward_tx_done(s, why);
			forward_enter_state(s, FS_RSET);
		}
		break;
	case FS_RCPT: {
		size_t j = s->rcpt_reply++;
		if (j < s->nrcpts && !s->mail_refused) {
			if (cls == 2) {
				s->accepted[j] = true;
				s->naccepted++;
			} else {
				s->rcode[j] = cls == 4 || cls == 5 ? code : 0;
				free(s->rreply[j]);
				s->rreply[j] = strdup(line);
			}
		}
		if (s->rcpt_reply < s->nrcpts) {
			if (!s->pipelined)
				forward_enter_state(s, FS_RCPT);
			break;
		}
		if (s->pipelined || s->naccepted > 0) {
			forward_enter_state(s, FS_DATA);
		} else {
			forward_tx_done(s, why);
			forward_enter_state(s, FS_RSET);
		}
		break;
	}
	case FS_DATA:
		if (code == 354) {
			/* RFC 2920 §3.1: 354 after every RCPT failed: send the lone dot */
			s->body_abort = s->mail_refused || s->naccepted == 0;
			forward_enter_state(s, FS_BODY);
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
		forward_enter_state(s, FS_RSET);
		break;
	case FS_BODY:
		if (s->body_off < s->body_len && !s->body_abort)
			s->must_close = true; /* replied before the body was complete: out of sync */
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
		else
			forward_enter_state(s, FS_RSET);
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

/* split c->in into replies (RFC 5321 §4.2.1: "ddd-" continues, "ddd " or "ddd" ends) */
static void forward_on_read(struct conn *c, void *arg)
{
	struct forward_session *s = arg;
	while (!s->dead && s->state != FS_HANDSHAKE) {
		char *nl = c->in.len ? memchr(c->in.data, '\n', c->in.len) : NULL; /* data is NULL when empty */
		if (!nl) {
			if (c->in.len > FORWARD_REPLY_MAX)
				forward_session_fail(s, "reply line too long");
			return;
		}
		size_t len = (size_t)(nl - c->in.data);
		size_t tl = len && c->in.data[len - 1] == '\r' ? len - 1 : len;
		char *p = c->in.data;
		if (tl < 3 || p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9' ||
		    (tl > 3 && p[3] != ' ' && p[3] != '-')) {
			forward_session_fail(s, "malformed reply from the upstream");
			return;
		}
		int code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
		bool more = tl > 3 && p[3] == '-';
		if (s->rtext.len)
			buf_append(&s->rtext, "\n", 1);
		if (tl > 4)
			buf_append(&s->rtext, p + 4, tl - 4);
		buf_consume(&c->in, len + 1);
		if (s->rtext.len > FORWARD_REPLY_MAX) {
			forward_session_fail(s, "reply too long");
			return;
		}
		if (more)
			continue;
		forward_response(s, code);
		buf_reset(&s->rtext);
	}
}

static void forward_on_tls(struct conn *c, void *arg)
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
		forward_enter_state(s, FS_GREETING);
	else
		forward_enter_state(s, FS_EHLO); /* RFC 3207 §4.2: forget what EHLO said before */
}

static void forward_on_drain(struct conn *c, void *arg)
{
	struct forward_session *s = arg;
	(void)c;
	if (s->dead || s->state != FS_BODY || s->body_abort)
		return;
	if (s->body_off < s->body_len) {
		forward_timer(s, 2 * forward_reply_timeout);
		forward_body_push(s);
	}
}

static void forward_on_error(struct conn *c, void *arg, const char *why)
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

static const struct conn_ops forward_conn_ops = {
	.on_read = forward_on_read,
	.on_tls = forward_on_tls,
	.on_drain = forward_on_drain,
	.on_error = forward_on_error,
};

static void forward_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct forward_session *s = w->data;
	(void)loop; (void)revents;
	if (s->dead)
		return;
	if (s->state == FS_READY) {
		forward_enter_state(s, FS_QUIT);
		return;
	}
	if (s->state == FS_QUIT) {
		forward_session_free(s);
		return;
	}
	char why[64];
	snprintf(why, sizeof(why), "timeout in state %s", forward_strstate(s->state));
	forward_session_fail(s, why);
}

/* --- start, stop, control ---------------------------------------------------------------- */

/* "username:password" from a file only relayd can read */
static int forward_read_secret(struct forward_upstream *u, char *err, size_t errlen)
{
	const char *path = u->cfg->auth_file;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(err, errlen, "%s:%d: cannot read auth file %s: %s", forward_cfg->path, u->cfg->line, path,
			 strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (st.st_mode & (S_IRGRP | S_IROTH)) {
		log_warn("forward event=insecure-secret file=%s mode=%03o hint=\"chmod 600 %s\"", path,
			 (unsigned)(st.st_mode & 0777), path);
		snprintf(err, errlen, "%s:%d: auth file %s is readable by group or others: refused (chmod 600 it)",
			 forward_cfg->path, u->cfg->line, path);
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
		snprintf(err, errlen, "%s:%d: auth file %s must hold one line username:password", forward_cfg->path,
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

struct forward_recovery {
	int n, bad;
};

static void forward_recover_one(const char *id, void *arg)
{
	struct forward_recovery *r = arg;
	struct queue_envelope env;
	if (queue_load(forward_queue, id, &env) < 0) {
		r->bad++;
		return;
	}
	r->n++;
	forward_msg_add_loaded(&env, false);
}

/* forward_init - credentials, secrets, SASL, recovery */
int forward_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen)
{
	forward_loop = loop;
	forward_cfg = cfg;
	snprintf(forward_queue, sizeof(forward_queue), "%s", cfg->queue);
	forward_nup = cfg->nupstream;
	if (cfg->timeout_idle && cfg->timeout_idle < FORWARD_TIMEOUT_REPLY)
		forward_reply_timeout = cfg->timeout_idle < 10 ? 10. : (double)cfg->timeout_idle;
	ev_init(&forward_reaper, forward_reaper_cb);
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		memset(u, 0, sizeof(*u));
		u->index = i;
		u->conf = cfg->upstream[i];
		u->cfg = &u->conf;
		snprintf(u->name, sizeof(u->name), "%s:%s", u->cfg->host, u->cfg->port);
		ev_init(&u->rate_timer, forward_rate_cb);
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
			if (forward_read_secret(u, err, errlen) < 0)
				return -1;
			if (u->cfg->tls == UPSTREAM_TLS_NONE)
				log_warn("forward event=insecure-auth upstream=%s reason=\"AUTH over tls=none sends the "
					 "password in clear\"", u->name);
			forward_sasl = true;
		}
	}
	if (forward_sasl) {
		int rc = sasl_client_init(NULL);
		if (rc != SASL_OK) {
			snprintf(err, errlen, "sasl_client_init: %s", sasl_errstring(rc, NULL, NULL));
			return -1;
		}
	}
	forward_started = true;
	struct forward_recovery r = { 0 };
	queue_scan(forward_queue, forward_recover_one, &r);
	if (forward_nup == 0)
		log_warn("forward event=no-upstream messages=%d reason=\"no upstream line: mail stays queued\"", r.n);
	else
		log_info("forward event=started upstreams=%d messages=%d", forward_nup, r.n);
	return 0;
}

/* what a reload replaced: live sessions may still point at it, so it is freed at shutdown */
struct forward_retired {
	gnutls_certificate_credentials_t cred;
	char *user;
	sasl_secret_t *secret;
};
static struct forward_retired forward_retired[64];
static int forward_nretired;

static void forward_retire(struct forward_upstream *u)
{
	if (forward_nretired == (int)(sizeof(forward_retired) / sizeof(forward_retired[0])))
		return; /* XXX past 64 reloads the old credentials are simply kept */
	forward_retired[forward_nretired++] = (struct forward_retired){ u->cred, u->user, u->secret };
}

static void forward_retired_free(void)
{
	for (int i = 0; i < forward_nretired; i++) {
		struct forward_retired *r = &forward_retired[i];
		if (r->cred)
			gnutls_certificate_free_credentials(r->cred);
		if (r->secret) {
			explicit_bzero(r->secret->data, r->secret->len);
			free(r->secret);
		}
		free(r->user);
	}
	forward_nretired = 0;
}

/* load one upstream's trust anchors and secret into t (a scratch copy); -1 with err */
static int forward_load_upstream(struct forward_upstream *t, const struct upstream_cfg *uc, char *err, size_t errlen)
{
	memset(t, 0, sizeof(*t));
	t->conf = *uc;
	t->cfg = &t->conf;
	snprintf(t->name, sizeof(t->name), "%s:%s", uc->host, uc->port);
	if (uc->tls != UPSTREAM_TLS_NONE) {
		char terr[512];
		t->cred = tls_client_creds(uc->ca, terr, sizeof(terr));
		if (!t->cred) {
			snprintf(err, errlen, "%s:%d: upstream %s: %s", forward_cfg->path, uc->line, t->name, terr);
			return -1;
		}
	}
	if (uc->auth_file[0] && forward_read_secret(t, err, errlen) < 0) {
		if (t->cred)
			gnutls_certificate_free_credentials(t->cred);
		return -1;
	}
	return 0;
}

/* forward_reload - SIGHUP: an upstream keeping its place, host, port and tls mode takes its
 * new ca=, verify=, auth= file, rate= and connections= at once (sessions in progress finish
 * with the old ones); a changed list of upstreams is reported and needs a restart */
int forward_reload(const struct config *cfg, char *err, size_t errlen)
{
	struct forward_upstream fresh[CONFIG_MAX_UPSTREAM];
	if (cfg->nupstream != forward_nup) {
		log_warn("forward event=reload-partial reason=\"the list of upstreams changed: restart relayd to apply it\"");
		return 0;
	}
	for (int i = 0; i < forward_nup; i++) {
		const struct upstream_cfg *n = &cfg->upstream[i], *o = &forward_up[i].conf;
		if (strcmp(n->host, o->host) || strcmp(n->port, o->port) || n->tls != o->tls) {
			log_warn("forward event=reload-partial reason=\"the list of upstreams changed: restart relayd to apply it\"");
			return 0;
		}
	}
	for (int i = 0; i < forward_nup; i++) {
		if (forward_load_upstream(&fresh[i], &cfg->upstream[i], err, errlen) < 0) {
			for (int k = 0; k < i; k++)
				forward_retire(&fresh[k]); /* freed at shutdown like any replaced credential */
			return -1;
		}
	}
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		forward_retire(u);
		u->cred = fresh[i].cred;
		u->user = fresh[i].user;
		u->secret = fresh[i].secret;
		u->conf = fresh[i].conf;
		ratelimit_set(&u->rate, u->conf.rate_count, u->conf.rate_window);
		if (u->secret && !forward_sasl) {
			int rc = sasl_client_init(NULL);
			if (rc == SASL_OK)
				forward_sasl = true;
			else
				log_err("forward event=sasl-init-failed error=\"%s\"", sasl_errstring(rc, NULL, NULL));
		}
	}
	log_info("forward event=reloaded upstreams=%d", forward_nup);
	return 0;
}

/* forward_notify - a fresh message */
void forward_notify(const char *id)
{
	if (!forward_started || forward_stopping)
		return;
	forward_load(id);
}

/* forward_forget - a deleted message leaves memory too */
void forward_forget(const char *id)
{
	if (!forward_started || forward_stopping)
		return;
	struct forward_msg *m = forward_msg_find(id);
	if (!m)
		return;
	log_info("%s forward event=forgotten state=%s", id, m->state == MS_ACTIVE ? "sending" : "queued");
	forward_msg_forget(m);
}

/* forward_flush - retry everything deferred now */
void forward_flush(void)
{
	if (!forward_started || forward_stopping)
		return;
	for (int i = 0; i < forward_nup; i++)
		forward_up[i].down_until = 0;
	int n = 0;
	for (int b = 0; b < FORWARD_BUCKETS; b++)
		for (struct forward_msg *m = forward_table[b]; m; m = m->hnext)
			if (m->state == MS_WAIT) {
				forward_msg_schedule(m, 0);
				n++;
			}
	log_info("forward event=flush messages=%d", n);
}

/* forward_stats - counters as key=value lines */
void forward_stats(struct buf *out)
{
	unsigned long long queued = 0, deferred = 0, active = 0, waiting = 0;
	for (int b = 0; b < FORWARD_BUCKETS; b++)
		for (struct forward_msg *m = forward_table[b]; m; m = m->hnext) {
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
		   waiting, forward_stat_forwarded, forward_stat_bounced, forward_stat_dropped, forward_stat_rcpt_ok,
		   forward_stat_rcpt_failed, forward_stat_deferrals);
	ev_tstamp now = forward_loop ? ev_now(forward_loop) : 0;
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
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

static unsigned forward_live_sessions(void)
{
	unsigned n = 0;
	for (int i = 0; i < forward_nup; i++)
		n += forward_up[i].nsessions;
	return n;
}

static void forward_shutdown_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w; (void)revents;
	ev_break(loop, EVBREAK_ONE);
}

/* forward_shutdown - QUIT what is idle, drop what is busy, free everything */
void forward_shutdown(void)
{
	if (!forward_started || forward_stopping)
		return;
	forward_stopping = true;
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		ev_timer_stop(forward_loop, &u->rate_timer);
		struct forward_session *next;
		for (struct forward_session *s = u->sessions; s; s = next) {
			next = s->next;
			if (s->state == FS_READY || s->state == FS_PREPARE || s->state == FS_RSET) {
				forward_tx_clear(s); /* a message not yet sent stays as it is on disk */
				forward_enter_state(s, FS_QUIT);
			} else if (s->state != FS_QUIT) {
				forward_session_free(s); /* mid-transaction: no D record, sent again next time */
			}
		}
	}
	/* give the QUITs a moment on the loop (it has stopped running by now) */
	if (forward_live_sessions() > 0) {
		ev_timer t;
		ev_timer_init(&t, forward_shutdown_timeout, 2., 0.);
		ev_timer_start(forward_loop, &t);
		while (forward_live_sessions() > 0 && ev_is_active(&t))
			ev_run(forward_loop, EVRUN_ONCE);
		ev_timer_stop(forward_loop, &t);
	}
	for (int i = 0; i < forward_nup; i++)
		while (forward_up[i].sessions)
			forward_session_free(forward_up[i].sessions);
	ev_timer_stop(forward_loop, &forward_reaper);
	forward_reaper_cb(forward_loop, &forward_reaper, 0);
	for (int b = 0; b < FORWARD_BUCKETS; b++)
		while (forward_table[b])
			forward_msg_free(forward_table[b]);
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
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
	forward_retired_free();
	if (forward_sasl)
		sasl_client_done();
	log_info("forward event=stopped");
}
