/*
 * relayctl - manage relayd's users, their allowed senders and limits, and the queue.
 *   relayctl [-c FILE] user add NAME            password from stdin, one line
 *   relayctl [-c FILE] user passwd NAME         password from stdin, one line
 *   relayctl [-c FILE] user del NAME
 *   relayctl [-c FILE] user list
 *   relayctl [-c FILE] user show NAME
 *   relayctl [-c FILE] user sender NAME add|del PATTERN    (user@domain, @domain, * or <>)
 *   relayctl [-c FILE] user limit NAME [msgs=N/UNIT] [rcpts=N/UNIT] [bytes=SIZE/UNIT] | clear
 *   relayctl [-c FILE] queue list | show ID | flush | delete ID
 *   relayctl [-c FILE] stats
 * The database named by relayd.conf's `database` line is opened (and migrated) directly
 * through userdb, the same code relayd uses. The queue is read directly (queue_scan,
 * queue_load); whatever changes a running relayd's state (flush, delete, stats) goes
 * through its control socket (relayd.conf `control`, default QUEUE/control.sock, see
 * relayd/control.h), and delete falls back to removing the file when relayd is not running
 * (no relayd holds QUEUE/lock).
 * Contract (DESIGN.md, "Interfaces other tools rely on"): exit 0 on success; otherwise
 * one line "relayctl: what went wrong" on stderr and exit 1; usage errors print the
 * usage to stderr and exit 1. Passwords are wiped from memory after use.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "../relayd/config.h"
#include "../relayd/queue.h"
#include "../relayd/ratelimit.h"
#include "../relayd/userdb.h"

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif
#define RELAYCTL_DEFAULT_CONFIG SYSCONFDIR "/relayd/relayd.conf"
#define RELAYCTL_CONTROL_TIMEOUT 30         /* seconds to wait for relayd's answer */
#define RELAYCTL_REPLY_MAX (16u << 20)      /* bytes of answer we accept */

struct relayctl_cmd {
	const char *name;
	int (*run)(const char *config_path, int argc, char **argv);
};

static const char relayctl_usage_text[] =
	"usage: relayctl [-c FILE] COMMAND ...\n"
	"  user add NAME                    add a user; password read from stdin (one line)\n"
	"  user passwd NAME                 set a user's password from stdin (one line)\n"
	"  user del NAME                    delete a user and their senders and limits\n"
	"  user list                        list user names, one per line\n"
	"  user show NAME                   show a user and the senders they may use\n"
	"  user sender NAME add|del PATTERN allow or disallow a sender: user@domain, @domain, * or <>\n"
	"  user limit NAME LIMIT...         set limits: msgs=N/UNIT rcpts=N/UNIT bytes=SIZE/UNIT\n"
	"                                   (UNIT minute, hour or day; SIZE like 50M; N=0 is\n"
	"                                   unlimited; msgs=default uses relayd.conf's value)\n"
	"  user limit NAME clear            use relayd.conf's limits for this user\n"
	"  queue list                       list queued messages\n"
	"  queue show ID                    show a queued message: envelope, recipients, headers\n"
	"  queue flush                      ask relayd to retry every queued message now\n"
	"  queue delete ID                  remove a message from the queue (no bounce)\n"
	"  stats                            relayd's counters (queue summary if it is not running)\n"
	"  reload                           make relayd re-read its configuration (like SIGHUP)\n"
	"options:\n"
	"  -c FILE                          config file (default " RELAYCTL_DEFAULT_CONFIG ")\n";

static void relayctl_usage(void) __attribute__((noreturn));
static void relayctl_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void relayctl_usage(void)
{
	fputs(relayctl_usage_text, stderr);
	exit(1);
}

/* one line on stderr, exit 1 */
static void relayctl_die(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	char *p;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	for (p = msg; *p; p++)          /* keep the promise of one line */
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	fprintf(stderr, "relayctl: %s\n", msg);
	exit(1);
}

/* the config, loaded once (struct config is large: kept off the stack); dies on failure */
static const struct config *relayctl_config(const char *config_path)
{
	static struct config *c;
	char err[1024];

	if (c)
		return c;
	if (!(c = calloc(1, sizeof(*c))))
		relayctl_die("out of memory");
	if (config_load(config_path, c, err, sizeof(err)) < 0)
		relayctl_die("%s", err);
	return c;
}

/* load the config and open its database (migrating it); dies on failure */
static struct userdb *relayctl_open(const char *config_path)
{
	const struct config *c = relayctl_config(config_path);
	struct userdb *db;
	char err[1024];

