/*
 * control - the unix control socket: one request line in, "OK\n"+body or "ERR msg\n" out,
 * then close. relayctl is the client (queue flush, queue delete, stats, ...).
 *
 * Invariants: nothing here blocks the loop (non-blocking sockets, a bounded request line
 * of CONTROL_LINE_MAX bytes, CONTROL_TIMEOUT seconds per client, at most
 * CONTROL_MAX_CLIENTS at once; more are closed at accept). Only root and relayd's own
 * effective uid may talk to it (SO_PEERCRED), on top of the socket's mode 0600. A stale
 * socket file is replaced, a live one (some process answers) or a non-socket is not.
 * Each client's watchers live in its struct and find it again through their data pointer.
 */
#include "control.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

struct control_client {
	int fd;
	ev_io io;
	ev_timer timer;
	char in[CONTROL_LINE_MAX];
	size_t inlen;
	struct buf out;
	size_t outoff;
	struct control_client *next;
	struct control_client *prev;
};

struct control_command {
	char name[CONTROL_NAME_MAX];
	control_handler handler;
};

static int control_ping(const char *args, struct buf *out);

static struct ev_loop *control_loop;
static int control_fd = -1;
static ev_io control_accept_io;
static char control_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static struct control_client *control_clients;
static int control_nclients;
static struct control_command control_commands[CONTROL_MAX_COMMANDS] = {
	{ "ping", control_ping },
};
static int control_ncommands = 1;

static int control_ping(const char *args, struct buf *out)
{
	(void)args;
	return buf_printf(out, "pong\n");
}

/* control_register - add (or replace) a command */
void control_register(const char *command, control_handler h)
{
	int i;

	if (!command || !*command || strlen(command) >= CONTROL_NAME_MAX || strchr(command, ' '))
		fatal("control: bad command name %s", command ? command : "(null)");
	for (i = 0; i < control_ncommands; i++) {
		if (strcmp(control_commands[i].name, command) == 0) {
			control_commands[i].handler = h;
			return;
		}
	}
	if (control_ncommands == CONTROL_MAX_COMMANDS)
		fatal("control: more than %d commands", CONTROL_MAX_COMMANDS);
	strcpy(control_commands[control_ncommands].name, command);
	control_commands[control_ncommands].handler = h;
	control_ncommands++;
}

static control_handler control_lookup(const char *name)
{
	int i;

	for (i = 0; i < control_ncommands; i++)
		if (strcmp(control_commands[i].name, name) == 0)
			return control_commands[i].handler;
	return NULL;
}

static void control_client_free(struct control_client *c)
{
	ev_io_stop(control_loop, &c->io);
	ev_timer_stop(control_loop, &c->timer);
	close(c->fd);
	buf_free(&c->out);
	if (c->prev)
		c->prev->next = c->next;
	else
		control_clients = c->next;
	if (c->next)
		c->next->prev = c->prev;
	control_nclients--;
	free(c);
}

/* write what is left of the reply; frees the client when done or on error */
static void control_client_flush(struct control_client *c)
{
	while (c->outoff < c->out.len) {
		ssize_t n = send(c->fd, c->out.data + c->outoff, c->out.len - c->outoff,
		    MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (!(c->io.events & EV_WRITE)) {
				ev_io_stop(control_loop, &c->io);
				ev_io_set(&c->io, c->fd, EV_WRITE);
				ev_io_start(control_loop, &c->io);
			}
			return;
		}
		if (n <= 0) {
			log_debug("control event=write-failed error=\"%s\"", strerror(errno));
			break;
		}
		c->outoff += (size_t)n;
	}
	control_client_free(c);
}

/* the reply "ERR <first line of msg, control characters blanked>\n" */
static void control_reply_err(struct control_client *c, const char *msg)
{
	size_t i, n = strcspn(msg, "\r\n");

	buf_reset(&c->out);
	if (n == 0) {
		msg = "failed";
		n = strlen(msg);
	}
	if (buf_append(&c->out, "ERR ", 4) < 0 || buf_append(&c->out, msg, n) < 0 ||
	    buf_append(&c->out, "\n", 1) < 0) {
		control_client_free(c);
		return;
	}
	for (i = 4; i < c->out.len - 1; i++)
		if ((unsigned char)c->out.data[i] < ' ' || c->out.data[i] == 0x7f)
			c->out.data[i] = ' ';
	control_client_flush(c);
}

static bool control_line_ok(const char *line, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if ((unsigned char)line[i] < ' ' || line[i] == 0x7f)
			return false;
	return true;
}

/* one complete request line (without its newline): run the command and reply */
static void control_dispatch(struct control_client *c, char *line, size_t len)
{
	struct buf body = { 0 };
	control_handler h;
	const char *args;
	char *sp;
	int rc;

	if (len > 0 && line[len - 1] == '\r')
		line[--len] = '\0';
	if (!control_line_ok(line, len)) {
		control_reply_err(c, "bad request line");
		return;
	}
	sp = strchr(line, ' ');
	args = "";
	if (sp) {
		*sp = '\0';
		args = sp + 1;
	}
	h = strlen(line) < CONTROL_NAME_MAX ? control_lookup(line) : NULL;
	if (!h) {
		log_info("control event=command command=%.*s result=unknown",
		    CONTROL_NAME_MAX, line);
		control_reply_err(c, "unknown command");
		return;
	}
	rc = h(args, &body);
	if (strcmp(line, "ping") != 0)
		log_info("control event=command command=%s result=%s", line, rc == 0 ? "ok" : "error");
	if (rc != 0) {
		control_reply_err(c, body.data ? body.data : "failed");
		buf_free(&body);
		return;
	}
	buf_reset(&c->out);
	if (buf_append(&c->out, "OK\n", 3) < 0 ||
	    (body.len && buf_append(&c->out, body.data, body.len) < 0) ||
	    (body.len && body.data[body.len - 1] != '\n' && buf_append(&c->out, "\n", 1) < 0)) {
		buf_free(&body);
		control_client_free(c);
		return;
	}
	buf_free(&body);
	ev_io_stop(control_loop, &c->io);     /* no more reading */
	control_client_flush(c);
}

