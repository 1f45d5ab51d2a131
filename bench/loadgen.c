/*
 * loadgen - SMTP submission load generator for relayd's benchmarks (libev + GnuTLS client).
 *
 * N client slots run at once. Each slot loops: connect, STARTTLS (RFC 3207) or implicit TLS
 * (RFC 8314), EHLO, AUTH PLAIN with an initial response (RFC 4954), then up to K messages
 * (MAIL/RCPT/DATA, sent as one PIPELINING group, RFC 2920, when the server offers it), QUIT.
 * The run ends after --messages TOTAL transactions were started and finished, or after
 * --duration SECONDS (no new message is started after that; the ones in flight finish).
 *
 * Latency of a message: from the start of its transaction to the 250 after the final dot. The
 * first message of a connection starts at connect(), so with --per-connection 1 (the default)
 * it includes TCP, TLS and AUTH; later messages on a connection start when MAIL is sent.
 * With --rate (open loop) a connection's first message counts from when it was due, so time
 * spent waiting for a free slot counts too. Also reported: final dot to 250 (the server's
 * accept-and-commit time, fsync included).
 * Any unexpected reply (not 2xx, 354 to DATA, 334 to AUTH) or connection/TLS failure is an
 * error: it is counted, the first few are printed, the message counts as failed and the
 * connection is dropped (the slot reconnects while there is work left).
 *
 * --idle N opens N sessions (TLS up, optionally authenticated) at most --clients at a time
 * while they are being set up, prints when all are established, and holds them until SIGINT,
 * SIGTERM or --hold SECONDS.
 *
 * Output: a human summary and one machine-readable line
 *   RESULT clients=.. msgs=.. rate=.. p50=.. p90=.. p99=.. max=.. errors=.. elapsed=..
 *          dot_p50=.. dot_p99=.. offered=..
 * (idle mode: RESULT idle=.. established=.. errors=.. dropped=..). Exit 0 when errors=0.
 *
 * Certificates are not verified: this is a benchmark client on loopback.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>
#include <gnutls/gnutls.h>

#define LG_INBUF 8192
#define LG_MAX_SHOWN_ERRORS 5

enum lg_state {
	LS_FREE,        /* no connection */
	LS_CONNECTING,  /* non-blocking connect() in progress */
	LS_HANDSHAKE,   /* TLS handshake (implicit or after STARTTLS) */
	LS_GREETING,    /* waiting for 220 */
	LS_EHLO,        /* waiting for the EHLO reply */
	LS_STARTTLS,    /* waiting for 220 to STARTTLS */
	LS_AUTH,        /* waiting for 235 (or 334) */
	LS_MAIL,        /* waiting for the MAIL reply */
	LS_RCPT,        /* waiting for the RCPT reply */
	LS_DATA,        /* waiting for 354 */
	LS_BODY,        /* body sent, waiting for 250 */
	LS_QUIT,        /* waiting for 221 or EOF */
	LS_IDLE,        /* idle mode: established, holding */
};

struct lg_buf {
	char *data;
	size_t off, len, cap; /* pending bytes are data[off .. off+len) */
};

struct lg_client {
	int id;
	int fd;
	unsigned gen;           /* bumped on close, so callers notice a reset under them */
	enum lg_state state;
	ev_io io;
	ev_timer timer;         /* I/O timeout, or the reconnect delay while LS_FREE */
	gnutls_session_t tls;
	bool tls_on;            /* TLS established: reads and writes go through GnuTLS */
	size_t tls_pending;     /* size of a gnutls_record_send that returned EAGAIN */
	gnutls_datum_t resume;  /* --resume: this slot's last session (its ticket), for the next */
	bool ext_pipelining, ext_starttls, ext_auth;
	bool auth_sent_cred;
	bool msg_claimed;       /* a message is owned by this slot and not finished */
	bool pipelined;         /* the current MAIL/RCPT/DATA went as one group */
	bool done;              /* slot finished: no more work */
	int msgs_on_conn;
	double t_conn, t_msg;
	double t_sched;         /* --rate: when this slot's connection was due to start */
	struct lg_client *pace_next; /* --rate: the next slot waiting for its due time */
	double t_dot;           /* when the final dot of the current message was queued */
	double t_phase;         /* --phases: when the current state began */
	char in[LG_INBUF];
	size_t inlen;
	struct lg_buf out;
};

static struct {
	const char *host, *port, *user, *password, *from, *rcpt, *sni, *priority;
	int clients;
	long messages;
	double duration;
	size_t size;
	int per_conn;
	bool implicit_tls, no_tls;
	long idle;
	double hold;
	double timeout;
	int source_addrs;
	long max_errors;
	bool quickack;
	double rate;            /* open loop: connections started per second (0: closed loop) */
	bool phases;            /* report where the time of a session goes, per state */
	const char *samples;    /* write one line per message here */
	bool resume;            /* offer each slot's last session again (TLS session resumption) */
} opt = {
	.host = "127.0.0.1", .port = "587", .priority = "NORMAL", .rcpt = "sink@example.net", .clients = 1, .messages = -1,
	.size = 4096, .per_conn = 1, .timeout = 30, .source_addrs = 1, .max_errors = 1000,
	.quickack = true,
};

static struct ev_loop *loop;
static gnutls_certificate_credentials_t lg_cred;
static gnutls_priority_t lg_prio;
static struct sockaddr_storage lg_addr;
static socklen_t lg_addrlen;
static struct lg_client *lg_clients;
static int lg_nslots;        /* slots in use (clients, or idle sessions) */
static int lg_slots_done;
static long lg_resumed;      /* handshakes the server resumed */
static long lg_claimed, lg_ok, lg_failed, lg_errors, lg_errors_shown, lg_connects;
static long lg_established, lg_dropped, lg_connecting, lg_next_idle;
static bool lg_stopping;     /* no new work: duration over, signal, or too many errors */
static double lg_t0, lg_t_end, lg_deadline;
struct lg_lat {
	double *v;           /* latencies in ms of successful messages */
	size_t n, cap;
};
static struct lg_lat lg_lat;  /* start of the transaction (see --rate) to the 250 after the dot */
static struct lg_lat lg_dlat; /* final dot sent to its 250: the server's accept-and-commit time */
static struct lg_lat lg_phase[LS_IDLE + 1]; /* --phases: time spent waiting in each state */
static FILE *lg_samples;      /* --samples: written after the run (no file I/O during it) */
static struct lg_lat lg_starts; /* --samples: each message's start, in lg_lat's order */
static double lg_next_start;  /* --rate: when the next connection is due */
/* --rate: the slots waiting for their due time, in due order, and a timerfd armed for the
 * first (nanoseconds: libev's timers wake the epoll backend on whole milliseconds, which
 * would add up to 1 ms of the load generator's own lateness to every latency) */
