/*
 * listener - listening sockets.
 * Each `listen` line may resolve to several addresses (a name such as localhost); each
 * gets its own socket. IPv6 sockets are IPV6_V6ONLY so [::] and 0.0.0.0 can both be bound.
 * Accept errors such as EMFILE pause accepting for a moment instead of spinning.
 */
#include "listener.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "smtp_server.h"

#define LISTENER_MAX 64

struct listener {
	int fd;
	enum listen_mode mode;
	ev_io io;
	ev_timer pause;
	char name[300];
};

static struct listener listeners[LISTENER_MAX];
static int nlisteners;

static int listener_bind_one(const struct listen_cfg *l, struct addrinfo *ai, char *err, size_t errlen)
{
	if (nlisteners == LISTENER_MAX) {
		snprintf(err, errlen, "too many listening sockets");
		return -1;
	}
	char name[sizeof(listeners[0].name)];
	config_hostport_str(l->host, l->port, name, sizeof(name));
	int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
	if (fd < 0) {
		snprintf(err, errlen, "socket for %s: %s", name, strerror(errno));
		return -1;
	}
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ai->ai_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 1024) < 0) {
		snprintf(err, errlen, "cannot listen on %s: %s", name, strerror(errno));
		close(fd);
		return -1;
	}
	struct listener *L = &listeners[nlisteners++];
	L->fd = fd;
	L->mode = l->mode;
	snprintf(L->name, sizeof(L->name), "%s", name);
	return 0;
}

/* listener_bind_all - bind every listen line */
int listener_bind_all(const struct config *cfg, char *err, size_t errlen)
{
	for (int i = 0; i < cfg->nlisten; i++) {
		const struct listen_cfg *l = &cfg->listen[i];
		struct addrinfo hints = { .ai_flags = AI_PASSIVE, .ai_socktype = SOCK_STREAM };
		struct addrinfo *res;
		int rc = getaddrinfo(l->host, l->port, &hints, &res);
		if (rc != 0) {
			snprintf(err, errlen, "%s:%d: cannot resolve %s: %s", cfg->path, l->line, l->host, gai_strerror(rc));
			return -1;
		}
		for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
			if (listener_bind_one(l, ai, err, errlen) < 0) {
				freeaddrinfo(res);
				return -1;
			}
		}
		freeaddrinfo(res);
	}
	return 0;
}

static void listener_resume(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct listener *L = w->data;
	(void)revents;
	ev_io_start(loop, &L->io);
}

static void listener_accept(struct ev_loop *loop, ev_io *w, int revents)
{
	struct listener *L = w->data;
	(void)revents;
	for (int i = 0; i < 64; i++) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		int fd = accept4(L->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
				return;
			log_warn("listener event=accept-failed listen=%s error=\"%s\"", L->name, strerror(errno));
			ev_io_stop(loop, &L->io); /* EMFILE and friends: back off for a second */
			ev_timer_set(&L->pause, 1., 0.);
			ev_timer_start(loop, &L->pause);
			return;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		smtp_server_accept(fd, (struct sockaddr *)&ss, sl, L->mode);
	}
}

/* listener_start - accept on the loop */
void listener_start(struct ev_loop *loop)
{
	for (int i = 0; i < nlisteners; i++) {
		struct listener *L = &listeners[i];
		ev_io_init(&L->io, listener_accept, L->fd, EV_READ);
		L->io.data = L;
		ev_init(&L->pause, listener_resume);
		L->pause.data = L;
		ev_io_start(loop, &L->io);
		log_info("listener event=listening address=%s mode=%s", L->name, config_listen_mode_str(L->mode));
	}
}

/* listener_stop - close the listening sockets */
void listener_stop(struct ev_loop *loop)
{
	for (int i = 0; i < nlisteners; i++) {
		ev_io_stop(loop, &listeners[i].io);
		ev_timer_stop(loop, &listeners[i].pause);
		close(listeners[i].fd);
	}
	nlisteners = 0;
}