static void control_client_read(struct control_client *c)
{
	ssize_t n;
	char *nl;

	for (;;) {
		n = read(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {           /* EOF before a whole line, or an error */
			control_client_free(c);
			return;
		}
		nl = memchr(c->in + c->inlen, '\n', (size_t)n);
		c->inlen += (size_t)n;
		if (nl) {
			*nl = '\0';
			ev_io_stop(control_loop, &c->io);
			control_dispatch(c, c->in, (size_t)(nl - c->in));
			return;
		}
		if (c->inlen == sizeof(c->in)) {
			ev_io_stop(control_loop, &c->io);
			control_reply_err(c, "request line too long");
			return;
		}
	}
}

static void control_client_io(struct ev_loop *loop, ev_io *w, int revents)
{
	struct control_client *c = w->data;

	(void)loop;
	if (revents & EV_WRITE)
		control_client_flush(c);
	else if (revents & EV_READ)
		control_client_read(c);
}

static void control_client_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct control_client *c = w->data;

	(void)loop;
	(void)revents;
	log_info("control event=timeout");
	control_client_free(c);
}

/* root or ourselves; everyone else is refused even if the file mode let them in */
static bool control_peer_ok(int fd)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof(cred))
		return false;
	return cred.uid == 0 || cred.uid == geteuid();
}

static void control_accept(struct ev_loop *loop, ev_io *w, int revents)
{
	struct control_client *c;
	int fd;

	(void)w;
	(void)revents;
	for (;;) {
		fd = accept4(control_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				log_warn("control event=accept-failed error=\"%s\"", strerror(errno));
			return;
		}
		if (!control_peer_ok(fd)) {
			log_warn("control event=refused reason=peer-uid");
			close(fd);
			continue;
		}
		if (control_nclients >= CONTROL_MAX_CLIENTS || !(c = calloc(1, sizeof(*c)))) {
			log_warn("control event=refused reason=busy");
			close(fd);
			continue;
		}
		c->fd = fd;
		ev_io_init(&c->io, control_client_io, fd, EV_READ);
		c->io.data = c;
		ev_timer_init(&c->timer, control_client_timeout, CONTROL_TIMEOUT, 0.);
		c->timer.data = c;
		c->next = control_clients;
		if (control_clients)
			control_clients->prev = c;
		control_clients = c;
		control_nclients++;
		ev_io_start(loop, &c->io);
		ev_timer_start(loop, &c->timer);
	}
}

/* is something answering on path? 1 yes, 0 no (stale or absent), -1 error */
static int control_in_use(const struct sockaddr_un *sun, char *err, size_t errlen)
{
	struct stat st;
	int fd, rc;

	if (lstat(sun->sun_path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		err_set(err, errlen, "%s: %s", sun->sun_path, strerror(errno));
		return -1;
	}
	if (!S_ISSOCK(st.st_mode)) {
		err_set(err, errlen, "%s: exists and is not a socket", sun->sun_path);
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err_set(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	rc = connect(fd, (const struct sockaddr *)sun, sizeof(*sun));
	if (rc == 0 || errno == EAGAIN || errno == EINPROGRESS) {
		close(fd);
		return 1;
	}
	rc = errno;
	close(fd);
	if (rc == ECONNREFUSED)
		return 0;
	err_set(err, errlen, "%s: %s", sun->sun_path, strerror(rc));
	return -1;
}

/* control_init - unlink a stale socket, bind, chmod 0600, listen, start the watcher */
int control_init(struct ev_loop *loop, const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	int fd, used;

	if (control_fd >= 0) {
		err_set(err, errlen, "control socket already open");
		return -1;
	}
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	if (!path || !*path || strlen(path) >= sizeof(sun.sun_path)) {
		err_set(err, errlen, "control socket path %s (at most %zu bytes)",
		    path && *path ? "too long" : "empty", sizeof(sun.sun_path) - 1);
		return -1;
	}
	strcpy(sun.sun_path, path);
	if ((used = control_in_use(&sun, err, errlen)) < 0)
		return -1;
	if (used) {
		err_set(err, errlen, "%s: another process answers on this control socket "
		    "(is relayd already running?)", path);
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		err_set(err, errlen, "%s: cannot remove the stale socket: %s", path,
		    strerror(errno));
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err_set(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		err_set(err, errlen, "%s: cannot bind: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	/* XXX a connect between bind and chmod passes the mode; SO_PEERCRED still checks */
	if (chmod(path, 0600) < 0 || listen(fd, CONTROL_MAX_CLIENTS) < 0) {
		err_set(err, errlen, "%s: %s", path, strerror(errno));
		close(fd);
		unlink(path);
		return -1;
	}
	control_loop = loop;
	control_fd = fd;
	strcpy(control_path, path);
	ev_io_init(&control_accept_io, control_accept, fd, EV_READ);
	ev_io_start(loop, &control_accept_io);
	log_info("control event=listening path=%s", path);
	return 0;
}

/* control_shutdown - drop clients, close the socket and unlink it */
void control_shutdown(void)
{
	while (control_clients)
		control_client_free(control_clients);
	if (control_fd < 0)
		return;
	ev_io_stop(control_loop, &control_accept_io);
	close(control_fd);
	control_fd = -1;
	unlink(control_path);
	control_path[0] = '\0';
}
