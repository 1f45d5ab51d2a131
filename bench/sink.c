/*
 * sink - counting upstream SMTP server for relayd's benchmarks (libev, optional GnuTLS).
 *
 * Answers 220, a short EHLO (PIPELINING, 8BITMIME, SIZE, SMTPUTF8), 354 to DATA, 221 to
 * QUIT, 235 to AUTH and 250 to everything else; it keeps nothing. Commands are read in
 * batches, so a PIPELINING client (RFC 2920) gets all its replies in one write. The DATA
 * terminator "<CRLF>.<CRLF>" (RFC 5321 §4.1.1.4) is found by a five-state scanner that works
 * across reads. With --implicit-tls the whole session runs inside TLS from the first byte.
 *
 * Counts messages (final dots answered 250), body bytes and connections; prints
 *   SINK messages=N bytes=N connections=N
 * on SIGUSR1 and at exit (SIGTERM, SIGINT).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>
#include <gnutls/gnutls.h>

#define SINK_INBUF 65536
#define SINK_MAXLINE 4096

struct sink_conn {
	int fd;
	ev_io io;
	gnutls_session_t tls;
	bool handshaking;
	size_t tls_pending;       /* size of a gnutls_record_send that returned EAGAIN */
	bool in_data;
	int ds;                   /* bytes of "\r\n.\r\n" matched */
	unsigned long long data_bytes;
	bool quitting;            /* close once the output is written */
	char line[SINK_MAXLINE];  /* command line being assembled */
	size_t linelen;
	bool line_overflow;
	char *out;
	size_t outoff, outlen, outcap;
};

static struct ev_loop *loop;
static const char *sink_hostname = "sink.invalid";
static gnutls_certificate_credentials_t sink_cred;
static gnutls_priority_t sink_prio;
static unsigned long long sink_msgs, sink_bytes, sink_conns;
static char sink_ehlo[512];
static size_t sink_ehlo_len;