static struct lg_client *lg_pace_head, *lg_pace_tail;
static int lg_pace_fd = -1;
static ev_io lg_pace_io;
static char *lg_fill;        /* body filler: CRLF-terminated lines */
static char lg_auth_b64[1024];
static char lg_date[64];
static ev_signal lg_sigint, lg_sigterm;
static ev_timer lg_stop_timer;

static void lg_client_connect(struct lg_client *c);
static void lg_client_update_io(struct lg_client *c);
static void lg_client_flush(struct lg_client *c);
static void lg_slot_next(struct lg_client *c);

static double lg_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void lg_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void lg_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("loadgen: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static void *lg_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n);
	if (!q)
		lg_die("out of memory");
	return q;
}

/* buffers ----------------------------------------------------------------------------------- */

static void lg_buf_add(struct lg_buf *b, const void *p, size_t n)
{
	if (b->off + b->len + n > b->cap) {
		if (b->off) {
			memmove(b->data, b->data + b->off, b->len);
			b->off = 0;
		}
		if (b->len + n > b->cap) {
			size_t cap = b->cap ? b->cap : 1024;
			while (cap < b->len + n)
				cap *= 2;
			b->data = lg_xrealloc(b->data, cap);
			b->cap = cap;
		}
	}
	memcpy(b->data + b->off + b->len, p, n);
	b->len += n;
}

static void lg_buf_printf(struct lg_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void lg_buf_printf(struct lg_buf *b, const char *fmt, ...)
{
	char tmp[2048];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(tmp))
		lg_die("command line too long");
	lg_buf_add(b, tmp, (size_t)n);
}

static void lg_buf_eat(struct lg_buf *b, size_t n)
{
	b->off += n;
	b->len -= n;
	if (!b->len)
		b->off = 0;
}

/* results ----------------------------------------------------------------------------------- */

static const char *lg_strstate(enum lg_state s)
{
	static const char *names[] = { "free", "connect", "tls-handshake", "greeting", "ehlo", "starttls",
				       "auth", "mail", "rcpt", "data", "body", "quit", "idle" };
	return s <= LS_IDLE ? names[s] : "?";
}

static void lg_error(struct lg_client *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void lg_error(struct lg_client *c, const char *fmt, ...)
{
	lg_errors++;
	if (lg_errors_shown < LG_MAX_SHOWN_ERRORS) {
		char msg[512];
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(msg, sizeof(msg), fmt, ap);
		va_end(ap);
		fprintf(stderr, "loadgen: error client=%d state=%s: %s\n", c->id, lg_strstate(c->state), msg);
		lg_errors_shown++;
	}
	if (opt.max_errors && lg_errors >= opt.max_errors && !lg_stopping) {
		fprintf(stderr, "loadgen: %ld errors, stopping\n", lg_errors);
		lg_stopping = true;
	}
}

static void lg_record(struct lg_lat *l, double ms)
{
	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 4096;
		l->v = lg_xrealloc(l->v, l->cap * sizeof(*l->v));
	}
	l->v[l->n++] = ms;
}

/* --phases: the state c is leaving took from t_phase until now (LS_FREE: due to connect()) */
static void lg_phase_mark(struct lg_client *c, enum lg_state s)
{
	if (!opt.phases)
		return;
	double now = lg_now();
	lg_record(&lg_phase[s], (now - c->t_phase) * 1000.0);
	c->t_phase = now;
}

static int lg_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* nearest-rank percentile of sorted latencies (100: the maximum) */
static double lg_pct(const struct lg_lat *l, unsigned p)
{
	if (!l->n)
		return 0;
	size_t rank = (p * l->n + 99) / 100;
	if (rank < 1)
		rank = 1;
	return l->v[rank - 1];
}

/* may this slot start one more message? (claims it when yes) */
static bool lg_claim(void)
{
	if (lg_stopping)
		return false;
	if (opt.messages >= 0) {
		if (lg_claimed >= opt.messages)
			return false;
	} else if (lg_now() >= lg_deadline) {
		lg_stopping = true;
		return false;
	}
	lg_claimed++;
	return true;
}

/* connection ------------------------------------------------------------------------------ */

static void lg_client_close(struct lg_client *c)
{
	if (c->state == LS_CONNECTING || c->state == LS_HANDSHAKE || c->state == LS_GREETING ||
	    c->state == LS_EHLO || c->state == LS_STARTTLS || c->state == LS_AUTH)
		if (opt.idle > 0)
			lg_connecting--;
	ev_io_stop(loop, &c->io);
	ev_timer_stop(loop, &c->timer);
	if (c->tls) {
		if (opt.resume && c->tls_on) { /* the ticket it got is good for one more session */
			gnutls_free(c->resume.data);
			c->resume.data = NULL;
			if (gnutls_session_get_data2(c->tls, &c->resume) < 0)
				c->resume.data = NULL;
		}
		gnutls_deinit(c->tls);
		c->tls = NULL;
	}
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	c->tls_on = false;
	c->tls_pending = 0;
	c->inlen = 0;
	c->out.off = c->out.len = 0;
	c->ext_pipelining = c->ext_starttls = c->ext_auth = false;
	c->auth_sent_cred = false;
	c->msgs_on_conn = 0;
	c->t_sched = 0;
	c->state = LS_FREE;
	c->gen++;
}

static void lg_check_finished(void)
{
	if (opt.idle > 0)
		return;
	if (lg_slots_done == lg_nslots) {
		lg_t_end = lg_now();
		ev_break(loop, EVBREAK_ALL);
	}
}

