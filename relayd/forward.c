/*
 * forward - the manager of the outbound SMTP client: every queued message on its way to the
 * upstream smarthosts. The connections themselves are forward_session.c.
 *
 * Every queued message is a struct forward_msg, found by id. A message is routed to the
 * first upstream (config order) it has not tried in this round and that is not marked
 * down; it then waits in that upstream's list until a session takes it and the upstream's
 * pacing window allows. When every upstream failed for it, it gets a T record and waits for
 * its backoff (retry_min doubling to retry_max); after queue_lifetime its pending recipients
 * fail. When every recipient is done, failed ones get a bounce (dsn.c, RFC 3464) and the
 * file is removed. At start every message in the queue is scheduled again (recovery).
 * Notices (RFC 3461 §5.2.2.2, RFC 3464): a recipient with NOTIFY=SUCCESS delivered to an
 * upstream that does not offer DSN gets an R record, and at the finish a "relayed" notice
 * goes to the sender; a message deferred for delay_warning sends one "delayed" notice (W
 * record) for recipients with NOTIFY=DELAY or no NOTIFY. Never for the null sender.
 *
 * Invariants:
 *  - nothing blocks the loop: every status append, bounce write and removal
 *    (fdatasync/fsync) runs as a workq job; jobs find their message again by id;
 *  - the disk work of one message is serialised (one job at a time, records batched);
 *    a job that fails (disk full) leaves the message in memory, going on with its state
 *    there, and runs again after a backoff with the records it could not write;
 *  - a recipient is finished (D record) only on a 2xx or 5xx reply to it, or when its
 *    message expires; anything else leaves it pending;
 *  - the upstream's password is never logged, and wiped when its credential set is freed
 *    (replaced by a reload and no session left using it, or at shutdown).
 */
#include "forward.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <sasl/sasl.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "dsn.h"
#include "forward_int.h"
#include "forward_session.h"
#include "log.h"
#include "utf8.h"
#include "queue.h"
#include "ratelimit.h"
#include "tls.h"
#include "workq.h"

#define FORWARD_BUCKETS         4096
#define FORWARD_DOWN_BASE_MAX   60u

/* a queued disk job for one message: append records, and/or finish it */
struct forward_io {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	char *records;
	bool finish;
	bool all_delivered;             /* finish by removal alone: no D records, no bounce */
	int nrcpt;
	char hostname[256];             /* for the bounce (copied: a reload may change it) */
	unsigned failures;              /* jobs of this message that failed in a row before it */
	/* results (records is freed once appended) */
	int rc;
	int err;
	const char *what;
	int delivered, failed;
	bool dropped, nobounce;
	char bounce_id[QUEUE_ID_LEN + 1];
	struct queue_envelope bounce;   /* loaded when a bounce was made */
	bool have_bounce;
	bool warn;                      /* send the "delayed" notice (not with finish) */
	char notice_id[QUEUE_ID_LEN + 1];
	struct queue_envelope notice;   /* loaded when a delayed or relayed notice was made */
	bool have_notice;
	const char *notice_action;
};

struct forward_load {
	struct workq_job job;
	char id[QUEUE_ID_LEN + 1];
	struct queue_envelope env;
	int rc;
};

struct ev_loop *forward_loop;
const struct config *forward_cfg;
struct forward_upstream forward_up[CONFIG_MAX_UPSTREAM];
int forward_nup;
bool forward_stopping;
char forward_queue[PATH_MAX];
static struct forward_msg *forward_table[FORWARD_BUCKETS];
static bool forward_started;
static bool forward_sasl;
/* a reload that changed the list of upstreams: the new list waits, loaded, until the old
 * sessions have ended (forward_switch_finish); meanwhile messages due are held (MS_IDLE) */
static bool forward_switching;
static struct forward_upstream forward_next[CONFIG_MAX_UPSTREAM];
static int forward_next_n;
static ev_timer forward_switch_timer;
/* stats */
static unsigned long long forward_stat_forwarded, forward_stat_bounced, forward_stat_dropped, forward_stat_rcpt_ok,
	forward_stat_rcpt_failed, forward_stat_deferrals;
static unsigned forward_creds_live; /* credential sets not yet freed (upstreams' and sessions') */

static void forward_msg_route(struct forward_msg *m);
static unsigned forward_live_sessions(void);
static void forward_msg_io(struct forward_msg *m);
static void forward_msg_io_again(struct forward_msg *m, unsigned failures);
static void forward_io_retry_cancel(struct forward_msg *m);
static void forward_msg_finish(struct forward_msg *m);
static void forward_msg_free(struct forward_msg *m);

/* forward_logsafe - text safe inside a log value in double quotes (and in a status record or
 * a bounce): a quote becomes ', a control byte a space, DEL, a C1 control or a byte that is
 * not well-formed UTF-8 a ? (an upstream's reply is free text) */
