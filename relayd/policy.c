/*
 * policy - per-user limits, per-IP limits, AUTH brute-force defence, per-user counters.
 * Loop thread only (no locking). Tables are small chained hash maps keyed by name or IP.
 *
 * Usage journal QUEUE/usage.log, one line per accepted message:
 *     <unix time> <msgs +1|-1> <rcpts> <bytes> <user>
 * written (not fsync'd) before the message is handed to the commit thread: the commit's
 * syncfs(2) covers the whole file system, so the line is durable when the 250 is sent.
 * At start the last day is replayed and the file rewritten with only that day; once a day
 * it is rotated to usage.log.1, so it never holds more than two days.
 *
 * Brute force: each AUTH failure from an IP (and for a user name) counts; the reply is
 * delayed 1, 2, 4 ... s (at most 8); at auth_fail_limit failures the IP (or name) is
 * locked out for auth_lockout seconds: AUTH gets 454 4.7.0 and new connections from a
 * locked IP get 421 4.7.0. Every lockout is logged (event=auth-lockout) for fail2ban.
 * The caller counts every name tried, existing or not, and answers a locked name the same
 * whatever the password (smtp_server.c), so a lockout tells neither.
 * Loopback clients are exempt from every per-IP rule unless limit_loopback is yes; the
 * per-user-name count applies to everyone. An IP's (or name's) entry goes when it holds
 * nothing worth remembering: at its last disconnect, or at the sweep (every auth_lockout
 * seconds, at most a minute) for one that failed AUTH and never came back.
 * A success forgets the name's failures and, of the IP's, only those for that same name
 * (kept per name, a keyed hash each, for the first POLICY_FAIL_NAMES names): a typo then the
 * right password leaves no trace, but one valid account cannot be used from an address to
 * wipe its count while it tries passwords for other names.
 * The per-IP and per-name tables (lockouts, failures, connection rates) live in memory only
 * and count in clock_mono_sec(), so an NTP step neither stretches a lockout nor ends it
 * early; the per-user limits keep wall time (the usage journal outlives the process).
 */
#include "policy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "log.h"
#include "ratelimit.h"

#define POLICY_BUCKETS 1024
#define POLICY_DAY 86400
#define POLICY_FAIL_NAMES 4

static const uint32_t policy_windows[3] = { 60, 3600, 86400 };

struct policy_user {
	struct policy_user *next;
	char name[256];
	struct ratelimit_window w[POLICY_NMETRICS][3];
	uint64_t counters[PC_NCOUNTERS];
};

struct policy_ip {
	struct policy_ip *next;
	char key[272];                 /* "ip:1.2.3.4" or "user:alice" */
	unsigned conns;
	struct ratelimit_window rate;  /* new connections per minute */
	unsigned auth_fails;
	time_t locked_until;
	time_t last_fail;
	struct {                       /* an IP's failures per name tried */
		uint64_t name;         /* policy_name_id(); 0 = free */
		unsigned fails;
	} fail_names[POLICY_FAIL_NAMES];
};

static const struct config *policy_cfg;
static struct policy_user *policy_users[POLICY_BUCKETS];
static struct policy_ip *policy_ips[POLICY_BUCKETS];
static unsigned policy_nips;       /* entries in policy_ips */
static unsigned char policy_name_key[32];
static int policy_journal = -1;
static struct ev_loop *policy_loop;
static ev_timer policy_rotate_timer;
static ev_timer policy_sweep_timer;

static void policy_sweep(struct ev_loop *loop, ev_timer *w, int revents);

static unsigned policy_hash(const char *s)
{
	unsigned h = 5381;
	for (; *s; s++)
		h = h * 33 + (unsigned char)*s;
	return h % POLICY_BUCKETS;
}