/* drop the connection after an error; the claimed message (if any) failed */
static void lg_client_fail(struct lg_client *c)
{
	if (c->msg_claimed) {
		c->msg_claimed = false;
		lg_failed++;
	}
	bool was_idle = c->state == LS_IDLE;
	lg_client_close(c);
	if (opt.idle > 0) {
		if (was_idle) {
			lg_established--;
			lg_dropped++;
		}
		c->done = true;
		lg_slot_next(c);
		return;
	}
	/* reconnect after a short pause, so a refusing server does not make us spin */
	ev_timer_stop(loop, &c->timer);
	ev_timer_set(&c->timer, 0.01, 0.);
	ev_timer_start(loop, &c->timer);
}

static void lg_slot_done(struct lg_client *c)
{
	if (!c->done) {
		c->done = true;
		lg_slots_done++;
	}
	lg_check_finished();
}

/* arm the pacing timerfd for the first waiting slot (absolute CLOCK_MONOTONIC), or disarm it */
static void lg_pace_arm(void)
{
	struct itimerspec its = { 0 };
	if (lg_pace_head) {
		double t = lg_pace_head->t_sched;
		its.it_value.tv_sec = (time_t)t;
		its.it_value.tv_nsec = (long)((t - (double)its.it_value.tv_sec) * 1e9);
		if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
			its.it_value.tv_nsec = 1; /* all zero would disarm */
	}
	if (timerfd_settime(lg_pace_fd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
		lg_die("timerfd_settime: %s", strerror(errno));
}

/*
 * --rate: the free slot takes the next start time of the schedule and, if that is still ahead,
 * waits for it in the pacing list (returns true; lg_pace_cb calls lg_slot_next again). A slot
 * that is late keeps its due time as the start of the message, so a server that falls behind
 * shows in the latencies instead of slowing the schedule (no coordinated omission).
 */
static bool lg_pace(struct lg_client *c)
{
	double now = lg_now();
	if (c->t_sched == 0) {
		if (lg_next_start == 0)
			lg_next_start = now;
		if (opt.messages < 0 && lg_next_start >= lg_deadline) {
			lg_stopping = true; /* the schedule is over: no slot waits past --duration */
			return false;
		}
		c->t_sched = lg_next_start;
		lg_next_start += 1.0 / opt.rate;
		if (c->t_sched > now) { /* due times only grow: it goes last */
			c->pace_next = NULL;
			if (lg_pace_tail)
				lg_pace_tail->pace_next = c;
			else
				lg_pace_head = c;
			lg_pace_tail = c;
			if (lg_pace_head == c)
				lg_pace_arm();
			return true;
		}
	}
	return false;
}

/* the pacing timerfd fired: start every slot that is due */
static void lg_pace_cb(struct ev_loop *l, ev_io *w, int revents)
{
	(void)l; (void)w; (void)revents;
	uint64_t expirations;
	if (read(lg_pace_fd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
		lg_die("timerfd read: %s", strerror(errno));
	double now = lg_now();
	while (lg_pace_head && lg_pace_head->t_sched <= now) {
		struct lg_client *c = lg_pace_head;
		lg_pace_head = c->pace_next;
		if (!lg_pace_head)
			lg_pace_tail = NULL;
		lg_slot_next(c);
	}
	lg_pace_arm();
}

/* the slot is free: start its next connection, or finish */
static void lg_slot_next(struct lg_client *c)
{
	if (opt.idle > 0) {
		/* idle mode: a free setup slot takes the next session index */
		while (lg_connecting < opt.clients && lg_next_idle < opt.idle && !lg_stopping) {
			struct lg_client *n = &lg_clients[lg_next_idle++];
			lg_client_connect(n);
		}
		if (lg_next_idle >= opt.idle && lg_connecting == 0 && lg_t_end == 0) {
			lg_t_end = lg_now();
			printf("loadgen: idle sessions established=%ld of %ld in %.2f s (errors=%ld); holding\n",
			       lg_established, opt.idle, lg_t_end - lg_t0, lg_errors);
			printf("ESTABLISHED %ld\n", lg_established);
			fflush(stdout);
			if (opt.hold > 0) {
				ev_timer_set(&lg_stop_timer, opt.hold, 0.);
				ev_timer_start(loop, &lg_stop_timer);
			}
		}
		return;
	}
	if (c->done)
		return;
	if (opt.rate > 0 && lg_pace(c))
		return;
	if (!lg_claim()) {
		lg_slot_done(c);
		return;
	}
	c->msg_claimed = true;
	lg_client_connect(c);
}

static void lg_timer_cb(struct ev_loop *l, ev_timer *w, int revents)
{
	struct lg_client *c = w->data;
	if (c->state == LS_FREE) { /* reconnect delay over */
		lg_slot_next(c);
		return;
	}
	lg_error(c, "timeout after %.0f s", opt.timeout);
	lg_client_fail(c);
}

static void lg_touch(struct lg_client *c)
{
	if (c->state == LS_IDLE) {
		ev_timer_stop(loop, &c->timer);
		return;
	}
	c->timer.repeat = opt.timeout;
	ev_timer_again(loop, &c->timer);
}

static void lg_send(struct lg_client *c, const char *s)
{
	lg_buf_add(&c->out, s, strlen(s));
}

static void lg_tls_start(struct lg_client *c)
{
	int rc = gnutls_init(&c->tls, GNUTLS_CLIENT | GNUTLS_NONBLOCK);
	if (rc < 0)
		lg_die("gnutls_init: %s", gnutls_strerror(rc));
	gnutls_priority_set(c->tls, lg_prio);
	gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, lg_cred);
	if (opt.sni)
		gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, opt.sni, strlen(opt.sni));
	if (opt.resume && c->resume.data)
		gnutls_session_set_data(c->tls, c->resume.data, c->resume.size);
	gnutls_transport_set_int(c->tls, c->fd);
	c->state = LS_HANDSHAKE;
}

static void lg_client_connect(struct lg_client *c)
{
	lg_connects++;
	if (opt.idle > 0)
		lg_connecting++;
	c->t_conn = lg_now();
	c->t_phase = opt.rate > 0 && c->t_sched > 0 ? c->t_sched : c->t_conn;
	lg_phase_mark(c, LS_FREE);
	c->fd = socket(lg_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		c->state = LS_CONNECTING;
		lg_error(c, "socket: %s", strerror(errno));
		lg_client_fail(c);
		return;
	}
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (opt.source_addrs > 1 && lg_addr.ss_family == AF_INET) {
		struct sockaddr_in src = { .sin_family = AF_INET };
		src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(c->id % opt.source_addrs));
		setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (bind(c->fd, (struct sockaddr *)&src, sizeof(src)) < 0) {
			c->state = LS_CONNECTING;
			lg_error(c, "bind: %s", strerror(errno));
			lg_client_fail(c);
			return;
		}
	}
	c->state = LS_CONNECTING;
	if (connect(c->fd, (struct sockaddr *)&lg_addr, lg_addrlen) < 0 && errno != EINPROGRESS) {
		lg_error(c, "connect: %s", strerror(errno));
		lg_client_fail(c);
		return;
	}
	lg_touch(c);
	lg_client_update_io(c);
}

/* replies --------------------------------------------------------------------------------- */

static void lg_start_message(struct lg_client *c)
{
	if (c->msgs_on_conn > 0) {
		if (!lg_claim()) {
			lg_send(c, "QUIT\r\n");
			c->state = LS_QUIT;
			return;
		}
		c->msg_claimed = true;
		c->t_msg = lg_now();
	} else {
		c->t_msg = opt.rate > 0 ? c->t_sched : c->t_conn;
		c->t_sched = 0;
	}
	lg_buf_printf(&c->out, "MAIL FROM:<%s> SIZE=%zu\r\n", opt.from, opt.size);
	c->pipelined = c->ext_pipelining;
	if (c->pipelined)
		lg_buf_printf(&c->out, "RCPT TO:<%s>\r\nDATA\r\n", opt.rcpt);
	c->state = LS_MAIL;
}

static void lg_send_body(struct lg_client *c)
{
	static unsigned long serial;
	char hdr[1024];
	serial++;
	int n = snprintf(hdr, sizeof(hdr),
			 "From: <%s>\r\nTo: <%s>\r\nDate: %s\r\nMessage-ID: <%lu.%ld.%d@loadgen.invalid>\r\n"
			 "Subject: loadgen message %lu",
			 opt.from, opt.rcpt, lg_date, serial, (long)getpid(), c->id, serial);
	if (n < 0 || (size_t)n >= sizeof(hdr) - 8)
		lg_die("header too long");
	size_t hlen = (size_t)n + 4; /* + "\r\n\r\n" */
	size_t blen = opt.size > hlen + 2 ? opt.size - hlen : 2;
	/* the filler's suffix must not start inside a CRLF: pad the subject instead */
	size_t pad = blen % 78 == 1 || blen % 78 == 2 ? blen % 78 : 0;
	if (pad && blen > pad + 2) {
		memcpy(hdr + n, "xx", pad);
		n += (int)pad;
		blen -= pad;
	}
	memcpy(hdr + n, "\r\n\r\n", 4);
	lg_buf_add(&c->out, hdr, (size_t)n + 4);
	if (blen > opt.size + 2)
		blen = opt.size + 2;
	lg_buf_add(&c->out, lg_fill + (opt.size + 2 - blen), blen);
	lg_send(c, ".\r\n");
	c->t_dot = lg_now();
	c->state = LS_BODY;
}

static void lg_ready(struct lg_client *c)
{
	if (opt.idle > 0) {
		c->state = LS_IDLE;
		lg_connecting--;
		lg_established++;
		ev_timer_stop(loop, &c->timer);
		lg_slot_next(c);
		return;
	}
	lg_start_message(c);
}

static void lg_after_ehlo(struct lg_client *c)
{
	if (!c->tls_on && !opt.no_tls) {
		if (!c->ext_starttls) {
			lg_error(c, "STARTTLS not offered");
			lg_client_fail(c);
			return;
		}
		lg_send(c, "STARTTLS\r\n");
		c->state = LS_STARTTLS;
		return;
	}
	if (opt.user) {
		lg_send(c, "AUTH PLAIN ");
		lg_send(c, lg_auth_b64);
		lg_send(c, "\r\n");
		c->auth_sent_cred = true;
		c->state = LS_AUTH;
		return;
	}
	lg_ready(c);
}

/* one complete reply (the last line of a multi-line one); returns -1 if c was closed */
static int lg_reply(struct lg_client *c, int code, const char *line)
{
	lg_phase_mark(c, c->state);
	switch (c->state) {
	case LS_GREETING:
		if (code != 220)
			break;
		lg_send(c, "EHLO loadgen.invalid\r\n");
		c->state = LS_EHLO;
		return 0;
	case LS_EHLO:
		if (code != 250)
			break;
		lg_after_ehlo(c);
		return c->state == LS_FREE ? -1 : 0;
	case LS_STARTTLS:
		if (code != 220)
			break;
		c->inlen = 0; /* nothing may follow the 220 (RFC 3207 §5) */
		lg_tls_start(c);
		return 0;
	case LS_AUTH:
		if (code == 334 && !c->auth_sent_cred) {
			lg_send(c, lg_auth_b64);
			lg_send(c, "\r\n");
			c->auth_sent_cred = true;
			return 0;
		}
		if (code != 235)
			break;
		lg_ready(c);
		return 0;
	case LS_MAIL:
		if (code / 100 != 2)
			break;
		if (!c->pipelined)
			lg_buf_printf(&c->out, "RCPT TO:<%s>\r\n", opt.rcpt);
		c->state = LS_RCPT;
		return 0;
	case LS_RCPT:
		if (code / 100 != 2)
			break;
		if (!c->pipelined)
			lg_send(c, "DATA\r\n");
		c->state = LS_DATA;
		return 0;
	case LS_DATA:
		if (code != 354)
			break;
		lg_send_body(c);
		return 0;
	case LS_BODY:
		if (code / 100 != 2)
			break;
		lg_record(&lg_lat, (lg_now() - c->t_msg) * 1000.0);
		lg_record(&lg_dlat, (lg_now() - c->t_dot) * 1000.0);
		if (lg_samples)
			lg_record(&lg_starts, c->t_msg - lg_t0);
		lg_ok++;
		c->msg_claimed = false;
		c->msgs_on_conn++;
		if (c->msgs_on_conn < opt.per_conn) {
			lg_start_message(c);
		} else {
			lg_send(c, "QUIT\r\n");
			c->state = LS_QUIT;
		}
		return 0;
	case LS_QUIT:
		lg_client_close(c);
		lg_slot_next(c);
		return -1;
	default:
		break;
	}
	lg_error(c, "unexpected reply: %.200s", line);
	lg_client_fail(c);
	return -1;
}

static void lg_ehlo_keyword(struct lg_client *c, const char *kw)
{
	if (!strncasecmp(kw, "PIPELINING", 10))
		c->ext_pipelining = true;
	else if (!strncasecmp(kw, "STARTTLS", 8))
		c->ext_starttls = true;
	else if (!strncasecmp(kw, "AUTH", 4))
		c->ext_auth = true;
}

/* parse complete lines in c->in; returns -1 if c was closed under us */
static int lg_process_input(struct lg_client *c)
{
	size_t pos = 0;
	while (pos < c->inlen) {
		char *start = c->in + pos;
		char *nl = memchr(start, '\n', c->inlen - pos);
		if (!nl)
			break;
		size_t linelen = (size_t)(nl - start);
		pos += linelen + 1;
		if (linelen && start[linelen - 1] == '\r')
			linelen--;
		start[linelen] = '\0';
		if (linelen < 3 || start[0] < '1' || start[0] > '5') {
			lg_error(c, "malformed reply line: %.200s", start);
			lg_client_fail(c);
			return -1;
		}
		int code = (start[0] - '0') * 100 + (start[1] - '0') * 10 + (start[2] - '0');
		if (c->state == LS_EHLO && code == 250 && linelen > 4)
			lg_ehlo_keyword(c, start + 4);
		if (linelen > 3 && start[3] == '-')
			continue;
		unsigned gen = c->gen;
		enum lg_state before = c->state;
		if (lg_reply(c, code, start) < 0 || c->gen != gen)
			return -1;
		if (before == LS_STARTTLS) /* input after STARTTLS's 220 was dropped */
			return 0;
	}
	if (pos) {
		memmove(c->in, c->in + pos, c->inlen - pos);
		c->inlen -= pos;
	}
	if (c->inlen == sizeof(c->in)) {
		lg_error(c, "reply line too long");
		lg_client_fail(c);
		return -1;
	}
	return 0;
}

/* I/O ------------------------------------------------------------------------------------- */

static void lg_client_update_io(struct lg_client *c)
{
	int ev = EV_READ;
	if (c->state == LS_CONNECTING)
		ev = EV_WRITE;
	else if (c->state == LS_HANDSHAKE)
		ev = gnutls_record_get_direction(c->tls) ? EV_WRITE : EV_READ;
	else if (c->out.len || c->tls_pending)
		ev |= EV_WRITE;
	if (ev_is_active(&c->io) && (c->io.events & (EV_READ | EV_WRITE)) == ev)
		return;
	ev_io_stop(loop, &c->io);
	ev_io_set(&c->io, c->fd, ev);
	ev_io_start(loop, &c->io);
}

/* write what is pending; on a fatal error the client is failed (check c->state) */
static void lg_client_flush(struct lg_client *c)
{
	while (c->out.len || c->tls_pending) {
		ssize_t w;
		if (c->tls_on) {
			size_t n = c->tls_pending ? c->tls_pending : (c->out.len > 16384 ? 16384 : c->out.len);
			w = gnutls_record_send(c->tls, c->out.data + c->out.off, n);
			if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED) {
				c->tls_pending = n;
				break;
			}
			c->tls_pending = 0;
			if (w < 0) {
				lg_error(c, "TLS send: %s", gnutls_strerror((int)w));
				lg_client_fail(c);
				return;
			}
		} else {
			w = send(c->fd, c->out.data + c->out.off, c->out.len, MSG_NOSIGNAL);
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					break;
				lg_error(c, "send: %s", strerror(errno));
				lg_client_fail(c);
				return;
			}
		}
		lg_buf_eat(&c->out, (size_t)w);
	}
}

