/*
 * control-t - unit tests for the control socket: the request/answer protocol (ping,
 * handlers with arguments, errors, unknown commands, overlong and bad lines), the socket's
 * mode, stale-socket replacement, refusal of a live socket or a non-socket, and unlink on
 * shutdown. Single-threaded: the client sockets are driven between ev_run(EVRUN_NOWAIT)s.
 */
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../../relayd/control.h"
#include "../../relayd/log.h"
#include "tap.h"

static char tmpdir[256];
static char sockpath[300];
static struct ev_loop *loop;

static int echo_handler(const char *args, struct buf *out)
{
	return buf_printf(out, "args=[%s]", args);
}

static int fail_handler(const char *args, struct buf *out)
{
	(void)args;
	buf_printf(out, "it failed\nsecond line");
	return -1;
}

static int big_handler(const char *args, struct buf *out)
{
	size_t i;

	(void)args;
	for (i = 0; i < 20000; i++)
		if (buf_printf(out, "line %06zu\n", i) < 0)
			return -1;
	return 0;
}

static int unix_socket(const char *path, bool listening)
{
	struct sockaddr_un sun;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
	if (fd < 0)
		return -1;
	if (listening ? bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
	    listen(fd, 1) < 0 : connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* send req (raw bytes), run the loop until the server closes; the answer in a static buffer */
static const char *ask_n(const char *req, size_t reqlen)
{
	static char ans[300000];
	size_t len = 0, off = 0;
	time_t deadline = time(NULL) + 10;
	int fd = unix_socket(sockpath, false);

	if (fd < 0)
		return "(connect failed)";
	fcntl(fd, F_SETFL, O_NONBLOCK);
	while (time(NULL) < deadline) {
		ssize_t n;

		if (off < reqlen) {
			n = write(fd, req + off, reqlen - off);
			if (n > 0)
				off += (size_t)n;
			if (off == reqlen)
				shutdown(fd, SHUT_WR);
		}
		ev_run(loop, EVRUN_NOWAIT);
		n = read(fd, ans + len, sizeof(ans) - 1 - len);
		if (n == 0)
			break;
		if (n > 0)
			len += (size_t)n;
		else if (errno != EAGAIN)
			break;
		else
			poll(NULL, 0, 1);
	}
	close(fd);
	ans[len] = '\0';
	return ans;
}

static const char *ask(const char *req)
{
	return ask_n(req, strlen(req));
}

int main(void)
{
	char err[512] = "", path2[300], cmd[600];
	struct stat st;
	const char *a;
	char *big;
	int fd;

	log_init("control-t", 1, 0);
	snprintf(tmpdir, sizeof(tmpdir), "%s/control-t.XXXXXX",
	    getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(sockpath, sizeof(sockpath), "%s/control.sock", tmpdir);
	loop = ev_default_loop(0);

	control_register("echo", echo_handler);
	control_register("fail", fail_handler);
	control_register("big", big_handler);
	if (!ok(control_init(loop, sockpath, err, sizeof(err)) == 0, "control_init"))
		diag("err: %s", err);
	ok(stat(sockpath, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 0777) == 0600,
	    "socket exists with mode 0600");

	is_str(ask("ping\n"), "OK\npong\n", "ping");
	is_str(ask("ping\r\n"), "OK\npong\n", "ping with CRLF");
	is_str(ask("echo a b  c\n"), "OK\nargs=[a b  c]\n", "handler gets the arguments");
	is_str(ask("echo\n"), "OK\nargs=[]\n", "no arguments: empty string");
	is_str(ask("fail x\n"), "ERR it failed\n", "handler error: ERR and its first line");
	is_str(ask("nosuch\n"), "ERR unknown command\n", "unknown command");
	is_str(ask("\n"), "ERR unknown command\n", "empty line: unknown command");
	is_str(ask("PING\n"), "ERR unknown command\n", "commands are case-sensitive");
	is_str(ask("echo a\tb\n"), "ERR bad request line\n", "control character refused");
	is_str(ask_n("echo a\0b\n", 9), "ERR bad request line\n", "NUL refused");
	is_str(ask("ping\nping\n"), "OK\npong\n", "one request per connection");
	is_str(ask("ping"), "", "EOF before the newline: closed without an answer");
	if ((big = malloc(CONTROL_LINE_MAX + 100))) {
		memset(big, 'a', CONTROL_LINE_MAX + 99);
		big[CONTROL_LINE_MAX + 99] = '\n';
		is_str(ask_n(big, CONTROL_LINE_MAX + 100), "ERR request line too long\n",
		    "overlong request line refused");
		memcpy(big, "echo ", 5);
		big[CONTROL_LINE_MAX - 1] = '\n';
		a = ask_n(big, CONTROL_LINE_MAX);
		ok(strncmp(a, "OK\nargs=[aaa", 12) == 0 && strlen(a) == 3 + 6 + CONTROL_LINE_MAX - 6 + 2,
		    "request of exactly CONTROL_LINE_MAX bytes accepted");
		free(big);
	}
	a = ask("big\n");
	ok(strlen(a) == 3 + 20000 * 12 && strstr(a, "line 019999\n") != NULL,
	    "large answer written in full (%zu bytes)", strlen(a));

	control_register("echo", fail_handler);
	is_str(ask("echo\n"), "ERR it failed\n", "register again replaces the handler");

	ok(control_init(loop, sockpath, err, sizeof(err)) == -1, "second control_init refused");

	/* a socket somebody else listens on is left alone */
	snprintf(path2, sizeof(path2), "%s/other.sock", tmpdir);
	control_shutdown();
	ok(stat(sockpath, &st) == -1 && errno == ENOENT, "shutdown unlinks the socket");
	fd = unix_socket(path2, true);
	ok(fd >= 0, "another process listens on other.sock");
	err[0] = '\0';
	ok(control_init(loop, path2, err, sizeof(err)) == -1, "live socket refused");
	ok(strstr(err, "already running") != NULL, "and says so: %s", err);
	close(fd);       /* now stale: bound, nobody listening */
	ok(stat(path2, &st) == 0, "stale socket file left behind");
	ok(control_init(loop, path2, err, sizeof(err)) == 0, "stale socket replaced");
	snprintf(sockpath, sizeof(sockpath), "%s", path2);
	is_str(ask("ping\n"), "OK\npong\n", "ping on the replaced socket");
	control_shutdown();

	/* a regular file is not a socket: not ours to remove */
	fd = open(path2, O_WRONLY | O_CREAT | O_EXCL, 0600);
	close(fd);
	err[0] = '\0';
	ok(control_init(loop, path2, err, sizeof(err)) == -1, "regular file refused");
	ok(strstr(err, "not a socket") != NULL && stat(path2, &st) == 0,
	    "and left in place: %s", err);

	memset(path2, 'x', sizeof(path2) - 1);
	path2[0] = '/';
	path2[sizeof(path2) - 1] = '\0';
	ok(control_init(loop, path2, err, sizeof(err)) == -1 && strstr(err, "too long"),
	    "overlong path refused: %s", err);

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		diag("could not remove %s", tmpdir);
	return done_testing();
}