void forward_logsafe(const char *in, char *out, size_t outlen)
{
	size_t o = 0;
	for (const char *p = in ? in : ""; *p && o + 1 < outlen;) {
		unsigned cp;
		size_t n = (unsigned char)*p < 0x80 ? 1 : utf8_char(p, &cp);
		if (n > 1 && cp > 0x9f && o + n < outlen) {
			memcpy(out + o, p, n);
			o += n, p += n;
			continue;
		}
		unsigned char c = (unsigned char)*p;
		out[o++] = c == '"' ? '\'' : c < 0x20 ? ' ' : c >= 0x7f ? '?' : (char)c;
		p += n ? n : 1;
	}
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
	forward_io_retry_cancel(m);
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
	return at >= m->env.created + (time_t)forward_cfg->queue_lifetime; /* at least 1 s (config.c) */
}

static unsigned forward_backoff(unsigned attempts)
{
	unsigned d = forward_cfg->retry_min;
	for (unsigned i = 1; i < attempts && d < forward_cfg->retry_max; i++)
		d = d > forward_cfg->retry_max / 2 ? forward_cfg->retry_max : d * 2;
	return d < forward_cfg->retry_max ? d : forward_cfg->retry_max;
}

/* deferred for delay_warning, and someone wants to know (RFC 3461 NOTIFY=DELAY or none) */
static bool forward_msg_warning_due(const struct forward_msg *m, time_t now)
{
	if (!forward_cfg->delay_warning || m->env.delay_warned || !m->env.from[0] ||
	    now - m->env.created < (time_t)forward_cfg->delay_warning)
		return false;
	for (size_t i = 0; i < m->env.nrcpt; i++)
		if (dsn_rcpt_reported(&m->env.rcpt[i], DSN_ACTION_DELAYED))
			return true;
	return false;
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
	if (forward_msg_warning_due(m, now)) {
		m->env.delay_warned = true; /* once; the W record follows the notice on disk */
		m->warn_due = true;
	}
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

/* m waits at u (the end of its list) */
static void forward_msg_enqueue(struct forward_msg *m, struct forward_upstream *u)
{
	m->state = MS_QUEUED;
	m->waiting_at = u;
	m->wnext = NULL;
	if (u->wait_tail)
		u->wait_tail->wnext = m;
	else
		u->wait_head = m;
	u->wait_tail = m;
	u->nwait++;
}

/* the next upstream for this round: the first untried one that is up; when all untried
 * ones are down, the one back soonest, but only if nothing was tried yet this round */
static void forward_msg_route(struct forward_msg *m)
{
	if (forward_switching) {
		m->state = MS_IDLE; /* routed over the new list when the switch is done */
		return;
	}
	double now = clock_mono();
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
	forward_msg_enqueue(m, pick);
	forward_upstream_dispatch(pick);
}

/* --- messages: disk work on workers ---------------------------------------------- */

static void forward_reload_later(const char *id);

/* the queue id of env's notice of this action: derived from env's own id, so that the finish
 * run again after a crash finds the notice it wrote before instead of writing a second one */
static void forward_notice_id(const char *id, enum dsn_action action, char out[QUEUE_ID_LEN + 1])
{
	uint64_t v = strtoull(id, NULL, 16) ^ (UINT64_C(0x8000000000000000) | (uint64_t)(action + 1));
	snprintf(out, QUEUE_ID_LEN + 1, "%016" PRIx64, v);
}

/* is the message already at id the notice about env (null sender, to env's sender, ours)?
 * One gone by the time it is read counts as ours: sent and removed meanwhile */
static bool forward_notice_is_ours(const char *id, const struct queue_envelope *env)
{
	struct queue_envelope e;
	char path[PATH_MAX];
	if (queue_load(forward_queue, id, &e) < 0)
		return queue_path(forward_queue, id, path, sizeof(path)) == 0 && access(path, F_OK) < 0 &&
		       errno == ENOENT;
	bool ours = !e.from[0] && e.nrcpt == 1 && !strcmp(e.rcpt[0].addr, env->from) && e.user &&
		    !strcmp(e.user, "MAILER-DAEMON");
	queue_envelope_free(&e);
	return ours;
}

/* a notice of this action about env to its sender, written as a new queue message from the
 * null sender (body read into *body on first use); its id into id. A notice written before a
 * crash is found and kept (same derived id). Returns how many recipients it reports (0: none,
 * nothing written), or -1 with j->rc, err and what set. */
static int forward_io_notice(struct forward_io *j, const struct queue_envelope *env, enum dsn_action action,
			     char **body, char id[QUEUE_ID_LEN + 1])
{
	int n = 0;
	for (size_t i = 0; i < env->nrcpt; i++)
		n += dsn_rcpt_reported(&env->rcpt[i], action);
	if (n == 0)
		return 0;
	struct buf dsn = { 0 };
	if ((!*body && queue_read_body(forward_queue, env, body) < 0) ||
	    dsn_build(env, action, *body, env->size, j->hostname, time(NULL), &dsn) < 0) {
		buf_free(&dsn);
		j->rc = -1;
		j->err = EIO;
		j->what = action == DSN_ACTION_FAILED ? "bounce-build" : "notice-build";
		return -1;
	}
	struct queue_envelope b = { 0 };
	struct queue_rcpt r = { 0 };
	bool eight = false;
	for (size_t i = 0; i < dsn.len && !eight; i++)
		eight = (unsigned char)dsn.data[i] & 0x80;
	r.addr = env->from;
	r.notify = DSN_NOTIFY_NEVER;
	b.user = (char *)"MAILER-DAEMON";
	b.from = (char *)"";
	b.body = eight ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT;
	for (const char *p = env->from; *p; p++)
		if ((unsigned char)*p & 0x80)
			b.smtputf8 = true;
	b.rcpt = &r;
	b.nrcpt = 1;
	b.size = dsn.len;
	forward_notice_id(env->id, action, b.id);
	int rc = queue_write_sync(forward_queue, &b, dsn.data, dsn.len);
	if (rc < 0 && errno == EEXIST) {
		if (forward_notice_is_ours(b.id, env)) {
			log_info("%s forward event=notice-found notice=%s reason=\"written before a restart\"", env->id, b.id);
			rc = 0;
		} else { /* a message of its own has that id: a fresh one */
			b.id[0] = '\0';
			rc = queue_write_sync(forward_queue, &b, dsn.data, dsn.len);
		}
	}
	buf_free(&dsn);
	if (rc < 0) {
		j->rc = -1, j->err = errno;
		j->what = action == DSN_ACTION_FAILED ? "bounce-write" : "notice-write";
		return -1;
	}
	memcpy(id, b.id, QUEUE_ID_LEN + 1);
	return n;
}

/* the finish sequence: bounce for failed recipients (unless null sender), B record, relayed
 * notice, remove */
static void forward_io_finish(struct forward_io *j)
{
	const char *dir = forward_queue;
	struct queue_envelope env;
	if (j->all_delivered) {
		j->delivered = j->nrcpt;
		queue_remove_async(j->id);
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
	char *body = NULL;
	if (j->failed && !env.from[0]) {
		j->dropped = true; /* never bounce a bounce (RFC 5321 §6.1) */
	} else if (j->failed && !env.bounce_id[0]) {
		int n = forward_io_notice(j, &env, DSN_ACTION_FAILED, &body, j->bounce_id);
		if (n == 0) {
			j->nobounce = true; /* NOTIFY=NEVER or without FAILURE */
		} else if (n > 0) {
			char rec[8 + QUEUE_ID_LEN];
			snprintf(rec, sizeof(rec), "B %s", j->bounce_id);
			if (queue_append_status(dir, j->id, rec) < 0)
				j->rc = -1, j->err = errno, j->what = "append-B";
			else if (queue_load(dir, j->bounce_id, &j->bounce) == 0)
				j->have_bounce = true;
		}
	} else if (j->failed) {
		memcpy(j->bounce_id, env.bounce_id, sizeof(j->bounce_id)); /* committed before a crash */
	}
	/* RFC 3461 §5.2.2.2: NOTIFY=SUCCESS that could not travel on. After a crash between this
	 * and the removal, the notice is found again by its derived id, not written twice (while
	 * it is still queued; one already sent and removed before the crash goes out again) */
	if (j->rc == 0 && env.from[0] && forward_io_notice(j, &env, DSN_ACTION_RELAYED, &body, j->notice_id) > 0 &&
	    queue_load(dir, j->notice_id, &j->notice) == 0) {
		j->have_notice = true;
		j->notice_action = "relayed";
	}
	free(body);
	queue_envelope_free(&env);
	if (j->rc == 0 && queue_remove(dir, j->id, false) < 0)
		j->rc = -1, j->err = errno, j->what = "remove";
}

/* the one "delayed" notice (delay_warning), from the file as it is now (its T record in),
 * then its W record */
static void forward_io_warn(struct forward_io *j)
{
	struct queue_envelope env;
	char *body = NULL;
	if (queue_load(forward_queue, j->id, &env) < 0) {
		j->rc = -1;
		j->err = errno ? errno : EIO;
		j->what = "load";
		return;
	}
	if (!env.delay_warned && env.from[0] && forward_io_notice(j, &env, DSN_ACTION_DELAYED, &body, j->notice_id) > 0) {
		char rec[8 + QUEUE_ID_LEN];
		snprintf(rec, sizeof(rec), "W %s", j->notice_id);
		if (queue_append_status(forward_queue, j->id, rec) < 0) {
			j->rc = -1, j->err = errno, j->what = "append-W";
		} else if (queue_load(forward_queue, j->notice_id, &j->notice) == 0) {
			j->have_notice = true;
			j->notice_action = "delayed";
		}
	}
	free(body);
	queue_envelope_free(&env);
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
	free(j->records);
	j->records = NULL;
	if (j->finish)
		forward_io_finish(j);
	else if (j->warn)
		forward_io_warn(j);
}

static void forward_msg_add_loaded(struct queue_envelope *env, bool now);

/* the ids of the last FORWARD_REMOVED notices (null sender) this process finished and
 * removed, a ring. A finish that finds a notice written before a restart loads it, and the
 * queue scan at start loaded it too: if the scan's copy was sent and removed meanwhile (the
 * commit thread unlinks a little later, so the file could still be read), or the finish wrote
 * it again because the sent copy was gone already, the finish's copy is not taken in */
#define FORWARD_REMOVED 1024
static char forward_removed[FORWARD_REMOVED][QUEUE_ID_LEN + 1];
static unsigned forward_removed_n;

static void forward_removed_note(const char *id)
{
	memcpy(forward_removed[forward_removed_n++ % FORWARD_REMOVED], id, QUEUE_ID_LEN + 1);
}

static bool forward_removed_recently(const char *id)
{
	unsigned n = forward_removed_n < FORWARD_REMOVED ? forward_removed_n : FORWARD_REMOVED;
	for (unsigned i = 0; i < n; i++)
		if (!strcmp(forward_removed[i], id))
			return true;
	return false;
}

/* a notice (bounce, relayed, delayed) a disk job loaded: queued for sending unless a copy of
 * it was sent and removed already (then this file, the same or one written again, goes too) */
static void forward_notice_add(struct queue_envelope *env)
{
	if (forward_removed_recently(env->id)) {
		log_info("%s forward event=notice-stale reason=\"sent and removed already\"", env->id);
		queue_remove_async(env->id);
		queue_envelope_free(env);
		return;
	}
	forward_msg_add_loaded(env, true);
}

/* a disk job that failed, to run again: for m (valid: forward_msg_free cancels it) */
struct forward_io_retry {
	ev_timer timer;
	struct forward_msg *m;
	unsigned failures;
	struct forward_io_retry *next;
};
static struct forward_io_retry *forward_io_retries;

static void forward_io_retry_unlink(struct forward_io_retry *r)
{
	for (struct forward_io_retry **p = &forward_io_retries; *p; p = &(*p)->next)
		if (*p == r) {
			*p = r->next;
			break;
		}
	ev_timer_stop(forward_loop, &r->timer);
}

static void forward_io_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct forward_io_retry *r = w->data;
	struct forward_msg *m = r->m;
	unsigned failures = r->failures;
	(void)loop; (void)revents;
	forward_io_retry_unlink(r);
	free(r);
	m->io_busy = false;
	forward_msg_io_again(m, failures);
}

/* the retry of m's disk job is moot: m goes */
static void forward_io_retry_cancel(struct forward_msg *m)
{
	struct forward_io_retry *r = forward_io_retries, *next;
	for (; r; r = next) {
		next = r->next;
		if (r->m == m) {
			forward_io_retry_unlink(r);
			free(r);
		}
	}
}

/* a disk job failed (a full disk, an I/O error): the state in memory is right, only its copy
 * on disk is behind, so m is kept and goes on with it (delivered recipients are not sent
 * again). The records not written go back in front of newer ones, and the job runs again
 * after a backoff, m's disk work held (io_busy) until then */
static void forward_io_retry(struct forward_msg *m, struct forward_io *j)
{
	unsigned delay = forward_backoff(j->failures + 1);
	log_err("%s forward event=queue-error op=%s error=\"%s\" retry=%us", j->id, j->what, strerror(j->err), delay);
	if (j->records) {
		struct buf b = { 0 };
		if (buf_printf(&b, "%s%s", j->records, m->records.len ? "\n" : "") < 0 ||
		    buf_append(&b, m->records.data, m->records.len) < 0) {
			log_err("%s forward event=out-of-memory", m->id);
			buf_free(&b);
		} else {
			buf_free(&m->records);
			m->records = b;
		}
	}
	if (j->warn)
		m->warn_due = true;
	struct forward_io_retry *r = calloc(1, sizeof(*r));
	if (!r) {
		log_err("%s forward event=out-of-memory", m->id);
		m->io_busy = false; /* the next event of m starts its disk work again */
		return;
	}
	r->m = m;
	r->failures = j->failures + 1;
	ev_timer_init(&r->timer, forward_io_retry_cb, (double)delay, 0.);
	r->timer.data = r;
	ev_timer_start(forward_loop, &r->timer);
	r->next = forward_io_retries;
	forward_io_retries = r;
}

static void forward_io_done(struct workq_job *job)
{
	struct forward_io *j = (struct forward_io *)job;
	struct forward_msg *m = forward_stopping ? NULL : forward_msg_find(j->id);
	if (forward_stopping)
		goto out;
	if (j->have_notice) { /* on disk: it goes out whatever happened next */
		log_info("%s forward event=notice action=%s notice=%s", j->id, j->notice_action, j->notice_id);
		forward_notice_add(&j->notice);
	}
	if (j->rc < 0 && j->err == ENOENT) { /* deleted from the queue meanwhile (relayctl queue delete) */
		log_info("%s forward event=vanished op=%s", j->id, j->what);
		if (m)
			forward_msg_forget(m);
		goto out;
	}
	if (j->rc < 0 && m) {
		forward_io_retry(m, j);
		goto out;
	}
	if (j->rc < 0) { /* not in memory: the durable state is read again later */
		log_err("%s forward event=queue-error op=%s error=\"%s\"", j->id, j->what, strerror(j->err));
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
		if (m) {
			if (!m->env.from[0]) /* a notice: remembered, not taken in again */
				forward_removed_note(j->id);
			forward_msg_free(m);
		}
		if (j->have_bounce)
			forward_notice_add(&j->bounce);
		goto out;
	}
	if (m) {
		m->io_busy = false;
		forward_msg_io(m); /* more records, or the finish, may have come meanwhile */
	}
out:
	if (j->have_bounce)
		queue_envelope_free(&j->bounce);
	if (j->have_notice)
		queue_envelope_free(&j->notice);
	free(j->records);
	free(j);
}

/* start the next disk job of a message if none runs */
static void forward_msg_io(struct forward_msg *m)
{
	forward_msg_io_again(m, 0);
}

/* the same, after `failures` jobs of m failed in a row (for the backoff of the next retry) */
static void forward_msg_io_again(struct forward_msg *m, unsigned failures)
{
	if (m->io_busy || forward_stopping)
		return;
	bool finish = m->state == MS_FINISH;
	if (!finish && m->records.len == 0 && !m->warn_due)
		return;
	struct forward_io *j = calloc(1, sizeof(*j));
	if (!j) {
		log_err("%s forward event=out-of-memory", m->id);
		return;
	}
	memcpy(j->id, m->id, sizeof(j->id));
	j->failures = failures;
	j->finish = finish;
	j->warn = m->warn_due && !finish;
	m->warn_due = false;
	if (finish) {
		j->all_delivered = true;
		for (size_t i = 0; i < m->env.nrcpt; i++)
			if (m->env.rcpt[i].done_code < 200 || m->env.rcpt[i].done_code >= 300 || m->env.rcpt[i].relay_notice)
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
	workq_run(&j->job, j->all_delivered); /* all delivered: nothing to write, the commit thread unlinks */
}

/* every recipient is done: bounce and remove (after the pending records) */
static void forward_msg_finish(struct forward_msg *m)
{
	ev_timer_stop(forward_loop, &m->timer);
	m->state = MS_FINISH;
	forward_msg_io(m);
}

/* times a clock that was ahead left in a message read from the queue: a next attempt
 * further away than retry_max, or a creation in the future (or not a time at all), count
 * from now (so the backoff, queue_lifetime and delay_warning hold; the file keeps them) */
static void forward_msg_clock_check(struct queue_envelope *env)
{
	time_t now = time(NULL), latest = now + (time_t)forward_cfg->retry_max;
	if (env->created > now || env->created <= 0) { /* ahead, or damaged */
		log_warn("%s forward event=clock-skew field=created seconds=%lld action=now", env->id,
			 (long long)(env->created - now));
		env->created = now;
	}
	if (env->next_attempt > latest) {
		log_warn("%s forward event=clock-skew field=next-attempt seconds=%lld action=retry_max", env->id,
			 (long long)(env->next_attempt - now));
		env->next_attempt = latest;
	}
}

/* a message read from the queue: keep it and schedule it */
static void forward_msg_add_loaded(struct queue_envelope *env, bool now)
{
	forward_msg_clock_check(env);
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

/* inline: on the loop (a small message just committed), else on a worker */
static void forward_load(const char *id, bool inline_ok)
{
	if (forward_stopping || forward_msg_find(id))
		return;
	struct forward_load *j = calloc(1, sizeof(*j));
	if (!j)
		return;
	snprintf(j->id, sizeof(j->id), "%s", id);
	j->job.run = forward_load_run;
	j->job.done = forward_load_done;
	workq_run(&j->job, inline_ok);
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
	forward_load(r->id, false);
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

/* may one more message start now? If not, wake up when the window allows. The window counts
 * in clock_mono_sec() (it lives in memory only): a step of the wall clock neither holds mail
 * for as long as it went back nor empties the window when it goes forward */
static bool forward_rate_allows(struct forward_upstream *u)
{
	if (!u->cfg->rate_count)
		return true;
	time_t now = clock_mono_sec();
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


/* forward_upstream_dispatch - hand waiting messages to idle sessions, and open sessions for the rest */
void forward_upstream_dispatch(struct forward_upstream *u)
{
	if (forward_stopping)
		return;
	if (forward_switching) { /* the list is being replaced: what has no message ends */
		struct forward_session *next;
		for (struct forward_session *s = u->sessions; s; s = next) {
			next = s->next;
			if (!s->dead && !s->msg && s->state != FS_QUIT)
				forward_session_shutdown(s); /* idle: QUIT; still connecting: dropped */
		}
		return;
	}
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
			ratelimit_add(&u->rate, clock_mono_sec(), 1);
		forward_session_take(s, m);
	}
	while (u->nwait > u->nsetup && u->nsessions < u->cfg->max_connections)
		if (!forward_session_new(u))
			break;
}

/* forward_upstream_reroute - messages waiting at an upstream that has no working session left try the next one */
void forward_upstream_reroute(struct forward_upstream *u, const char *why)
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

/* forward_upstream_failed - mark u down for a while, longer after each failure in a row */
void forward_upstream_failed(struct forward_upstream *u)
{
	unsigned base = forward_cfg->retry_min < FORWARD_DOWN_BASE_MAX ? forward_cfg->retry_min : FORWARD_DOWN_BASE_MAX;
	unsigned down = base;
	u->fail_streak++;
	u->stat_failures++;
	for (unsigned i = 1; i < u->fail_streak && down < forward_cfg->retry_max; i++)
		down *= 2;
	if (down > forward_cfg->retry_max)
		down = forward_cfg->retry_max;
	u->down_until = clock_mono() + down;
}

/* --- transactions: results from the sessions ---------------------------------------------- */

/* forward_tx_done - the transaction ended (or could not happen): per-recipient results go to the message,
 * which then finishes, or tries the next upstream for what is still pending */
void forward_tx_done(struct forward_session *s, const char *why)
{
	struct forward_msg *m = s->msg;
	struct forward_upstream *u = s->up;
	if (!m)
		return;
	double now = clock_mono();
	double delay = (double)time(NULL) - (double)m->env.created;
	bool any_ok = false;
	const char *transient = NULL;
	size_t ntransient = 0, ntoo_many = 0;
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
			/* RFC 3461 §5.2.2.2: NOTIFY=SUCCESS cannot travel on: "relayed" to the sender */
			unsigned notify = m->env.rcpt[i].notify;
			if (!s->ext.dsn && (notify & DSN_NOTIFY_SUCCESS) && !(notify & DSN_NOTIFY_NEVER) && m->env.from[0]) {
				m->env.rcpt[i].relay_notice = true;
				buf_printf(&m->records, "\nR %zu", i);
			}
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
			ntransient++;
			ntoo_many += code == 452;
			if (code)
				snprintf(m->last_error, sizeof(m->last_error), "%.200s said: %d %.290s", u->name, code, logreply);
			else
				snprintf(m->last_error, sizeof(m->last_error), "%.200s: %.300s", u->name, logreply);
			transient = m->last_error;
		}
	}
	/* a 421 after this connection delivered others: the upstream's cap of messages per
	 * connection (Gmail, Microsoft 365 ...), not a failure of this message */
	bool conn_cap = s->closed_by_421 && s->ndelivered > 0 && !any_ok;
	if (any_ok) {
		s->ndelivered++;
		u->stat_msgs++;
		u->stat_lat_last = now - s->tx_started;
		u->stat_lat_sum += u->stat_lat_last;
		u->stat_lat_n++;
	}
	forward_session_tx_clear(s);
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
	if (any_ok && ntoo_many && ntoo_many == ntransient && !forward_switching) {
		/* RFC 5321 §4.5.3.1.10: the rest in "chunks", a new transaction at once (not an attempt
		 * that failed). Bounded: each one delivered at least one recipient. Whatever ends this
		 * transaction (ready, close, fail) dispatches u next: the same connection when it can */
		log_info("%s forward event=next-chunk upstream=%s pending=%zu", m->id, u->name, ntoo_many);
		forward_msg_enqueue(m, u);
		return;
	}
	if (conn_cap && ntransient && !forward_switching) {
		/* at once on a new connection; bounded: that one must deliver a message before its 421
		 * counts as a cap again */
		log_info("%s forward event=connection-cap upstream=%s delivered_before=%u", m->id, u->name, s->ndelivered);
		forward_msg_enqueue(m, u);
		return;
	}
	if (transient)
		log_info("%s forward event=attempt-failed upstream=%s reason=\"%s\"", m->id, u->name, transient);
	m->tried[u->index] = true;
	forward_msg_route(m);
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
	if (st.st_mode & (S_IRWXG | S_IRWXO)) { /* writable would let them swap the credentials */
		log_warn("forward event=insecure-secret file=%s mode=%03o hint=\"chmod 600 %s\"", path,
			 (unsigned)(st.st_mode & 0777), path);
		snprintf(err, errlen, "%s:%d: auth file %s is %s by group or others: refused (chmod 600 it)",
			 forward_cfg->path, u->cfg->line, path, st.st_mode & (S_IRGRP | S_IROTH) ? "readable" :
			 st.st_mode & (S_IWGRP | S_IWOTH) ? "writable" : "executable");
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
	struct forward_creds *c = u->creds;
	c->user = strdup(line);
	c->secret = malloc(sizeof(sasl_secret_t) + plen + 1);
	if (!c->user || !c->secret) {
		explicit_bzero(line, sizeof(line));
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	c->secret->len = plen;
	memcpy(c->secret->data, colon + 1, plen + 1);
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

struct forward_creds *forward_creds_get(struct forward_creds *c)
{
	if (c && c->refs++ == 0)
		forward_creds_live++;
	return c;
}

void forward_creds_put(struct forward_creds *c)
{
	if (!c || --c->refs > 0)
		return;
	if (c->cred)
		gnutls_certificate_free_credentials(c->cred);
	if (c->secret) {
		explicit_bzero(c->secret->data, c->secret->len);
		free(c->secret);
	}
	free(c->user);
	free(c);
	forward_creds_live--;
}

/* the upstream lets go of its credentials (sessions begun with them keep them until they end) */
static void forward_retire(struct forward_upstream *u)
{
	forward_creds_put(u->creds);
	u->creds = NULL;
}

/* load one upstream's trust anchors and secret into t; -1 with err */
static int forward_load_upstream(struct forward_upstream *t, const struct upstream_cfg *uc, char *err, size_t errlen)
{
	memset(t, 0, sizeof(*t));
	t->conf = *uc;
	t->cfg = &t->conf;
	config_hostport_str(uc->host, uc->port, t->name, sizeof(t->name));
	t->creds = forward_creds_get(calloc(1, sizeof(*t->creds)));
	if (!t->creds) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (uc->tls != UPSTREAM_TLS_NONE) {
		char terr[512];
		t->creds->cred = tls_client_creds(uc->ca, terr, sizeof(terr));
		if (!t->creds->cred) {
			snprintf(err, errlen, "%s:%d: upstream %s: %s", forward_cfg->path, uc->line, t->name, terr);
			forward_retire(t);
			return -1;
		}
	}
	if (uc->auth_file[0] && forward_read_secret(t, err, errlen) < 0) {
		forward_retire(t);
		return -1;
	}
	if (uc->auth_file[0] && uc->tls == UPSTREAM_TLS_NONE)
		log_warn("forward event=insecure-auth upstream=%s reason=\"AUTH over tls=none sends the password in clear\"",
			 t->name);
	return 0;
}

/* load every upstream of cfg into list; on failure none is kept */
static int forward_load_list(struct forward_upstream *list, const struct config *cfg, char *err, size_t errlen)
{
	for (int i = 0; i < cfg->nupstream; i++) {
		if (forward_load_upstream(&list[i], &cfg->upstream[i], err, errlen) < 0) {
			for (int k = 0; k < i; k++)
				forward_retire(&list[k]);
			return -1;
		}
	}
	return 0;
}

/* the SASL client library, once, when an upstream has a secret */
static void forward_sasl_need(const struct forward_upstream *u)
{
	if (!u->creds->secret || forward_sasl)
		return;
	int rc = sasl_client_init(NULL);
	if (rc == SASL_OK)
		forward_sasl = true;
	else
		log_err("forward event=sasl-init-failed error=\"%s\"", sasl_errstring(rc, NULL, NULL));
}

/* a loaded upstream takes its place i in forward_up: index, pacing, SASL */
static void forward_upstream_start(int i, const struct forward_upstream *loaded)
{
	struct forward_upstream *u = &forward_up[i];
	*u = *loaded;
	u->cfg = &u->conf;
	u->index = i;
	ev_init(&u->rate_timer, forward_rate_cb);
	u->rate_timer.data = u;
	if (u->cfg->rate_count)
		ratelimit_set(&u->rate, u->cfg->rate_count, u->cfg->rate_window);
	forward_sasl_need(u);
}

/* forward_init - credentials, secrets, SASL, recovery */
int forward_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen)
{
	forward_loop = loop;
	forward_cfg = cfg;
	snprintf(forward_queue, sizeof(forward_queue), "%s", cfg->queue);
	forward_session_init(cfg);
	if (forward_load_list(forward_next, cfg, err, errlen) < 0)
		return -1;
	forward_nup = cfg->nupstream;
	for (int i = 0; i < forward_nup; i++)
		forward_upstream_start(i, &forward_next[i]);
	forward_started = true;
	struct forward_recovery r = { 0 };
	queue_scan(forward_queue, forward_recover_one, &r);
	if (forward_nup == 0)
		log_warn("forward event=no-upstream messages=%d reason=\"no upstream line: mail stays queued\"", r.n);
	else
		log_info("forward event=started upstreams=%d messages=%d", forward_nup, r.n);
	return 0;
}

/* the old sessions are gone: the new list takes over, and every held message (and every one
 * that waited for an upstream to exist) starts a round over it */
static void forward_switch_finish(void)
{
	ev_timer_stop(forward_loop, &forward_switch_timer);
	for (int i = 0; i < forward_nup; i++) {
		ev_timer_stop(forward_loop, &forward_up[i].rate_timer);
		forward_retire(&forward_up[i]);
	}
	forward_nup = forward_next_n;
	for (int i = 0; i < forward_nup; i++)
		forward_upstream_start(i, &forward_next[i]);
	forward_switching = false;
	struct forward_msg *held = NULL;
	int n = 0;
	for (int b = 0; b < FORWARD_BUCKETS; b++)
		for (struct forward_msg *m = forward_table[b]; m; m = m->hnext)
			if (m->state == MS_IDLE && forward_nup > 0) {
				m->wnext = held; /* in no waiting list while MS_IDLE */
				held = m;
				n++;
			}
	log_info("forward event=reloaded upstreams=%d list=changed messages=%d", forward_nup, n);
	while (held) {
		struct forward_msg *m = held;
		held = m->wnext;
		m->wnext = NULL;
		forward_msg_due(m);
	}
}

static void forward_switch_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	if (forward_live_sessions() == 0)
		forward_switch_finish();
}

/* a new list of upstreams: idle sessions quit, busy ones finish their transaction first */
static void forward_switch_start(const struct forward_upstream *fresh, int n)
{
	if (forward_switching) /* a second reload before the first switch was done: the newest wins */
		for (int i = 0; i < forward_next_n; i++)
			forward_retire(&forward_next[i]);
	memcpy(forward_next, fresh, (size_t)n * sizeof(*fresh));
	forward_next_n = n;
	forward_switching = true;
	log_info("forward event=switching upstreams=%d reason=\"the list of upstreams changed\"", n);
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		struct forward_msg *m;
		while ((m = forward_upstream_pop(u)))
			m->state = MS_IDLE; /* held until the switch is done */
		forward_upstream_dispatch(u); /* sessions without a message end */
	}
	ev_timer_init(&forward_switch_timer, forward_switch_cb, 0., 0.1);
	ev_timer_again(forward_loop, &forward_switch_timer);
}

/* same upstreams in the same order (host, port, tls mode)? */
static bool forward_same_list(const struct config *cfg)
{
	if (forward_switching || cfg->nupstream != forward_nup)
		return false;
	for (int i = 0; i < forward_nup; i++) {
		const struct upstream_cfg *n = &cfg->upstream[i], *o = &forward_up[i].conf;
		if (strcmp(n->host, o->host) || strcmp(n->port, o->port) || n->tls != o->tls)
			return false;
	}
	return true;
}

/* forward_reload - SIGHUP: an upstream keeping its place, host, port and tls mode takes its
 * new ca=, verify=, auth= file, rate= and connections= at once (sessions in progress finish
 * with the old ones); a changed list of upstreams replaces the old one once the sessions in
 * progress have finished (forward_switch_start). Nothing is applied unless every upstream
 * loaded. */
int forward_reload(const struct config *cfg, char *err, size_t errlen)
{
	struct forward_upstream fresh[CONFIG_MAX_UPSTREAM];
	if (forward_load_list(fresh, cfg, err, errlen) < 0)
		return -1;
	if (!forward_same_list(cfg)) {
		forward_switch_start(fresh, cfg->nupstream);
		return 0;
	}
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		forward_retire(u);
		u->creds = fresh[i].creds;
		u->conf = fresh[i].conf;
		ratelimit_set(&u->rate, u->conf.rate_count, u->conf.rate_window);
		forward_sasl_need(u);
	}
	log_info("forward event=reloaded upstreams=%d", forward_nup);
	return 0;
}

/* forward_notify - a fresh message */
void forward_notify(const char *id, size_t size)
{
	if (!forward_started || forward_stopping)
		return;
	forward_load(id, size > 0 && size <= FORWARD_INLINE_MAX);
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
		   "dropped=%llu\nrcpt_delivered=%llu\nrcpt_failed=%llu\ndeferrals=%llu\ncredential_sets=%u\n", queued,
		   deferred, active, waiting, forward_stat_forwarded, forward_stat_bounced, forward_stat_dropped,
		   forward_stat_rcpt_ok, forward_stat_rcpt_failed, forward_stat_deferrals, forward_creds_live);
	double now = clock_mono();
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
	if (forward_switching) { /* the new list never started */
		ev_timer_stop(forward_loop, &forward_switch_timer);
		for (int i = 0; i < forward_next_n; i++)
			forward_retire(&forward_next[i]);
		forward_switching = false;
	}
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		ev_timer_stop(forward_loop, &u->rate_timer);
		struct forward_session *next;
		for (struct forward_session *s = u->sessions; s; s = next) {
			next = s->next;
			forward_session_shutdown(s);
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
	forward_session_reap();
	for (int b = 0; b < FORWARD_BUCKETS; b++)
		while (forward_table[b])
			forward_msg_free(forward_table[b]);
	for (int i = 0; i < forward_nup; i++) {
		struct forward_upstream *u = &forward_up[i];
		u->wait_head = u->wait_tail = NULL;
		u->nwait = 0;
		forward_retire(u);
	}
	if (forward_sasl)
		sasl_client_done();
	log_info("forward event=stopped");
}