static void lg_do_handshake(struct lg_client *c)
{
	int rc = gnutls_handshake(c->tls);
	if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED)
		return;
	if (rc < 0) {
		lg_error(c, "TLS handshake: %s", gnutls_strerror(rc));
		lg_client_fail(c);
		return;
	}
	c->tls_on = true;
	if (gnutls_session_is_resumed(c->tls))
		lg_resumed++;
	lg_phase_mark(c, LS_HANDSHAKE);
	lg_touch(c);
	if (opt.implicit_tls) {
		c->state = LS_GREETING;
	} else {
		c->ext_pipelining = c->ext_starttls = c->ext_auth = false;
		lg_send(c, "EHLO loadgen.invalid\r\n");
		c->state = LS_EHLO;
	}
}

static void lg_do_read(struct lg_client *c)
{
	for (;;) {
		ssize_t r;
		size_t room = sizeof(c->in) - c->inlen;
		if (c->tls_on) {
			r = gnutls_record_recv(c->tls, c->in + c->inlen, room);
			if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
				return;
			if (r < 0 && c->state == LS_QUIT)
				r = 0; /* closed after 221 without close_notify: fine */
			if (r < 0) {
				lg_error(c, "TLS receive: %s", gnutls_strerror((int)r));
				lg_client_fail(c);
				return;
			}
		} else {
			r = recv(c->fd, c->in + c->inlen, room, 0);
			if (r < 0) {
				if (errno == EAGAIN || errno == EINTR)
					return;
				if (c->state == LS_QUIT)
					r = 0;
			}
			if (r < 0) {
				lg_error(c, "recv: %s", strerror(errno));
				lg_client_fail(c);
				return;
			}
		}
		if (r == 0) {
			if (c->state == LS_QUIT) {
				lg_client_close(c);
				lg_slot_next(c);
			} else {
				lg_error(c, "connection closed by the server");
				lg_client_fail(c);
			}
			return;
		}
		c->inlen += (size_t)r;
		enum lg_state before = c->state;
		if (lg_process_input(c) < 0)
			return;
		if (before == LS_STARTTLS && c->state == LS_HANDSHAKE) {
			lg_do_handshake(c);
			return;
		}
	}
}