static void sink_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void sink_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("sink: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static void sink_report(void)
{
	printf("SINK messages=%llu bytes=%llu connections=%llu\n", sink_msgs, sink_bytes, sink_conns);
	fflush(stdout);
}

static void sink_out(struct sink_conn *c, const char *p, size_t n)
{
	if (c->outoff + c->outlen + n > c->outcap) {
		if (c->outoff) {
			memmove(c->out, c->out + c->outoff, c->outlen);
			c->outoff = 0;
		}
		if (c->outlen + n > c->outcap) {
			size_t cap = c->outcap ? c->outcap * 2 : 1024;
			while (cap < c->outlen + n)
				cap *= 2;
			char *q = realloc(c->out, cap);
			if (!q)
				sink_die("out of memory");
			c->out = q;
			c->outcap = cap;
		}
	}
	memcpy(c->out + c->outoff + c->outlen, p, n);
	c->outlen += n;
}

#define SINK_REPLY(c, lit) sink_out((c), lit, sizeof(lit) - 1)

static void sink_close(struct sink_conn *c)
{
	ev_io_stop(loop, &c->io);
	if (c->tls)
		gnutls_deinit(c->tls);
	close(c->fd);
	free(c->out);
	free(c);
}

/* one command line (CRLF stripped) */
static void sink_command(struct sink_conn *c, const char *l, size_t n)
{
	if (n >= 4 && (!strncasecmp(l, "EHLO", 4))) {
		sink_out(c, sink_ehlo, sink_ehlo_len);
	} else if (n >= 4 && !strncasecmp(l, "DATA", 4)) {
		c->in_data = true;
		c->ds = 2; /* the DATA line's CRLF counts: an empty body ends with ".\r\n" */
		c->data_bytes = 0;
		SINK_REPLY(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
	} else if (n >= 4 && !strncasecmp(l, "QUIT", 4)) {
		SINK_REPLY(c, "221 2.0.0 Bye\r\n");
		c->quitting = true;
	} else if (n >= 4 && !strncasecmp(l, "AUTH", 4)) {
		SINK_REPLY(c, "235 2.7.0 Authentication successful\r\n");
	} else if (n >= 8 && !strncasecmp(l, "STARTTLS", 8)) {
		SINK_REPLY(c, "454 4.7.0 TLS not available\r\n");
	} else {
		SINK_REPLY(c, "250 2.0.0 OK\r\n");
	}
}

/* DATA bytes: find the end; returns how many bytes of p belong to the message */
static size_t sink_data(struct sink_conn *c, const char *p, size_t n)
{
	static const char end[] = "\r\n.\r\n";
	size_t i = 0;
	while (i < n) {
		if (c->ds == 0) {
			const char *cr = memchr(p + i, '\r', n - i);
			if (!cr) {
				i = n;
				break;
			}
			i = (size_t)(cr - p) + 1;
			c->ds = 1;
			continue;
		}
		char b = p[i++];
		if (b == end[c->ds]) {
			if (++c->ds == 5) {
				c->in_data = false;
				c->ds = 0;
				c->data_bytes += i;
				sink_msgs++;
				sink_bytes += c->data_bytes >= 3 ? c->data_bytes - 3 : 0;
				SINK_REPLY(c, "250 2.0.0 Ok: queued\r\n");
				return i;
			}
		} else {
			c->ds = b == '\r' ? 1 : 0;
		}
	}
	c->data_bytes += n;
	return n;
}

static void sink_input(struct sink_conn *c, const char *p, size_t n)
{
	while (n && !c->quitting) {
		if (c->in_data) {
			size_t used = sink_data(c, p, n);
			p += used;
			n -= used;
			continue;
		}
		const char *nl = memchr(p, '\n', n);
		size_t take = nl ? (size_t)(nl - p) + 1 : n;
		if (c->linelen + take > sizeof(c->line)) {
			c->line_overflow = true;
			c->linelen = 0;
		} else {
			memcpy(c->line + c->linelen, p, take);
			c->linelen += take;
		}
		p += take;
		n -= take;
		if (!nl)
			continue;
		if (c->line_overflow) {
			SINK_REPLY(c, "500 5.5.2 Line too long\r\n");
			c->line_overflow = false;
		} else {
			size_t l = c->linelen - 1;
			if (l && c->line[l - 1] == '\r')
				l--;
			sink_command(c, c->line, l);
		}
		c->linelen = 0;
	}
}

static void sink_update_io(struct sink_conn *c)
{
	int ev = EV_READ;
	if (c->handshaking)
		ev = gnutls_record_get_direction(c->tls) ? EV_WRITE : EV_READ;
	else if (c->outlen || c->tls_pending)
		ev |= EV_WRITE;
	if ((c->io.events & (EV_READ | EV_WRITE)) == ev)
		return;
	ev_io_stop(loop, &c->io);
	ev_io_set(&c->io, c->fd, ev);
	ev_io_start(loop, &c->io);
}

/* write what is pending; returns -1 on a fatal error */
static int sink_flush(struct sink_conn *c)
{
	while (c->outlen || c->tls_pending) {
		ssize_t w;
		if (c->tls) {
			size_t n = c->tls_pending ? c->tls_pending : c->outlen > 16384 ? 16384 : c->outlen;
			w = gnutls_record_send(c->tls, c->out + c->outoff, n);
			if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED) {
				c->tls_pending = n;
				return 0;
			}
			c->tls_pending = 0;
			if (w < 0)
				return -1;
		} else {
			w = send(c->fd, c->out + c->outoff, c->outlen, MSG_NOSIGNAL);
			if (w < 0)
				return errno == EAGAIN || errno == EINTR ? 0 : -1;
		}
		c->outoff += (size_t)w;
		c->outlen -= (size_t)w;
	}
	c->outoff = 0;
	return 0;
}

static void sink_conn_cb(struct ev_loop *l, ev_io *w, int revents)
{
	struct sink_conn *c = w->data;
	if (c->handshaking) {
		int rc = gnutls_handshake(c->tls);
		if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
			sink_update_io(c);
			return;
		}
		if (rc < 0) {
			sink_close(c);
			return;
		}
		c->handshaking = false;
		SINK_REPLY(c, "220 sink ESMTP\r\n");
	} else if (revents & EV_READ) {
		static char buf[SINK_INBUF];
		for (int rounds = 0; (rounds < 16 || (c->tls && gnutls_record_check_pending(c->tls))) && !c->quitting; rounds++) {
			ssize_t r;
			if (c->tls) {
				r = gnutls_record_recv(c->tls, buf, sizeof(buf));
				if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
					break;
			} else {
				r = recv(c->fd, buf, sizeof(buf), 0);
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					break;
			}
			if (r <= 0) {
				sink_close(c);
				return;
			}
			sink_input(c, buf, (size_t)r);
			if (!c->tls && (size_t)r < sizeof(buf))
				break; /* drained: skip the EAGAIN round trip */
		}
	}
	if (sink_flush(c) < 0 || (c->quitting && !c->outlen && !c->tls_pending)) {
		sink_close(c);
		return;
	}
	sink_update_io(c);
}

static void sink_accept_cb(struct ev_loop *l, ev_io *w, int revents)
{
	for (;;) {
		int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
				fprintf(stderr, "sink: accept: %s\n", strerror(errno));
			return;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		struct sink_conn *c = calloc(1, sizeof(*c));
		if (!c)
			sink_die("out of memory");
		c->fd = fd;
		sink_conns++;
		ev_io_init(&c->io, sink_conn_cb, fd, EV_READ);
		c->io.data = c;
		if (sink_cred) {
			if (gnutls_init(&c->tls, GNUTLS_SERVER | GNUTLS_NONBLOCK) < 0)
				sink_die("gnutls_init failed");
			gnutls_priority_set(c->tls, sink_prio);
			gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, sink_cred);
			gnutls_transport_set_int(c->tls, fd);
			c->handshaking = true;
			ev_io_start(loop, &c->io);
			sink_conn_cb(loop, &c->io, 0);
			continue;
		}
		SINK_REPLY(c, "220 sink ESMTP\r\n");
		if (sink_flush(c) < 0) {
			sink_close(c);
			continue;
		}
		ev_io_start(loop, &c->io);
	}
}