static struct policy_user *policy_user_get(const char *name)
{
	unsigned h = policy_hash(name);
	for (struct policy_user *u = policy_users[h]; u; u = u->next)
		if (!strcmp(u->name, name))
			return u;
	struct policy_user *u = calloc(1, sizeof(*u));
	if (!u)
		return NULL;
	snprintf(u->name, sizeof(u->name), "%s", name);
	for (int m = 0; m < POLICY_NMETRICS; m++)
		for (int g = 0; g < 3; g++)
			ratelimit_set(&u->w[m][g], 0, policy_windows[g]);
	u->next = policy_users[h];
	policy_users[h] = u;
	return u;
}

/* count a message at time t (msgs 1), or take back one counted at time t (msgs -1) */
static void policy_user_add(struct policy_user *u, time_t t, int64_t msgs, int64_t rcpts, int64_t bytes)
{
	int64_t v[POLICY_NMETRICS] = { msgs, rcpts, bytes };
	for (int m = 0; m < POLICY_NMETRICS; m++)
		for (int g = 0; g < 3; g++) {
			if (msgs < 0)
				ratelimit_take_back(&u->w[m][g], t, (uint64_t)-v[m]);
			else
				ratelimit_add(&u->w[m][g], t, (uint64_t)v[m]);
		}
}

/* replay the last day of usage.log.1 then usage.log, and leave one compacted usage.log */
static void policy_replay(const char *path, time_t now)
{
	char tmp[PATH_MAX + 32], old[PATH_MAX + 32], line[512];
	snprintf(tmp, sizeof(tmp), "%s.new", path);
	snprintf(old, sizeof(old), "%s.1", path);
	unlink(tmp); /* a leftover (or a link planted there: this runs as root) goes first */
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	FILE *out = fd >= 0 ? fdopen(fd, "w") : NULL;
	int n = 0;
	for (int f = 0; f < 2; f++) {
	fd = open(f == 0 ? old : path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	FILE *in = fd >= 0 ? fdopen(fd, "r") : NULL;
	if (!in)
		continue;
	while (fgets(line, sizeof(line), in)) {
		long long t, msgs, rcpts, bytes;
		char user[256];
		if (sscanf(line, "%lld %lld %lld %lld %255s", &t, &msgs, &rcpts, &bytes, user) != 5)
			continue; /* a torn last line after a crash */
		if (t <= (long long)now - POLICY_DAY)
			continue;
		if (t > (long long)now)
			t = now; /* written while the clock was ahead: still used, counted as now */
		struct policy_user *u = policy_user_get(user);
		if (u)
			policy_user_add(u, (time_t)t, msgs, rcpts, bytes);
		if (out)
			fprintf(out, "%lld %lld %lld %lld %s\n", t, msgs, rcpts, bytes, user);
		n++;
	}
	fclose(in);
	}
	if (out && fflush(out) == 0 && fsync(fileno(out)) == 0 && fclose(out) == 0) {
		if (rename(tmp, path) == 0)
			unlink(old);
	} else if (out) {
		fclose(out);
	}
	log_info("policy event=usage-replayed entries=%d", n);
}

/* once a day usage.log becomes usage.log.1 (replacing one whose entries are all older than
 * a day by now), so the journal holds at most two days however long relayd runs */
static void policy_rotate(struct ev_loop *loop, ev_timer *w, int revents)
{
	char path[PATH_MAX + 16], old[PATH_MAX + 32];
	(void)loop; (void)w; (void)revents;
	snprintf(path, sizeof(path), "%s/usage.log", policy_cfg->queue);
	snprintf(old, sizeof(old), "%s.1", path);
	if (rename(path, old) < 0)
		return;
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		log_warn("policy event=journal-rotate-failed error=\"%s\"", strerror(errno));
		return; /* keep appending to the renamed file: replay reads it too */
	}
	close(policy_journal);
	policy_journal = fd;
}