static void lg_io_cb(struct ev_loop *l, ev_io *w, int revents)
{
	struct lg_client *c = w->data;
	unsigned gen = c->gen;
	if (c->state == LS_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			lg_error(c, "connect: %s", strerror(err));
			lg_client_fail(c);
			return;
		}
		lg_touch(c);
		lg_phase_mark(c, LS_CONNECTING);
		if (opt.implicit_tls) {
			lg_tls_start(c);
			lg_do_handshake(c);
		} else {
			c->state = LS_GREETING;
		}
	} else if (c->state == LS_HANDSHAKE) {
		lg_do_handshake(c);
	} else {
		if (revents & EV_READ) {
			lg_touch(c);
			lg_do_read(c);
		}
	}
	if (c->gen != gen || c->state == LS_FREE)
		return;
	if (opt.quickack) { /* not sticky: Linux falls back to delayed ACKs, so set it after each read */
		int one = 1;
		setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
	}
	if (c->state == LS_HANDSHAKE && !c->tls_on) {
		lg_client_update_io(c);
		return;
	}
	lg_client_flush(c);
	if (c->gen != gen || c->state == LS_FREE)
		return;
	lg_client_update_io(c);
}

/* setup ----------------------------------------------------------------------------------- */

static void lg_print_phases(void)
{
	printf("PHASES");
	for (int s = LS_FREE; s <= LS_IDLE; s++) {
		struct lg_lat *l = &lg_phase[s];
		if (!l->n)
			continue;
		qsort(l->v, l->n, sizeof(*l->v), lg_cmp_double);
		printf(" %s=%.2f/%.2f", s == LS_FREE ? "start" : lg_strstate((enum lg_state)s), lg_pct(l, 50),
		       lg_pct(l, 99));
	}
	printf(" (ms p50/p99)\n");
}