	if (!c->database[0])
		relayctl_die("%s: no database line", config_path);
	db = userdb_open(c->database, err, sizeof(err));
	if (!db)
		relayctl_die("%s", err);
	return db;
}

/*
 * Read one password line from stdin into a malloc'd buffer, trailing CR/LF stripped.
 * On a terminal, prompt on stderr and turn echo off. The caller wipes and frees it.
 */
static char *relayctl_read_password(void)
{
	struct termios old, noecho;
	bool tty = isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &old) == 0;
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	int saved;

	if (tty) {
		fputs("Password: ", stderr);
		fflush(stderr);
		noecho = old;
		noecho.c_lflag &= ~(tcflag_t)ECHO;
		noecho.c_lflag |= ECHONL;
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &noecho);
	}
	errno = 0;
	n = getline(&line, &cap, stdin);
	saved = errno;
	if (tty)
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
	if (n < 0) {
		if (line) {
			explicit_bzero(line, cap);
			free(line);
		}
		if (saved)
			relayctl_die("cannot read the password from stdin: %s", strerror(saved));
		relayctl_die("no password on stdin");
	}
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		line[--n] = '\0';
	if (n == 0 || strlen(line) != (size_t)n) {
		explicit_bzero(line, cap);
		free(line);
		relayctl_die(n == 0 ? "empty password refused" : "password contains a NUL byte");
	}
	return line;
}

static void relayctl_free_password(char *pw)
{
	if (!pw)
		return;
	explicit_bzero(pw, strlen(pw));
	free(pw);
}

static int relayctl_user_setpw(const char *config_path, const char *name, bool add)
{
	struct userdb *db;
	char err[512];
	char *pw;
	int rc;

	if (add && !userdb_name_valid(name))
		relayctl_die("bad user name \"%s\": 1 to 255 bytes of UTF-8 without spaces, "
		    "colons or control characters", name);
	db = relayctl_open(config_path);
	pw = relayctl_read_password();
	rc = add ? userdb_user_add(db, name, pw, err, sizeof(err))
		 : userdb_user_passwd(db, name, pw, err, sizeof(err));
	relayctl_free_password(pw);
	userdb_close(db);
	if (rc < 0)
		relayctl_die("%s", err);
	return 0;
}

static void relayctl_print_name(const char *name, void *arg)
{
	(void)arg;
	puts(name);
}