/* policy_init - defaults, journal replay, daily rotation */
int policy_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen)
{
	char path[PATH_MAX + 16];
	policy_cfg = cfg;
	if (gnutls_rnd(GNUTLS_RND_KEY, policy_name_key, sizeof(policy_name_key)) < 0) {
		snprintf(err, errlen, "no random key for the AUTH failure table");
		return -1;
	}
	snprintf(path, sizeof(path), "%s/usage.log", cfg->queue);
	policy_replay(path, time(NULL));
	policy_journal = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (policy_journal < 0) {
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	if (loop) {
		policy_loop = loop;
		ev_timer_init(&policy_rotate_timer, policy_rotate, POLICY_DAY, POLICY_DAY);
		ev_timer_start(loop, &policy_rotate_timer);
		ev_unref(loop); /* the rotation alone does not keep relayd running */
		ev_init(&policy_sweep_timer, policy_sweep);
		policy_sweep(loop, &policy_sweep_timer, 0);
		ev_unref(loop);
	}
	return 0;
}

/* policy_shutdown - free everything */
void policy_shutdown(void)
{
	for (int i = 0; i < POLICY_BUCKETS; i++) {
		while (policy_users[i]) {
			struct policy_user *u = policy_users[i];
			policy_users[i] = u->next;
			free(u);
		}
		while (policy_ips[i]) {
			struct policy_ip *p = policy_ips[i];
			policy_ips[i] = p->next;
			free(p);
		}
	}
	policy_nips = 0;
	if (policy_loop) {
		ev_ref(policy_loop);
		ev_timer_stop(policy_loop, &policy_rotate_timer);
		ev_ref(policy_loop);
		ev_timer_stop(policy_loop, &policy_sweep_timer);
		policy_loop = NULL;
	}
	if (policy_journal >= 0)
		close(policy_journal);
	policy_journal = -1;
}

/* policy_default_limits - from relayd.conf */
void policy_default_limits(struct policy_limits *l)
{
	l->limit[POLICY_MSGS] = policy_cfg->limit_msgs;
	l->window[POLICY_MSGS] = policy_cfg->limit_msgs_window;
	l->limit[POLICY_RCPTS] = policy_cfg->limit_rcpts;
	l->window[POLICY_RCPTS] = policy_cfg->limit_rcpts_window;
	l->limit[POLICY_BYTES] = policy_cfg->limit_bytes;
	l->window[POLICY_BYTES] = policy_cfg->limit_bytes_window;
}

/* policy_metric_name - for replies and logs */
const char *policy_metric_name(enum policy_metric m)
{
	static const char *names[] = { "messages", "recipients", "bytes" };
	return names[m];
}

static int policy_granularity(uint32_t window)
{
	return window <= 60 ? 0 : window <= 3600 ? 1 : 2;
}

/* policy_check - room for this much more? */
int policy_check(const char *user, const struct policy_limits *l, uint64_t msgs, uint64_t rcpts, uint64_t bytes,
		 enum policy_metric *metric, uint32_t *wait)
{
	struct policy_user *u = policy_user_get(user);
	uint64_t want[POLICY_NMETRICS] = { msgs, rcpts, bytes };
	time_t now = time(NULL);
	if (!u)
		return 0;
	for (int m = 0; m < POLICY_NMETRICS; m++) {
		if (!l->limit[m] || !want[m])
			continue;
		struct ratelimit_window *w = &u->w[m][policy_granularity(l->window[m])];
		w->limit = l->limit[m];
		if (!ratelimit_allows(w, now, want[m])) {
			*metric = (enum policy_metric)m;
			*wait = want[m] > w->limit ? 0 : ratelimit_wait(w, now, want[m]);
			return -1;
		}
	}
	return 0;
}

static void policy_journal_write(time_t t, const char *user, int msgs, uint64_t rcpts, uint64_t bytes)
{
	char line[512];
	if (policy_journal < 0)
		return;
	int n = snprintf(line, sizeof(line), "%lld %d %lld %lld %s\n", (long long)t, msgs,
			 (long long)rcpts * msgs, (long long)bytes * msgs, user);
	if (n > 0 && (size_t)n < sizeof(line) && write(policy_journal, line, (size_t)n) != n)
		log_warn("policy event=journal-write-failed error=\"%s\"", strerror(errno));
}

/* policy_record - count an accepted message; returns the time it is counted at */
time_t policy_record(const char *user, uint64_t rcpts, uint64_t bytes)
{
	time_t now = time(NULL);
	struct policy_user *u = policy_user_get(user);
	if (!u)
		return now;
	policy_user_add(u, now, 1, (int64_t)rcpts, (int64_t)bytes);
	policy_journal_write(now, user, 1, rcpts, bytes);
	return now;
}

/* policy_unrecord - the commit failed: give the budget back, in the buckets it was counted in
 * (a later bucket would outlive the count and wrap the window's sum) */
void policy_unrecord(const char *user, time_t counted, uint64_t rcpts, uint64_t bytes)
{
	struct policy_user *u = policy_user_get(user);
	if (!u)
		return;
	policy_user_add(u, counted, -1, -(int64_t)rcpts, -(int64_t)bytes);
	policy_journal_write(counted, user, -1, rcpts, bytes);
}

/* policy_count - per-user counters */
void policy_count(const char *user, enum policy_counter c)
{
	struct policy_user *u = user && user[0] ? policy_user_get(user) : NULL;
	if (u)
		u->counters[c]++;
}

/* --- per IP and per user name ------------------------------------------------ */

static bool policy_is_loopback(const char *ip)
{
	return !strncmp(ip, "127.", 4) || !strcmp(ip, "::1") || !strncmp(ip, "::ffff:127.", 11);
}

/* an IPv6 client's network (its address cut to ipv6_prefix_length bits, "2001:db8:1:2::/64"),
 * which the per-IP rules count as one client; false for IPv4 or a whole address */
static bool policy_ipv6_net(const char *ip, char *out, size_t outlen)
{
	unsigned char a[16];
	unsigned bits = policy_cfg ? policy_cfg->ipv6_prefix_length : 128;
	char text[INET6_ADDRSTRLEN];
	static const unsigned char v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	if (bits >= 128 || !strchr(ip, ':') || inet_pton(AF_INET6, ip, a) != 1 || !memcmp(a, v4mapped, 12))
		return false;
	for (unsigned i = 0; i < 16; i++)
		a[i] &= i * 8 >= bits ? 0 : i * 8 + 8 <= bits ? 0xff : (unsigned char)(0xff << (8 - bits % 8));
	if (!inet_ntop(AF_INET6, a, text, sizeof(text)))
		return false;
	snprintf(out, outlen, "%s/%u", text, bits);
	return true;
}

static struct policy_ip *policy_ip_get(const char *kind, const char *id, bool create)
{
	char key[272], net[INET6_ADDRSTRLEN + 8];
	if (!strcmp(kind, "ip") && policy_ipv6_net(id, net, sizeof(net)))
		id = net;
	snprintf(key, sizeof(key), "%s:%s", kind, id);
	unsigned h = policy_hash(key);
	for (struct policy_ip *p = policy_ips[h]; p; p = p->next)
		if (!strcmp(p->key, key))
			return p;
	if (!create)
		return NULL;
	struct policy_ip *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	snprintf(p->key, sizeof(p->key), "%s", key);
	ratelimit_set(&p->rate, 0, 60);
	p->next = policy_ips[h];
	policy_ips[h] = p;
	policy_nips++;
	return p;
}

/* an entry holding nothing worth remembering: no connection, lockout, recent failure or
 * recent connection that a limit counts */
static bool policy_ip_idle(const struct policy_ip *p, time_t now)
{
	return !p->conns && p->locked_until <= now &&
	       !(p->auth_fails && now - p->last_fail < (time_t)policy_cfg->auth_lockout) && !ratelimit_usage(&p->rate, now);
}

/* unlink and free *pp */
static void policy_ip_drop(struct policy_ip **pp)
{
	struct policy_ip *p = *pp;
	*pp = p->next;
	free(p);
	policy_nips--;
}

/* drop an entry that holds nothing worth remembering */
static void policy_ip_gc(struct policy_ip *p, time_t now)
{
	if (!policy_ip_idle(p, now))
		return;
	for (struct policy_ip **pp = &policy_ips[policy_hash(p->key)]; *pp; pp = &(*pp)->next) {
		if (*pp == p) {
			policy_ip_drop(pp);
			return;
		}
	}
}

/* every entry that holds nothing any more goes (an IP that failed AUTH and never came back
 * is not seen by a disconnect); again in auth_lockout seconds, at least 1, at most 60 */
static void policy_sweep(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	time_t now = clock_mono_sec();
	for (int i = 0; i < POLICY_BUCKETS; i++)
		for (struct policy_ip **pp = &policy_ips[i]; *pp;)
			if (policy_ip_idle(*pp, now))
				policy_ip_drop(pp);
			else
				pp = &(*pp)->next;
	unsigned period = policy_cfg->auth_lockout;
	w->repeat = period < 1 ? 1. : period > 60 ? 60. : (double)period;
	ev_timer_again(loop, w);
}

/* policy_ip_connect - count and maybe refuse a new connection */
int policy_ip_connect(const char *ip, const char **why)
{
	time_t now = clock_mono_sec();
	struct policy_ip *p = policy_ip_get("ip", ip, true);
	if (!p)
		return 0;
	p->conns++;
	if (p->locked_until > now) {
		*why = "auth-lockout";
		return -1;
	}
	if (policy_is_loopback(ip) && !policy_cfg->limit_loopback)
		return 0;
	if (policy_cfg->max_conn_rate_per_ip) /* counted only under a limit: the entry can go sooner */
		ratelimit_add(&p->rate, now, 1);
	if (policy_cfg->max_conn_per_ip && p->conns > policy_cfg->max_conn_per_ip) {
		*why = "too-many-connections";
		return -1;
	}
	p->rate.limit = policy_cfg->max_conn_rate_per_ip;
	if (policy_cfg->max_conn_rate_per_ip && !ratelimit_allows(&p->rate, now, 0)) {
		*why = "connection-rate";
		return -1;
	}
	return 0;
}

/* policy_ip_disconnect - one connection fewer */
void policy_ip_disconnect(const char *ip)
{
	struct policy_ip *p = policy_ip_get("ip", ip, false);
	if (!p)
		return;
	if (p->conns)
		p->conns--;
	policy_ip_gc(p, clock_mono_sec());
}

static bool policy_locked(const char *kind, const char *id, time_t now)
{
	struct policy_ip *p = id && id[0] ? policy_ip_get(kind, id, false) : NULL;
	return p && p->locked_until > now;
}

/* policy_auth_allowed - not locked out */
bool policy_auth_allowed(const char *ip, const char *name)
{
	time_t now = clock_mono_sec();
	return !policy_locked("ip", ip, now) && !policy_locked("user", name, now);
}

/* a name as the IP's failure table keeps it: keyed, so nobody can pick a name that collides */
static uint64_t policy_name_id(const char *name)
{
	unsigned char d[32];
	uint64_t id = 0;
	if (gnutls_hmac_fast(GNUTLS_MAC_SHA256, policy_name_key, sizeof(policy_name_key), name, strlen(name), d) < 0)
		return 0;
	memcpy(&id, d, sizeof(id));
	return id ? id : 1;
}

/* count one more of the IP's failures against name (untracked when the table is full) */
static void policy_fail_name(struct policy_ip *p, const char *name)
{
	uint64_t id = name && name[0] ? policy_name_id(name) : 0;
	if (!id)
		return;
	for (int i = 0; i < POLICY_FAIL_NAMES; i++)
		if (p->fail_names[i].name == id || !p->fail_names[i].name) {
			p->fail_names[i].name = id;
			p->fail_names[i].fails++;
			return;
		}
}

/* a success for name takes back the IP's failures for that name alone */
static void policy_forgive_name(struct policy_ip *p, const char *name)
{
	if (!p->auth_fails)
		return; /* nothing to take back (every success of a clean address): no HMAC */
	uint64_t id = policy_name_id(name);
	for (int i = 0; id && i < POLICY_FAIL_NAMES; i++)
		if (p->fail_names[i].name == id) {
			unsigned n = p->fail_names[i].fails;
			p->auth_fails -= n < p->auth_fails ? n : p->auth_fails;
			p->fail_names[i].name = 0;
			p->fail_names[i].fails = 0;
		}
}

static unsigned policy_fail_one(const char *kind, const char *id, const char *name, time_t now)
{
	struct policy_ip *p = policy_ip_get(kind, id, true);
	if (!p)
		return 0;
	if (p->auth_fails && now - p->last_fail >= (time_t)policy_cfg->auth_lockout) {
		p->auth_fails = 0; /* old failures are forgiven */
		memset(p->fail_names, 0, sizeof(p->fail_names));
	}
	p->auth_fails++;
	p->last_fail = now;
	policy_fail_name(p, name);
	if (policy_cfg->auth_fail_limit && p->auth_fails >= policy_cfg->auth_fail_limit && p->locked_until <= now) {
		p->locked_until = now + (time_t)policy_cfg->auth_lockout;
		char net[INET6_ADDRSTRLEN + 16] = "", v[LOG_VALUE_SIZE(255)];
		if (!strcmp(kind, "ip") && policy_ipv6_net(id, net + 5, sizeof(net) - 5))
			memcpy(net, " net=", 5);
		log_warn("policy event=auth-lockout %s=%s%s failures=%u seconds=%u", kind, log_value(id, v, sizeof(v)), net,
			 p->auth_fails, policy_cfg->auth_lockout);
	}
	return p->auth_fails;
}

/* policy_auth_failed - count, lock out past the limit, say how long to wait */
double policy_auth_failed(const char *ip, const char *name)
{
	time_t now = clock_mono_sec();
	if (name && name[0])
		policy_fail_one("user", name, NULL, now);
	if (policy_is_loopback(ip) && !policy_cfg->limit_loopback)
		return 0; /* loopback is exempt from per-IP policy unless limit_loopback yes */
	unsigned fails = policy_fail_one("ip", ip, name, now);
	double delay = 1;
	for (unsigned i = 1; i < fails && delay < 8; i++)
		delay *= 2;
	return delay;
}

/* policy_auth_ok - a success forgets the name's failures and the IP's for that name (not a lockout) */
void policy_auth_ok(const char *ip, const char *name)
{
	time_t now = clock_mono_sec();
	struct policy_ip *p = policy_ip_get("ip", ip, false);
	if (p && p->locked_until <= now)
		policy_forgive_name(p, name);
	p = policy_ip_get("user", name, false);
	if (p && p->locked_until <= now)
		p->auth_fails = 0;
}

/* policy_stats - per-user counters and current usage */
void policy_stats(struct buf *out)
{
	static const char *names[] = { "accepted", "rejected_limit", "rejected_sender", "auth_failures" };
	time_t now = time(NULL);
	buf_printf(out, "policy_tracked=%u\n", policy_nips); /* IPs and names the per-IP and AUTH rules remember */
	for (int i = 0; i < POLICY_BUCKETS; i++) {
		for (struct policy_user *u = policy_users[i]; u; u = u->next) {
			buf_printf(out, "user=%s", u->name);
			for (int c = 0; c < PC_NCOUNTERS; c++)
				buf_printf(out, " %s=%llu", names[c], (unsigned long long)u->counters[c]);
			buf_printf(out, " msgs_last_hour=%llu bytes_last_day=%llu\n",
				   (unsigned long long)ratelimit_usage(&u->w[POLICY_MSGS][1], now),
				   (unsigned long long)ratelimit_usage(&u->w[POLICY_BYTES][2], now));
		}
	}
}