static void lg_b64(const unsigned char *in, size_t n, char *out, size_t outlen)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t o = 0;
	if ((n + 2) / 3 * 4 + 1 > outlen)
		lg_die("credentials too long");
	for (size_t i = 0; i < n; i += 3) {
		unsigned v = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0) |
			     (i + 2 < n ? in[i + 2] : 0);
		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = i + 1 < n ? tab[v >> 6 & 63] : '=';
		out[o++] = i + 2 < n ? tab[v & 63] : '=';
	}
	out[o] = '\0';
}

static void lg_make_fill(void)
{
	size_t n = opt.size + 2;
	lg_fill = lg_xrealloc(NULL, n);
	for (size_t j = 0; j < n; j++) {
		size_t k = (n - j) % 78;
		lg_fill[j] = k == 2 ? '\r' : k == 1 ? '\n' : (char)('a' + j % 26);
	}
}

static void lg_raise_nofile(long want)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	rlim_t target = rl.rlim_max;
	if (rl.rlim_cur < target) {
		rl.rlim_cur = target;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	getrlimit(RLIMIT_NOFILE, &rl);
	if ((long)rl.rlim_cur < want + 64)
		fprintf(stderr, "loadgen: warning: RLIMIT_NOFILE is %ld, %ld sessions want more\n",
			(long)rl.rlim_cur, want);
}

static void lg_stop_cb(struct ev_loop *l, ev_timer *w, int revents)
{
	ev_break(loop, EVBREAK_ALL);
}

static void lg_signal_cb(struct ev_loop *l, ev_signal *w, int revents)
{
	if (opt.idle > 0 || lg_stopping) {
		ev_break(loop, EVBREAK_ALL);
		return;
	}
	fprintf(stderr, "loadgen: signal %d: finishing the messages in flight\n", w->signum);
	lg_stopping = true;
}

static void lg_usage(int rc)
{
	fprintf(rc ? stderr : stdout,
		"usage: loadgen [options]\n"
		"  --host HOST            server (default 127.0.0.1)\n"
		"  --port PORT            server port (default 587)\n"
		"  --clients N            concurrent sessions (default 1); in --idle mode: sessions set up at once\n"
		"  --messages TOTAL       messages to send in all (default 100 unless --duration)\n"
		"  --duration SECONDS     send for this long instead of a fixed number\n"
		"  --size BYTES           message size including headers (default 4096)\n"
		"  --per-connection K     messages per connection (default 1)\n"
		"  --rate R               open loop: start R connections per second (at most --clients at\n"
		"                         once); a message's latency counts from when it was due\n"
		"  --tls-on-connect       implicit TLS (port 465 style) instead of STARTTLS\n"
		"  --no-tls               plain SMTP (no STARTTLS), e.g. against bench/sink\n"
		"  --user NAME --password PW   AUTH PLAIN with these (no AUTH without --user)\n"
		"  --from ADDR --rcpt ADDR     envelope (from defaults to the user name)\n"
		"  --sni NAME             TLS server name (default: --host unless it is an address)\n"
		"  --timeout SECONDS      per-read timeout (default 30)\n"
		"  --max-errors N         stop starting messages after N errors (default 1000, 0 = never)\n"
		"  --idle N               open N sessions and hold them (see --hold)\n"
		"  --hold SECONDS         idle mode: close after this long (default: until SIGINT/SIGTERM)\n"
		"  --source-addrs N       spread connections over source addresses 127.0.0.1..N\n"
		"  --priority STRING      GnuTLS priority string (default NORMAL)\n"
		"  --no-quickack          leave delayed ACKs on (default: TCP_QUICKACK after every read, so a\n"
		"                         server's Nagle + our delayed ACK cannot add 40 ms stalls)\n"
		"  --phases               also print where a session's time goes: p50/p99 ms of each wait\n"
		"                         (start: due to connect() under --rate; ehlo counts both EHLOs)\n"
		"  --resume               offer each session's ticket again on that client's next connection\n"
		"                         (TLS session resumption: no certificate, no signature)\n"
		"  --samples FILE         one line per message: its start (s since the run began), latency\n"
		"                         and final-dot-to-250 time (ms), to see when the slow ones happened\n");
	exit(rc);
}