static void sink_usr1_cb(struct ev_loop *l, ev_signal *w, int revents)
{
	sink_report();
}

static void sink_stop_cb(struct ev_loop *l, ev_signal *w, int revents)
{
	ev_break(loop, EVBREAK_ALL);
}

static void sink_usage(int rc)
{
	fprintf(rc ? stderr : stdout,
		"usage: sink [--listen HOST:PORT] [--port-file FILE] [--implicit-tls --tls-cert FILE --tls-key FILE]\n"
		"            [--hostname NAME]\n"
		"  answers 250 to everything; SIGUSR1 prints the counts, SIGTERM/SIGINT prints them and exits\n");
	exit(rc);
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "listen", 1, NULL, 'l' },   { "port-file", 1, NULL, 'p' }, { "implicit-tls", 0, NULL, 'i' },
		{ "tls-cert", 1, NULL, 'c' }, { "tls-key", 1, NULL, 'k' },   { "hostname", 1, NULL, 'H' },
		{ "help", 0, NULL, 'h' },     { NULL, 0, NULL, 0 },
	};
	const char *listen_at = "127.0.0.1:0", *port_file = NULL, *cert = NULL, *key = NULL;
	bool implicit = false;
	int ch;
	while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (ch) {
		case 'l': listen_at = optarg; break;
		case 'p': port_file = optarg; break;
		case 'i': implicit = true; break;
		case 'c': cert = optarg; break;
		case 'k': key = optarg; break;
		case 'H': sink_hostname = optarg; break;
		case 'h': sink_usage(0); break;
		default: sink_usage(1);
		}
	}
	if (optind != argc || (implicit && (!cert || !key)))
		sink_usage(1);

	char host[256];
	const char *colon = strrchr(listen_at, ':');
	if (!colon || (size_t)(colon - listen_at) >= sizeof(host))
		sink_die("expected --listen HOST:PORT, got \"%s\"", listen_at);
	memcpy(host, listen_at, (size_t)(colon - listen_at));
	host[colon - listen_at] = '\0';
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *res;
	int rc = getaddrinfo(host, colon + 1, &hints, &res);
	if (rc)
		sink_die("%s: %s", listen_at, gai_strerror(rc));
	int lfd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;
	if (lfd < 0)
		sink_die("socket: %s", strerror(errno));
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, res->ai_addr, res->ai_addrlen) < 0 || listen(lfd, 4096) < 0)
		sink_die("%s: %s", listen_at, strerror(errno));
	freeaddrinfo(res);
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	getsockname(lfd, (struct sockaddr *)&ss, &sl);
	int port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						   : ((struct sockaddr_in *)&ss)->sin_port);

	if (implicit) {
		if ((rc = gnutls_global_init()) < 0 || (rc = gnutls_certificate_allocate_credentials(&sink_cred)) < 0 ||
		    (rc = gnutls_certificate_set_x509_key_file(sink_cred, cert, key, GNUTLS_X509_FMT_PEM)) < 0 ||
		    (rc = gnutls_priority_init(&sink_prio, "NORMAL", NULL)) < 0)
			sink_die("TLS setup (%s, %s): %s", cert, key, gnutls_strerror(rc));
	}
	int n = snprintf(sink_ehlo, sizeof(sink_ehlo),
			 "250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250-ENHANCEDSTATUSCODES\r\n"
			 "250 SMTPUTF8\r\n",
			 sink_hostname);
	if (n < 0 || (size_t)n >= sizeof(sink_ehlo))
		sink_die("hostname too long");
	sink_ehlo_len = (size_t)n;

	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	signal(SIGPIPE, SIG_IGN);

	loop = ev_default_loop(EVFLAG_AUTO);
	ev_io lio;
	ev_signal susr1, sterm, sint;
	ev_io_init(&lio, sink_accept_cb, lfd, EV_READ);
	ev_io_start(loop, &lio);
	ev_signal_init(&susr1, sink_usr1_cb, SIGUSR1);
	ev_signal_init(&sterm, sink_stop_cb, SIGTERM);
	ev_signal_init(&sint, sink_stop_cb, SIGINT);
	ev_signal_start(loop, &susr1);
	ev_signal_start(loop, &sterm);
	ev_signal_start(loop, &sint);

	if (port_file) {
		char tmp[4096];
		if (snprintf(tmp, sizeof(tmp), "%s.tmp", port_file) >= (int)sizeof(tmp))
			sink_die("port file name too long");
		FILE *f = fopen(tmp, "w");
		if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) != 0 || rename(tmp, port_file) < 0)
			sink_die("%s: %s", port_file, strerror(errno));
	}
	printf("sink: listening on %s port %d%s\n", host, port, implicit ? " (implicit TLS)" : "");
	fflush(stdout);
	ev_run(loop, 0);
	sink_report();
	return 0;
}
