/*
 * metrics - Prometheus scrape endpoint.
 * Invariants: a request is read up to 4 KiB and 5 s; anything else gets 400/404; the
 * response is written whole and the connection closed. Never blocks the loop. At most
 * METRICS_CLIENTS_MAX scrapers at once (more are closed at once), and an accept error such
 * as EMFILE pauses accepting for a second instead of spinning the loop.
 */
#include "metrics.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "config.h"
#include "log.h"
#include "stats.h"

#define METRICS_REQ_MAX 4096
#define METRICS_CLIENTS_MAX 16

struct metrics_client {
	int fd;
	ev_io io;
	ev_timer timer;
	struct buf in;
	struct buf out;
	size_t sent;
};

static struct ev_loop *metrics_loop;
static int metrics_fd = -1;
static ev_io metrics_accept_io;
static ev_timer metrics_pause;
static unsigned metrics_clients;

static void metrics_client_free(struct metrics_client *m)
{
	ev_io_stop(metrics_loop, &m->io);
	ev_timer_stop(metrics_loop, &m->timer);
	close(m->fd);
	buf_free(&m->in);
	buf_free(&m->out);
	free(m);
	metrics_clients--;
}

static void metrics_respond(struct metrics_client *m)
{
	struct buf body = { 0 };
	const char *status = "200 OK";
	if (!strncmp(m->in.data, "GET /metrics ", 13) || !strncmp(m->in.data, "GET / ", 6)) {
		stats_render(&body, true);
	} else if (strncmp(m->in.data, "GET ", 4)) {
		status = "405 Method Not Allowed";
		buf_printf(&body, "only GET\n");
	} else {
		status = "404 Not Found";
		buf_printf(&body, "try /metrics\n");
	}
	buf_printf(&m->out, "HTTP/1.0 %s\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %zu\r\n"
		   "Connection: close\r\n\r\n", status, body.len);
	buf_append(&m->out, body.data ? body.data : "", body.len);
	buf_free(&body);
	ev_io_stop(metrics_loop, &m->io);
	ev_io_set(&m->io, m->fd, EV_WRITE);
	ev_io_start(metrics_loop, &m->io);
}

static void metrics_client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct metrics_client *m = w->data;
	(void)loop;
	if (revents & EV_WRITE) {
		ssize_t n = send(m->fd, m->out.data + m->sent, m->out.len - m->sent, MSG_NOSIGNAL);
		if (n > 0)
			m->sent += (size_t)n;
		if ((n < 0 && errno != EAGAIN && errno != EINTR) || m->sent == m->out.len)
			metrics_client_free(m);
		return;
	}
	char chunk[1024];
	ssize_t n = recv(m->fd, chunk, sizeof(chunk), 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0 || m->in.len + (size_t)n > METRICS_REQ_MAX) {
		metrics_client_free(m);
		return;
	}
	if (buf_append(&m->in, chunk, (size_t)n) < 0) {
		metrics_client_free(m);
		return;
	}
	if (strstr(m->in.data, "\r\n\r\n") || strstr(m->in.data, "\n\n"))
		metrics_respond(m);
}

static void metrics_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	metrics_client_free(w->data);
}

static void metrics_resume(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w; (void)revents;
	ev_io_start(loop, &metrics_accept_io);
}

static void metrics_accept(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)w; (void)revents;
	int fd = accept4(metrics_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
			return;
		log_warn("metrics event=accept-failed error=\"%s\"", strerror(errno));
		ev_io_stop(loop, &metrics_accept_io); /* EMFILE and friends: the socket stays readable */
		ev_timer_set(&metrics_pause, 1., 0.);
		ev_timer_start(loop, &metrics_pause);
		return;
	}
	struct metrics_client *m = metrics_clients < METRICS_CLIENTS_MAX ? calloc(1, sizeof(*m)) : NULL;
	if (!m) {
		close(fd);
		return;
	}
	metrics_clients++;
	m->fd = fd;
	ev_io_init(&m->io, metrics_client_cb, fd, EV_READ);
	m->io.data = m;
	ev_timer_init(&m->timer, metrics_timeout, 5., 0.);
	m->timer.data = m;
	ev_io_start(loop, &m->io);
	ev_timer_start(loop, &m->timer);
}

/* metrics_init - listen for scrapes */
int metrics_init(struct ev_loop *loop, const char *host, const char *port, char *err, size_t errlen)
{
	struct addrinfo hints = { .ai_flags = AI_PASSIVE, .ai_socktype = SOCK_STREAM }, *res;
	int rc = getaddrinfo(host, port, &hints, &res);
	if (rc) {
		snprintf(err, errlen, "metrics: cannot resolve %s: %s", host, gai_strerror(rc));
		return -1;
	}
	metrics_fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;
	if (metrics_fd >= 0)
		setsockopt(metrics_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (metrics_fd < 0 || bind(metrics_fd, res->ai_addr, res->ai_addrlen) < 0 || listen(metrics_fd, 64) < 0) {
		snprintf(err, errlen, "metrics: cannot listen on %s:%s: %s", host, port, strerror(errno));
		freeaddrinfo(res);
		if (metrics_fd >= 0)
			close(metrics_fd);
		metrics_fd = -1;
		return -1;
	}
	freeaddrinfo(res);
	metrics_loop = loop;
	ev_io_init(&metrics_accept_io, metrics_accept, metrics_fd, EV_READ);
	ev_io_start(loop, &metrics_accept_io);
	ev_init(&metrics_pause, metrics_resume);
	char name[300];
	config_hostport_str(host, port, name, sizeof(name));
	log_info("metrics event=listening address=%s", name);
	return 0;
}

/* metrics_shutdown - stop serving */
void metrics_shutdown(void)
{
	if (metrics_fd < 0)
		return;
	ev_io_stop(metrics_loop, &metrics_accept_io);
	ev_timer_stop(metrics_loop, &metrics_pause);
	close(metrics_fd);
	metrics_fd = -1;
}