static void lg_parse_args(int argc, char **argv)
{
	enum { O_HOST = 256, O_PORT, O_CLIENTS, O_MESSAGES, O_SIZE, O_PERCONN, O_TLSCONN, O_NOTLS, O_USER,
	       O_PASSWORD, O_FROM, O_RCPT, O_DURATION, O_IDLE, O_HOLD, O_SNI, O_TIMEOUT, O_SRC, O_MAXERR,
	       O_PRIO, O_NOQA, O_RATE, O_PHASES, O_SAMPLES, O_RESUME, O_HELP };
	static const struct option lo[] = {
		{ "host", 1, NULL, O_HOST },         { "port", 1, NULL, O_PORT },
		{ "clients", 1, NULL, O_CLIENTS },   { "messages", 1, NULL, O_MESSAGES },
		{ "size", 1, NULL, O_SIZE },         { "per-connection", 1, NULL, O_PERCONN },
		{ "tls-on-connect", 0, NULL, O_TLSCONN }, { "no-tls", 0, NULL, O_NOTLS },
		{ "user", 1, NULL, O_USER },         { "password", 1, NULL, O_PASSWORD },
		{ "from", 1, NULL, O_FROM },         { "rcpt", 1, NULL, O_RCPT },
		{ "duration", 1, NULL, O_DURATION }, { "idle", 1, NULL, O_IDLE },
		{ "hold", 1, NULL, O_HOLD },         { "sni", 1, NULL, O_SNI },
		{ "timeout", 1, NULL, O_TIMEOUT },   { "source-addrs", 1, NULL, O_SRC },
		{ "max-errors", 1, NULL, O_MAXERR }, { "priority", 1, NULL, O_PRIO },
		{ "no-quickack", 0, NULL, O_NOQA },  { "rate", 1, NULL, O_RATE },
		{ "phases", 0, NULL, O_PHASES },     { "samples", 1, NULL, O_SAMPLES },
		{ "resume", 0, NULL, O_RESUME },     { "help", 0, NULL, O_HELP },
		{ NULL, 0, NULL, 0 },
	};
	int ch;
	char *end;
	while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		errno = 0;
		end = NULL;
		switch (ch) {
		case O_HOST: opt.host = optarg; break;
		case O_PORT: opt.port = optarg; break;
		case O_CLIENTS: opt.clients = (int)strtol(optarg, &end, 10); break;
		case O_MESSAGES: opt.messages = strtol(optarg, &end, 10); break;
		case O_SIZE: opt.size = (size_t)strtoul(optarg, &end, 10); break;
		case O_PERCONN: opt.per_conn = (int)strtol(optarg, &end, 10); break;
		case O_TLSCONN: opt.implicit_tls = true; break;
		case O_NOTLS: opt.no_tls = true; break;
		case O_USER: opt.user = optarg; break;
		case O_PASSWORD: opt.password = optarg; break;
		case O_FROM: opt.from = optarg; break;
		case O_RCPT: opt.rcpt = optarg; break;
		case O_DURATION: opt.duration = strtod(optarg, &end); break;
		case O_IDLE: opt.idle = strtol(optarg, &end, 10); break;
		case O_HOLD: opt.hold = strtod(optarg, &end); break;
		case O_SNI: opt.sni = optarg; break;
		case O_TIMEOUT: opt.timeout = strtod(optarg, &end); break;
		case O_SRC: opt.source_addrs = (int)strtol(optarg, &end, 10); break;
		case O_MAXERR: opt.max_errors = strtol(optarg, &end, 10); break;
		case O_PRIO: opt.priority = optarg; break;
		case O_NOQA: opt.quickack = false; break;
		case O_RATE: opt.rate = strtod(optarg, &end); break;
		case O_PHASES: opt.phases = true; break;
		case O_SAMPLES: opt.samples = optarg; break;
		case O_RESUME: opt.resume = true; break;
		case O_HELP: case 'h': lg_usage(0); break;
		default: lg_usage(1);
		}
		if (end && (*end || errno))
			lg_die("bad number \"%s\"", optarg);
	}
	if (optind != argc)
		lg_usage(1);
	if (opt.clients < 1 || opt.per_conn < 1 || opt.size < 64 || opt.size > (64u << 20) || opt.timeout <= 0 ||
	    opt.source_addrs < 1 || opt.source_addrs > 254 || opt.idle < 0 || opt.max_errors < 0 ||
	    opt.rate < 0)
		lg_die("option out of range (clients>=1, per-connection>=1, 64<=size<=64M, source-addrs 1..254)");
	if (opt.implicit_tls && opt.no_tls)
		lg_die("--tls-on-connect and --no-tls exclude each other");
	if (opt.user && !opt.password)
		lg_die("--user needs --password");
	if (opt.messages < 0 && opt.duration <= 0)
		opt.messages = 100;
	if (opt.messages >= 0 && opt.duration > 0)
		lg_die("give --messages or --duration, not both");
	if (!opt.from)
		opt.from = opt.user && strchr(opt.user, '@') ? opt.user : "loadgen@example.org";
}

static void lg_resolve(void)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
	int rc = getaddrinfo(opt.host, opt.port, &hints, &res);
	if (rc)
		lg_die("%s:%s: %s", opt.host, opt.port, gai_strerror(rc));
	memcpy(&lg_addr, res->ai_addr, res->ai_addrlen);
	lg_addrlen = res->ai_addrlen;
	freeaddrinfo(res);
	struct in6_addr a6;
	struct in_addr a4;
	if (!opt.sni && inet_pton(AF_INET, opt.host, &a4) != 1 && inet_pton(AF_INET6, opt.host, &a6) != 1)
		opt.sni = opt.host;
	if (opt.source_addrs > 1 && lg_addr.ss_family != AF_INET)
		lg_die("--source-addrs needs an IPv4 server address");
}

