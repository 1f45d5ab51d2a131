/*
 * relayctl - manage relayd's users, their allowed senders and limits, and the queue.
 *   relayctl [-c FILE] user add NAME            password from stdin, one line
 *   relayctl [-c FILE] user passwd NAME         password from stdin, one line
 *   relayctl [-c FILE] user del NAME
 *   relayctl [-c FILE] user list
 *   relayctl [-c FILE] user show NAME
 *   relayctl [-c FILE] user sender NAME add|del PATTERN    (user@domain, @domain or *)
 *   relayctl [-c FILE] user limit NAME [msgs=N/UNIT] [rcpts=N/UNIT] [bytes=SIZE/UNIT] | clear
 *   relayctl [-c FILE] queue list | show ID | flush | delete ID
 *   relayctl [-c FILE] stats
 * The database named by relayd.conf's `database` line is opened (and migrated) directly
 * through userdb, the same code relayd uses. The queue is read directly (queue_scan,
 * queue_load); whatever changes a running relayd's state (flush, delete, stats) goes
 * through its control socket (relayd.conf `control`, default QUEUE/control.sock, see
 * relayd/control.h), and delete falls back to removing the file when relayd is not running.
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
	"  user sender NAME add|del PATTERN allow or disallow a sender: user@domain, @domain or *\n"
	"  user limit NAME LIMIT...         set limits: msgs=N/UNIT rcpts=N/UNIT bytes=SIZE/UNIT\n"
	"                                   (UNIT minute, hour or day; SIZE like 50M; N=0 is\n"
	"                                   unlimited; msgs=default uses relayd.conf's value)\n"
	"  user limit NAME clear            use relayd.conf's limits for this user\n"
	"  queue list                       list queued messages\n"
	"  queue show ID                    show a queued message: envelope, recipients, headers\n"
	"  queue flush                      ask relayd to retry every queued message now\n"
	"  queue delete ID                  remove a message from the queue (no bounce)\n"
	"  stats                            relayd's counters (queue summary if it is not running)\n"
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
		relayctl_die("bad user name \"%s\": 1 to 255 characters without spaces, colons "
		    "or control characters", name);
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
	char txt[64];
	int i;

	printf("limits:\n");
	for (i = 0; i < USERDB_NLIMITS; i++) {
		if (l->set[i]) {
			relayctl_fmt_limit(i, l->limit[i], l->window[i], txt, sizeof(txt));
			printf("  %-16s%s\n", relayctl_limit_names[i], txt);
		} else {
			relayctl_fmt_limit(i, def_limit[i], def_window[i], txt, sizeof(txt));
			printf("  %-16sdefault (%s)\n", relayctl_limit_names[i], txt);
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
		relayctl_die("bad sender pattern \"%s\": expected user@domain, @domain or *",
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

/* top-level commands; `queue` and `stats` join here when the control socket exists */
static const struct relayctl_cmd relayctl_cmds[] = {
	{ "user", relayctl_cmd_user },
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