static void relayctl_fmt_time(int64_t t, char *out, size_t outlen)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (t <= 0 || !gmtime_r(&tt, &tm) ||
	    strftime(out, outlen, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
		snprintf(out, outlen, "unknown");
}

static const char *const relayctl_limit_names[USERDB_NLIMITS] = { "msgs", "rcpts", "bytes" };

/* "100/hour"; byte limits with a size suffix when exact ("50M/day"); both parse back */
static void relayctl_fmt_limit(int idx, uint64_t limit, uint32_t window, char *out,
    size_t outlen)
{
	static const struct { uint64_t mul; char suffix; } sz[] = {
		{ 1ull << 30, 'G' }, { 1ull << 20, 'M' }, { 1ull << 10, 'k' },
	};
	char unit[32];
	const char *slash;
	size_t i;

	ratelimit_format(limit, window, out, outlen);
	if (idx != USERDB_LIMIT_BYTES || limit == 0 || !(slash = strchr(out, '/')))
		return;
	snprintf(unit, sizeof(unit), "%s", slash);
	for (i = 0; i < sizeof(sz) / sizeof(sz[0]); i++) {
		if (limit % sz[i].mul == 0) {
			snprintf(out, outlen, "%llu%c%s", (unsigned long long)(limit / sz[i].mul),
			    sz[i].suffix, unit);
			return;
		}
	}
}

static void relayctl_print_limits(const struct config *c, const struct userdb_limits *l)
{
	const unsigned long long def_limit[USERDB_NLIMITS] = {
		c->limit_msgs, c->limit_rcpts, c->limit_bytes,
	};
	const unsigned def_window[USERDB_NLIMITS] = {
		c->limit_msgs_window, c->limit_rcpts_window, c->limit_bytes_window,
	};
	char txt[64], label[16];
	int i;

	printf("limits:\n");
	for (i = 0; i < USERDB_NLIMITS; i++) {
		snprintf(label, sizeof(label), "%s:", relayctl_limit_names[i]);
		if (l->set[i]) {
			relayctl_fmt_limit(i, l->limit[i], l->window[i], txt, sizeof(txt));
			printf("  %-16s%s\n", label, txt);
		} else {
			relayctl_fmt_limit(i, def_limit[i], def_window[i], txt, sizeof(txt));
			printf("  %-16sdefault (%s)\n", label, txt);
		}
	}
}

static int relayctl_user_show(const char *config_path, const char *name)
{
	struct userdb *db = relayctl_open(config_path);
	struct userdb_user u;
	struct userdb_limits lim;
	char created[64], changed[64];
	size_t i;
	bool own;
	int rc;

	rc = userdb_user_get(db, name, &u);
	if (rc == 0 && userdb_limits_get(db, name, &lim) < 0) {
		userdb_user_free(&u);
		rc = -1;
	}
	userdb_close(db);
	if (rc < 0)
		relayctl_die("cannot read user %s from the database", name);
	if (rc > 0)
		relayctl_die("no such user: %s", name);
	relayctl_fmt_time(u.created, created, sizeof(created));
	relayctl_fmt_time(u.pw_changed, changed, sizeof(changed));
	printf("name:             %s\n", u.name);
	printf("created:          %s\n", created);
	printf("password changed: %s\n", changed);
	own = strchr(u.name, '@') != NULL;
	if (!own && u.nsenders == 0) {
		printf("allowed senders:  none\n");
	} else {
		printf("allowed senders:\n");
		if (own)
			printf("  %-32s (own address)\n", u.name);
		for (i = 0; i < u.nsenders; i++) {
			const char *p = u.senders[i];

			if (strcmp(p, "*") == 0)
				printf("  %-32s (any address)\n", p);
			else if (strcmp(p, "<>") == 0)
				printf("  %-32s (the null sender: an MTA's bounces and notices)\n", p);
			else if (p[0] == '@')
				printf("  %-32s (any address at %s)\n", p, p + 1);
			else
				printf("  %s\n", p);
		}
	}
	userdb_user_free(&u);
	relayctl_print_limits(relayctl_config(config_path), &lim);
	if (fflush(stdout) != 0)
		relayctl_die("cannot write output: %s", strerror(errno));
	return 0;
}

static int relayctl_user_sender(const char *config_path, int argc, char **argv)
{
	struct userdb *db;
	char err[512];
	bool add;
	int rc;

	/* argv: NAME add|del PATTERN */
	if (argc != 3)
		relayctl_usage();
	if (strcmp(argv[1], "add") == 0)
		add = true;
	else if (strcmp(argv[1], "del") == 0)
		add = false;
	else
		relayctl_usage();
	if (add && !userdb_pattern_valid(argv[2]))
		relayctl_die("bad sender pattern \"%s\": expected user@domain, @domain, * or <>",
		    argv[2]);
	db = relayctl_open(config_path);
	rc = add ? userdb_sender_add(db, argv[0], argv[2], err, sizeof(err))
		 : userdb_sender_del(db, argv[0], argv[2], err, sizeof(err));
	userdb_close(db);
	if (rc < 0)
		relayctl_die("%s", err);
	return 0;
}

/* msgs and rcpts are plain counts: digits before the '/' */
static bool relayctl_count_ok(const char *v)
{
	size_t n = strspn(v, "0123456789");

	return n > 0 && v[n] == '/';
}

/* relayctl user limit NAME clear | key=value... */
static int relayctl_user_limit(const char *config_path, int argc, char **argv)
{
	struct userdb_limits l, want;
	bool given[USERDB_NLIMITS] = { false };
	struct userdb *db;
	char err[512];
	bool clear = false;
	int i, k, rc;

	/* argv: NAME ITEM... */
	if (argc < 2)
		relayctl_usage();
	memset(&want, 0, sizeof(want));
	if (argc == 2 && strcmp(argv[1], "clear") == 0) {
		clear = true;
	} else {
		for (i = 1; i < argc; i++) {
			const char *eq = strchr(argv[i], '=');
			const char *v;

			for (k = 0; eq && k < USERDB_NLIMITS; k++)
				if (strlen(relayctl_limit_names[k]) == (size_t)(eq - argv[i]) &&
				    strncmp(argv[i], relayctl_limit_names[k], (size_t)(eq - argv[i])) == 0)
					break;
			if (!eq || k == USERDB_NLIMITS)
				relayctl_die("bad limit \"%s\": expected msgs=N/UNIT, rcpts=N/UNIT, "
				    "bytes=SIZE/UNIT or clear", argv[i]);
			if (given[k])
				relayctl_die("%s given twice", relayctl_limit_names[k]);
			given[k] = true;
			v = eq + 1;
			if (strcmp(v, "default") == 0)
				continue;
			if ((k != USERDB_LIMIT_BYTES && !relayctl_count_ok(v)) ||
			    ratelimit_parse(v, &want.limit[k], &want.window[k]) < 0)
				relayctl_die("bad limit \"%s\": expected %s=%s/UNIT (UNIT minute, hour "
				    "or day) or %s=default", argv[i], relayctl_limit_names[k],
				    k == USERDB_LIMIT_BYTES ? "SIZE" : "N", relayctl_limit_names[k]);
			want.set[k] = true;
		}
	}
	db = relayctl_open(config_path);
	/* change only what was named; the rest keeps its stored value */
	if (userdb_limits_get(db, argv[0], &l) < 0) {
		userdb_close(db);
		relayctl_die("cannot read the limits of %s from the database", argv[0]);
	}
	for (k = 0; k < USERDB_NLIMITS; k++) {
		if (clear || given[k]) {
			l.set[k] = want.set[k];
			l.limit[k] = want.limit[k];
			l.window[k] = want.window[k];
		}
	}
	rc = userdb_limits_set(db, argv[0], &l, err, sizeof(err));
	userdb_close(db);
	if (rc < 0)
		relayctl_die("%s", err);
	return 0;
}

/* relayctl user ... */
static int relayctl_cmd_user(const char *config_path, int argc, char **argv)
{
	struct userdb *db;
	char err[512];
	int rc;

	if (argc < 1)
		relayctl_usage();
	if (strcmp(argv[0], "add") == 0 && argc == 2)
		return relayctl_user_setpw(config_path, argv[1], true);
	if (strcmp(argv[0], "passwd") == 0 && argc == 2)
		return relayctl_user_setpw(config_path, argv[1], false);
	if (strcmp(argv[0], "del") == 0 && argc == 2) {
		db = relayctl_open(config_path);
		rc = userdb_user_del(db, argv[1], err, sizeof(err));
		userdb_close(db);
		if (rc < 0)
			relayctl_die("%s", err);
		return 0;
	}
	if (strcmp(argv[0], "list") == 0 && argc == 1) {
		db = relayctl_open(config_path);
		rc = userdb_user_list(db, relayctl_print_name, NULL);
		userdb_close(db);
		if (rc < 0)
			relayctl_die("cannot list users from the database");
		if (fflush(stdout) != 0)
			relayctl_die("cannot write output: %s", strerror(errno));
		return 0;
	}
	if (strcmp(argv[0], "show") == 0 && argc == 2)
		return relayctl_user_show(config_path, argv[1]);
	if (strcmp(argv[0], "sender") == 0)
		return relayctl_user_sender(config_path, argc - 1, argv + 1);
	if (strcmp(argv[0], "limit") == 0)
		return relayctl_user_limit(config_path, argc - 1, argv + 1);
	relayctl_usage();
}

/* --- control socket client ------------------------------------------------------------- */

/*
 * Send one request line to relayd's control socket and read the whole answer. Returns 0
 * with the body after "OK\n" in *body (malloc'd, NUL-terminated), or 1 when relayd is not
 * running (no socket, or nobody listening on it). An "ERR msg" answer dies with msg.
 */
static int relayctl_control(const struct config *c, const char *request, char **body)
{
	struct sockaddr_un sun;
	struct timeval tv = { RELAYCTL_CONTROL_TIMEOUT, 0 };
	char *ans = NULL, *nl;
	size_t len = 0, cap = 0;
	ssize_t n;
	int fd;

	*body = NULL;
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	if (strlen(c->control) >= sizeof(sun.sun_path))
		relayctl_die("control socket path too long: %s", c->control);
	strcpy(sun.sun_path, c->control);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		relayctl_die("socket: %s", strerror(errno));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int e = errno;

		close(fd);
		if (e == ENOENT || e == ECONNREFUSED)
			return 1;
		relayctl_die("cannot connect to %s: %s", c->control, strerror(e));
	}
	/* one short line: a unix socket takes it whole; MSG_NOSIGNAL: no SIGPIPE if relayd
	 * closed already */
	if (send(fd, request, strlen(request), MSG_NOSIGNAL) < 0 ||
	    send(fd, "\n", 1, MSG_NOSIGNAL) < 0)
		relayctl_die("cannot send to %s: %s", c->control, strerror(errno));
	for (;;) {
		if (cap - len < 4096) {
			char *p;

			if (cap >= RELAYCTL_REPLY_MAX)
				relayctl_die("answer from %s is too long", c->control);
			cap = cap ? cap * 2 : 8192;
			if (!(p = realloc(ans, cap)))
				relayctl_die("out of memory");
			ans = p;
		}
		n = read(fd, ans + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			relayctl_die("no answer from relayd on %s: %s", c->control,
			    errno == EAGAIN || errno == EWOULDBLOCK ? "timed out" : strerror(errno));
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	ans[len] = '\0';
	if (strncmp(ans, "OK\n", 3) == 0) {
		memmove(ans, ans + 3, len - 3 + 1);
		*body = ans;
		return 0;
	}
	if (strncmp(ans, "ERR ", 4) == 0) {
		if ((nl = strchr(ans, '\n')))
			*nl = '\0';
		relayctl_die("%s", ans + 4);
	}
	relayctl_die("unexpected answer from relayd on %s", c->control);
}

static void relayctl_not_running(const struct config *c) __attribute__((noreturn));

static void relayctl_not_running(const struct config *c)
{
	relayctl_die("relayd is not running (no control socket at %s)", c->control);
}

/* --- queue ---------------------------------------------------------------------------- */

struct relayctl_ids {
	char (*id)[QUEUE_ID_LEN + 1];
	size_t n, cap;
};

static void relayctl_collect_id(const char *id, void *arg)
{
	struct relayctl_ids *ids = arg;

	if (ids->n == ids->cap) {
		size_t ncap = ids->cap ? ids->cap * 2 : 64;
		void *p = realloc(ids->id, ncap * sizeof(*ids->id));

		if (!p)
			relayctl_die("out of memory");
		ids->id = p;
		ids->cap = ncap;
	}
	snprintf(ids->id[ids->n++], QUEUE_ID_LEN + 1, "%s", id);
}

/* every queue entry that loads, oldest first; *bad counts the files that do not */
struct relayctl_queue {
	struct queue_envelope *env;
	size_t n;
	size_t bad;
};

static int relayctl_env_cmp(const void *a, const void *b)
{
	const struct queue_envelope *x = a, *y = b;

	if (x->created != y->created)
		return x->created < y->created ? -1 : 1;
	return strcmp(x->id, y->id);
}

static void relayctl_queue_read(const struct config *c, struct relayctl_queue *q)
{
	struct relayctl_ids ids = { 0 };
	size_t i;

	memset(q, 0, sizeof(*q));
	if (queue_scan(c->queue, relayctl_collect_id, &ids) < 0) {
		if (errno == ENOENT) {     /* relayd never ran: an empty queue */
			free(ids.id);
			return;
		}
		relayctl_die("cannot read the queue %s/msg: %s", c->queue, strerror(errno));
	}
	if (ids.n && !(q->env = calloc(ids.n, sizeof(*q->env))))
		relayctl_die("out of memory");
	for (i = 0; i < ids.n; i++) {
		/* a file that does not load is being written (or was delivered) this moment,
		 * or damaged; relayd discards one without a valid trailer at start */
		char path[PATH_MAX];
		struct stat st;

		if (queue_load(c->queue, ids.id[i], &q->env[q->n]) == 0)
			q->n++;
		else if (queue_path(c->queue, ids.id[i], path, sizeof(path)) == 0 &&
		    stat(path, &st) == 0)
			q->bad++;       /* else: gone since the scan (delivered) */
	}
	free(ids.id);
	if (q->n > 1) /* q->env is NULL for an empty queue */
		qsort(q->env, q->n, sizeof(*q->env), relayctl_env_cmp);
}

static void relayctl_queue_free(struct relayctl_queue *q)
{
	size_t i;

	for (i = 0; i < q->n; i++)
		queue_envelope_free(&q->env[i]);
	free(q->env);
}

/* "45s", "12m", "3h05m", "2d04h", "12d" (at most 6 characters below 1000000 days) */
static void relayctl_fmt_age(long long secs, char *out, size_t outlen)
{
	if (secs < 0)
		secs = 0;
	if (secs >= 10 * 86400) {
		snprintf(out, outlen, "%lldd", secs / 86400);
		return;
	}
	if (secs < 60)
		snprintf(out, outlen, "%llds", secs);
	else if (secs < 3600)
		snprintf(out, outlen, "%lldm", secs / 60);
	else if (secs < 86400)
		snprintf(out, outlen, "%lldh%02lldm", secs / 3600, secs % 3600 / 60);
	else
		snprintf(out, outlen, "%lldd%02lldh", secs / 86400, secs % 86400 / 3600);
}

static void relayctl_fmt_next(const struct queue_envelope *e, time_t now, char *out,
    size_t outlen)
{
	char age[32];

	if (e->next_attempt <= now) {
		snprintf(out, outlen, "now");
	} else {
		relayctl_fmt_age((long long)(e->next_attempt - now), age, sizeof(age));
		snprintf(out, outlen, "in %s", age);
	}
}

static size_t relayctl_pending(const struct queue_envelope *e)
{
	size_t i, n = 0;

	for (i = 0; i < e->nrcpt; i++)
		if (e->rcpt[i].done_code == 0)
			n++;
	return n;
}

/* one line of untrusted text for a terminal: control characters become '?' */
static void relayctl_put_clean(const char *s)
{
	for (; *s; s++)
		putchar((unsigned char)*s < ' ' || *s == 0x7f ? '?' : *s);
}

static int relayctl_queue_list(const struct config *c)
{
	struct relayctl_queue q;
	time_t now = time(NULL);
	char age[32], next[40], rc[48];
	size_t i;

	relayctl_queue_read(c, &q);
	if (q.n)
		printf("%-16s  %-6s  %9s  %-9s  %5s  %-8s  %s\n", "ID", "AGE", "SIZE", "RCPTS",
		    "TRIES", "NEXT", "FROM  LAST-ERROR");
	for (i = 0; i < q.n; i++) {
		const struct queue_envelope *e = &q.env[i];

		if (e->created > 0)
			relayctl_fmt_age((long long)(now - e->created), age, sizeof(age));
		else /* damaged */
			snprintf(age, sizeof(age), "?");
		relayctl_fmt_next(e, now, next, sizeof(next));
		snprintf(rc, sizeof(rc), "%zu/%zu", relayctl_pending(e), e->nrcpt);
		printf("%-16s  %-6s  %9zu  %-9s  %5u  %-8s  <", e->id, age, e->size, rc,
		    e->attempts, next);
		relayctl_put_clean(e->from);
		printf(">  ");
		relayctl_put_clean(e->last_error ? e->last_error : "-");
		putchar('\n');
	}
	printf("%zu message%s in the queue", q.n, q.n == 1 ? "" : "s");
	if (q.bad)
		printf(" (and %zu incomplete or damaged file%s)", q.bad, q.bad == 1 ? "" : "s");
	putchar('\n');
	relayctl_queue_free(&q);
	if (fflush(stdout) != 0)
		relayctl_die("cannot write output: %s", strerror(errno));
	return 0;
}

/* a queue id as given: 16 hex digits (lower-cased into out) */
static void relayctl_queue_id(const char *arg, char out[QUEUE_ID_LEN + 1])
{
	size_t i;

	if (strlen(arg) != QUEUE_ID_LEN || strspn(arg, "0123456789abcdefABCDEF") != QUEUE_ID_LEN)
		relayctl_die("bad queue id \"%s\": expected 16 hex digits", arg);
	for (i = 0; i <= QUEUE_ID_LEN; i++)
		out[i] = (char)tolower((unsigned char)arg[i]);
}

static void relayctl_fmt_when(time_t t, time_t now, char *out, size_t outlen)
{
	char abs[64], rel[32];

	relayctl_fmt_time((int64_t)t, abs, sizeof(abs));
	if (t > now) {
		relayctl_fmt_age((long long)(t - now), rel, sizeof(rel));
		snprintf(out, outlen, "%s (in %s)", abs, rel);
	} else {
		relayctl_fmt_age((long long)(now - t), rel, sizeof(rel));
		snprintf(out, outlen, "%s (%s ago)", abs, rel);
	}
}

static const char *relayctl_body_str(enum queue_body b)
{
	return b == QUEUE_BODY_BINARYMIME ? "BINARYMIME" : b == QUEUE_BODY_8BITMIME ?
	    "8BITMIME" : "7BIT";
}

static void relayctl_notify_str(unsigned n, char *out, size_t outlen)
{
	if (n == 0)
		snprintf(out, outlen, "-");
	else if (n & DSN_NOTIFY_NEVER)
		snprintf(out, outlen, "NEVER");
	else
		snprintf(out, outlen, "%s%s%s%s%s",
		    n & DSN_NOTIFY_SUCCESS ? "SUCCESS" : "",
		    (n & DSN_NOTIFY_SUCCESS) && (n & (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY)) ? "," : "",
		    n & DSN_NOTIFY_FAILURE ? "FAILURE" : "",
		    (n & DSN_NOTIFY_FAILURE) && (n & DSN_NOTIFY_DELAY) ? "," : "",
		    n & DSN_NOTIFY_DELAY ? "DELAY" : "");
}

static int relayctl_queue_show(const struct config *c, const char *arg)
{
	struct queue_envelope e;
	char id[QUEUE_ID_LEN + 1], when[160], notify[48];
	time_t now = time(NULL);
	char *msg = NULL, *p, *end;
	size_t i;
	int lrc;

	relayctl_queue_id(arg, id);
	if ((lrc = queue_load(c->queue, id, &e)) < 0) {
		char path[PATH_MAX];
		struct stat st;
		int err = errno;

		if (queue_path(c->queue, id, path, sizeof(path)) < 0 || stat(path, &st) < 0)
			relayctl_die("no such message in the queue: %s", id);
		if (lrc == QUEUE_LOAD_INCOMPLETE)
			relayctl_die("queue file %s is incomplete (no valid END trailer: never "
			    "acknowledged, relayd discards it at start)", path);
		relayctl_die("queue file %s is complete but cannot be used: %s (relayd leaves it "
		    "in place)", path, strerror(err));
	}
	printf("id:            %s\n", e.id);
	relayctl_fmt_when(e.created, now, when, sizeof(when));
	printf("created:       %s\n", when);
	printf("user:          ");
	relayctl_put_clean(e.user ? e.user : "-");
	printf("\nfrom:          <");
	relayctl_put_clean(e.from);
	printf(">\nsize:          %zu bytes\n", e.size);
	printf("body:          %s%s\n", relayctl_body_str(e.body), e.smtputf8 ? ", SMTPUTF8" : "");
	if (e.ret || e.envid) {
		printf("dsn:           ret=%s envid=", e.ret ? e.ret : "-");
		relayctl_put_clean(e.envid ? e.envid : "-");
		putchar('\n');
	}
	printf("attempts:      %u\n", e.attempts);
	if (e.next_attempt > now)
		relayctl_fmt_when(e.next_attempt, now, when, sizeof(when));
	else
		snprintf(when, sizeof(when), "now");
	printf("next attempt:  %s\n", when);
	printf("last error:    ");
	relayctl_put_clean(e.last_error ? e.last_error : "-");
	putchar('\n');
	if (e.bounce_id[0])
		printf("bounce:        %s\n", e.bounce_id);
	printf("recipients:    %zu pending of %zu\n", relayctl_pending(&e), e.nrcpt);
	for (i = 0; i < e.nrcpt; i++) {
		const struct queue_rcpt *r = &e.rcpt[i];

		printf("  <");
		relayctl_put_clean(r->addr);
		printf(">  ");
		if (r->done_code == 0)
			printf("pending");
		else {
			printf("%s %d ", r->done_code < 400 ? "delivered" : "failed", r->done_code);
			relayctl_put_clean(r->done_text ? r->done_text : "");
		}
		if (r->notify || r->orcpt) {
			relayctl_notify_str(r->notify, notify, sizeof(notify));
			printf("  (notify=%s orcpt=", notify);
			relayctl_put_clean(r->orcpt ? r->orcpt : "-");
			putchar(')');
		}
		putchar('\n');
	}
	printf("headers:\n");
	if (queue_read_body(c->queue, &e, &msg) < 0) {
		printf("  (cannot read the message: %s)\n", strerror(errno));
	} else {
		/* header lines up to the first empty line; never the body */
		for (p = msg; *p; p = end) {
			size_t n;

			end = strchr(p, '\n');
			end = end ? end + 1 : p + strlen(p);
			n = (size_t)(end - p);
			while (n > 0 && (p[n - 1] == '\n' || p[n - 1] == '\r'))
				n--;
			if (n == 0)
				break;
			printf("  ");
			for (i = 0; i < n; i++)
				putchar((unsigned char)p[i] < ' ' && p[i] != '\t' ? '?' : p[i]);
			putchar('\n');
		}
		free(msg);
	}
	queue_envelope_free(&e);
	if (fflush(stdout) != 0)
		relayctl_die("cannot write output: %s", strerror(errno));
	return 0;
}

static int relayctl_queue_delete(const struct config *c, const char *arg)
{
	char id[QUEUE_ID_LEN + 1], req[64], path[PATH_MAX];
	struct stat st;
	char *body;

	relayctl_queue_id(arg, id);
	snprintf(req, sizeof(req), "delete %s", id);
	if (relayctl_control(c, req, &body) == 0) {
		fputs(body, stdout);
		free(body);
		return 0;
	}
	/* no control socket: the file may go only if no relayd holds the queue (its lock),
	 * and none may start meanwhile: held until exit */
	char lockpath[PATH_MAX + 8];
	snprintf(lockpath, sizeof(lockpath), "%s/lock", c->queue);
	int lock = open(lockpath, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) < 0)
		relayctl_die("relayd runs on %s but its control socket %s does not answer: not deleting", c->queue,
			     c->control);
	if (queue_path(c->queue, id, path, sizeof(path)) < 0 || stat(path, &st) < 0)
		relayctl_die("no such message in the queue: %s", id);
	if (queue_remove(c->queue, id, true) < 0)
		relayctl_die("cannot remove %s: %s", path, strerror(errno));
	return 0;
}

/* relayctl queue ... */
static int relayctl_cmd_queue(const char *config_path, int argc, char **argv)
{
	const struct config *c;
	char *body;

	if (argc < 1)
		relayctl_usage();
	c = relayctl_config(config_path);
	if (strcmp(argv[0], "list") == 0 && argc == 1)
		return relayctl_queue_list(c);
	if (strcmp(argv[0], "show") == 0 && argc == 2)
		return relayctl_queue_show(c, argv[1]);
	if (strcmp(argv[0], "delete") == 0 && argc == 2)
		return relayctl_queue_delete(c, argv[1]);
	if (strcmp(argv[0], "flush") == 0 && argc == 1) {
		if (relayctl_control(c, "flush", &body) != 0)
			relayctl_not_running(c);
		fputs(body, stdout);
		free(body);
		return 0;
	}
	relayctl_usage();
}

/* relayctl stats: relayd's own, or what the queue folder tells when it is not running */
static int relayctl_cmd_stats(const char *config_path, int argc, char **argv)
{
	const struct config *c;
	struct relayctl_queue q;
	char *body;

	(void)argv;
	if (argc != 0)
		relayctl_usage();
	c = relayctl_config(config_path);
	if (relayctl_control(c, "stats", &body) == 0) {
		fputs(body, stdout);
		free(body);
	} else {
		relayctl_queue_read(c, &q);
		printf("queue_messages=%zu\n", q.n);
		/* sorted oldest first */
		printf("queue_oldest_seconds=%lld\n",
		    q.n ? (long long)(time(NULL) - q.env[0].created) : 0LL);
		if (q.bad)
			printf("queue_damaged_files=%zu\n", q.bad);
		printf("relayd: not running\n");
		relayctl_queue_free(&q);
	}
	if (fflush(stdout) != 0)
		relayctl_die("cannot write output: %s", strerror(errno));
	return 0;
}

/* relayctl reload: through the control socket; relayd answers ERR when the config is bad */
static int relayctl_cmd_reload(const char *config_path, int argc, char **argv)
{
	const struct config *c;
	char *body;

	(void)argv;
	if (argc != 0)
		relayctl_usage();
	c = relayctl_config(config_path);
	if (relayctl_control(c, "reload", &body) != 0)
		relayctl_not_running(c);
	fputs(body, stdout);
	free(body);
	return 0;
}

/* top-level commands */
static const struct relayctl_cmd relayctl_cmds[] = {
	{ "user", relayctl_cmd_user },
	{ "queue", relayctl_cmd_queue },
	{ "stats", relayctl_cmd_stats },
	{ "reload", relayctl_cmd_reload },
};

int main(int argc, char **argv)
{
	const char *config_path = RELAYCTL_DEFAULT_CONFIG;
	size_t i;
	int ch;

	while ((ch = getopt(argc, argv, "+c:h")) != -1) {
		switch (ch) {
		case 'c':
			config_path = optarg;
			break;
		default:
			relayctl_usage();
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 1)
		relayctl_usage();
	for (i = 0; i < sizeof(relayctl_cmds) / sizeof(relayctl_cmds[0]); i++)
		if (strcmp(argv[0], relayctl_cmds[i].name) == 0)
			return relayctl_cmds[i].run(config_path, argc - 1, argv + 1) == 0 ? 0 : 1;
	relayctl_usage();
}