int main(int argc, char **argv)
{
	lg_parse_args(argc, argv);
	lg_resolve();
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	lg_raise_nofile(opt.idle > 0 ? opt.idle : opt.clients);

	int rc = gnutls_global_init();
	if (rc < 0)
		lg_die("gnutls_global_init: %s", gnutls_strerror(rc));
	if ((rc = gnutls_certificate_allocate_credentials(&lg_cred)) < 0 ||
	    (rc = gnutls_priority_init(&lg_prio, opt.priority, NULL)) < 0)
		lg_die("gnutls: %s", gnutls_strerror(rc));

	if (opt.user) {
		unsigned char raw[768];
		size_t ul = strlen(opt.user), pl = strlen(opt.password);
		if (ul + pl + 2 > sizeof(raw))
			lg_die("user or password too long");
		raw[0] = '\0';
		memcpy(raw + 1, opt.user, ul);
		raw[1 + ul] = '\0';
		memcpy(raw + 2 + ul, opt.password, pl);
		lg_b64(raw, ul + pl + 2, lg_auth_b64, sizeof(lg_auth_b64));
	}
	time_t t = time(NULL);
	struct tm tm;
	gmtime_r(&t, &tm);
	strftime(lg_date, sizeof(lg_date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
	lg_make_fill();

	loop = ev_default_loop(EVFLAG_AUTO);
	ev_signal_init(&lg_sigint, lg_signal_cb, SIGINT);
	ev_signal_init(&lg_sigterm, lg_signal_cb, SIGTERM);
	ev_signal_start(loop, &lg_sigint);
	ev_signal_start(loop, &lg_sigterm);
	ev_timer_init(&lg_stop_timer, lg_stop_cb, 0., 0.);
	if (opt.rate > 0) {
		lg_pace_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
		if (lg_pace_fd < 0)
			lg_die("timerfd_create: %s", strerror(errno));
		ev_io_init(&lg_pace_io, lg_pace_cb, lg_pace_fd, EV_READ);
		ev_io_start(loop, &lg_pace_io);
	}

	lg_nslots = opt.idle > 0 ? (int)opt.idle : opt.clients;
	lg_clients = calloc((size_t)lg_nslots, sizeof(*lg_clients));
	if (!lg_clients)
		lg_die("out of memory");
	for (int i = 0; i < lg_nslots; i++) {
		struct lg_client *c = &lg_clients[i];
		c->id = i;
		c->fd = -1;
		ev_init(&c->io, lg_io_cb);
		c->io.data = c;
		ev_init(&c->timer, lg_timer_cb);
		c->timer.data = c;
	}
	if (opt.samples && !(lg_samples = fopen(opt.samples, "w")))
		lg_die("%s: %s", opt.samples, strerror(errno));
	lg_t0 = lg_now();
	lg_deadline = lg_t0 + opt.duration;
	if (opt.idle > 0)
		lg_slot_next(NULL);
	else
		for (int i = 0; i < lg_nslots; i++)
			lg_slot_next(&lg_clients[i]);
	ev_run(loop, 0);

	if (opt.idle > 0) {
		if (lg_t_end == 0)
			printf("loadgen: interrupted with %ld of %ld sessions established\n", lg_established, opt.idle);
		printf("loadgen: closing %ld sessions (dropped by the server while idle: %ld)\n", lg_established,
		       lg_dropped);
		printf("RESULT idle=%ld established=%ld errors=%ld dropped=%ld\n", opt.idle, lg_established,
		       lg_errors, lg_dropped);
		for (int i = 0; i < lg_nslots; i++)
			if (lg_clients[i].state != LS_FREE)
				lg_client_close(&lg_clients[i]);
		return lg_errors ? 1 : 0;
	}
	if (lg_t_end == 0)
		lg_t_end = lg_now();
	double elapsed = lg_t_end - lg_t0;
	for (size_t i = 0; lg_samples && i < lg_starts.n; i++) /* recorded together, so in step */
		fprintf(lg_samples, "%.6f %.3f %.3f\n", lg_starts.v[i], lg_lat.v[i], lg_dlat.v[i]);
	qsort(lg_lat.v, lg_lat.n, sizeof(*lg_lat.v), lg_cmp_double);
	qsort(lg_dlat.v, lg_dlat.n, sizeof(*lg_dlat.v), lg_cmp_double);
	double rate = elapsed > 0 ? (double)lg_ok / elapsed : 0;
	const struct lg_lat *l = &lg_lat, *d = &lg_dlat;
	printf("loadgen: %s%s, %d clients, %d per connection, %zu bytes: %ld ok, %ld failed, %ld errors, "
	       "%ld connections in %.2f s\n",
	       opt.no_tls ? "plain" : opt.implicit_tls ? "implicit TLS" : "STARTTLS", opt.user ? " + AUTH PLAIN" : "",
	       opt.clients, opt.per_conn, opt.size, lg_ok, lg_failed, lg_errors, lg_connects, elapsed);
	printf("loadgen: %.1f msgs/s; latency ms p50 %.2f p90 %.2f p99 %.2f max %.2f\n", rate, lg_pct(l, 50),
	       lg_pct(l, 90), lg_pct(l, 99), lg_pct(l, 100));
	printf("loadgen: final dot to 250 ms p50 %.2f p90 %.2f p99 %.2f max %.2f\n", lg_pct(d, 50), lg_pct(d, 90),
	       lg_pct(d, 99), lg_pct(d, 100));
	printf("RESULT clients=%d msgs=%ld rate=%.1f p50=%.2f p90=%.2f p99=%.2f max=%.2f errors=%ld elapsed=%.2f "
	       "dot_p50=%.2f dot_p99=%.2f offered=%.1f resumed=%ld\n",
	       opt.clients, lg_ok, rate, lg_pct(l, 50), lg_pct(l, 90), lg_pct(l, 99), lg_pct(l, 100), lg_errors,
	       elapsed, lg_pct(d, 50), lg_pct(d, 99), opt.rate, lg_resumed);
	if (opt.phases)
		lg_print_phases();
	if (lg_samples && fclose(lg_samples) != 0)
		lg_die("%s: %s", opt.samples, strerror(errno));
	for (int i = 0; i < lg_nslots; i++)
		gnutls_free(lg_clients[i].resume.data);
	gnutls_priority_deinit(lg_prio);
	gnutls_certificate_free_credentials(lg_cred);
	gnutls_global_deinit();
	return lg_errors ? 1 : 0;
}
