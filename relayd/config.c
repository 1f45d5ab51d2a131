/*
 * config - parse and validate relayd.conf.
 * Grammar: one directive per line, words separated by blanks, '#' to end of line is a
 * comment. `listen ADDR:PORT MODE` and `upstream HOST:PORT [key=value ...]` repeat, and
 * tls_cert/tls_key up to CONFIG_MAX_CERTS times (paired by order); any other directive
 * counts once, the last one read winning. IPv6 addresses are written in brackets: [::1]:587.
 * Invariant: a config that loads without error is complete (paths absolute, a listener,
 * a certificate when any listener needs TLS).
 */
#include "config.h"
#include "ratelimit.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CONFIG_MAX_WORDS 16
#define CONFIG_LINE_MAX 4095 /* characters a line, its LF or CRLF not counted */
#define CONFIG_RATE_MAX 1000000 /* an upstream's rate= messages per unit */
#define CONFIG_MAX_SEEN 64 /* distinct directives remembered with their last line */

/* a directive read, and the last line it was on: file-level checks name that line */
struct config_seen {
	char name[32];
	int line;
};

struct config_ctx {
	struct config *c;
	const char *file;
	int line;
	int lines; /* lines read in all */
	char *err;
	size_t errlen;
	struct config_seen seen[CONFIG_MAX_SEEN];
	int nseen;
};

static int config_error(struct config_ctx *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int config_error(struct config_ctx *x, const char *fmt, ...)
{
	char what[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (x->line > 0)
		snprintf(x->err, x->errlen, "%s:%d: %s", x->file, x->line, what);
	else
		snprintf(x->err, x->errlen, "%s: %s", x->file, what);
	return -1;
}

/* config_defaults - built-in defaults */
void config_defaults(struct config *c)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->hostname, sizeof(c->hostname), "localhost");
	c->max_message_size = 35u * 1024 * 1024;
	c->max_recipients = 100;
	c->timeout_idle = 300;
	c->timeout_session = 3600;
	c->max_errors = 10;
	c->max_junk_commands = 100;
	c->max_sessions = 10000;
	c->retry_min = 60;
	c->retry_max = 3600;
	c->queue_lifetime = 5 * 86400;
	c->delay_warning = 4 * 3600;
	c->check_header_from = true;
	c->auth_cache_ttl = 300;
	c->limit_msgs_window = c->limit_rcpts_window = c->limit_bytes_window = 3600;
	c->max_conn_per_ip = 20;
	c->ipv6_prefix_length = 64;
	c->max_conn_rate_per_ip = 120;
	c->auth_fail_limit = 5;
	c->auth_lockout = 900;
	c->drain_timeout = 30;
	c->tls_threads = CONFIG_TLS_THREADS_AUTO;
}

/* a non-negative number with an optional one-letter unit from units[] (multipliers in
 * muls[]) and, for sizes, an optional trailing B; -1 if malformed or above max */
static long long config_parse_unit(const char *s, const char *units, const long long *muls, bool fold_b,
				   long long max)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || end == s || v < 0)
		return -1;
	long long mul = 1;
	if (*end) {
		const char *u = strchr(units, fold_b ? tolower((unsigned char)*end) : *end);
		if (!u)
			return -1;
		mul = muls[u - units];
		end++;
	}
	if (fold_b && (*end == 'b' || *end == 'B'))
		end++;
	if (*end || v > max / mul)
		return -1;
	return v * mul;
}

/* config_parse_size - "35M" -> bytes */
long long config_parse_size(const char *s)
{
	static const long long muls[] = { 1024, 1024 * 1024, 1024LL * 1024 * 1024 };
	return config_parse_unit(s, "kmg", muls, true, 1LL << 40);
}

/* config_parse_duration - "5m" -> 300 */
long long config_parse_duration(const char *s)
{
	static const long long muls[] = { 1, 60, 3600, 86400 };
	return config_parse_unit(s, "smhd", muls, false, 1LL << 31);
}

/* config_listen_mode_str - name of a listen mode */
const char *config_listen_mode_str(enum listen_mode m)
{
	switch (m) {
	case LISTEN_STARTTLS: return "starttls";
	case LISTEN_TLS: return "tls";
	case LISTEN_PLAIN: return "plain";
	}
	return "?";
}

/* config_hostport_str - "host:port", or "[host]:port" when host is an IPv6 address */
void config_hostport_str(const char *host, const char *port, char *out, size_t outlen)
{
	snprintf(out, outlen, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
}

/* an IPv6 address, with an optional %zone (fe80::1%eth0) */
static bool config_ipv6(const char *host)
{
	char addr[INET6_ADDRSTRLEN];
	struct in6_addr in6;
	size_t n = strcspn(host, "%");
	if (n >= sizeof(addr))
		return false;
	memcpy(addr, host, n);
	addr[n] = '\0';
	return inet_pton(AF_INET6, addr, &in6) == 1;
}

/* split "host:port" or "[v6]:port" */
static int config_hostport(struct config_ctx *x, const char *s, char *host, size_t hostlen,
			   char *port, size_t portlen)
{
	const char *colon, *arg = s;
	size_t hl;
	bool bracketed = s[0] == '[';
	if (bracketed) {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			return config_error(x, "expected [IPv6]:PORT, got \"%s\"", s);
		hl = (size_t)(rb - s - 1);
		s++;
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon || strchr(s, ':') != colon)
			return config_error(x, "expected HOST:PORT, got \"%s\"", s);
		hl = (size_t)(colon - s);
	}
	if (hl == 0 || hl >= hostlen)
		return config_error(x, "bad host in \"%s\"", s);
	memcpy(host, s, hl);
	host[hl] = '\0';
	if (bracketed && !config_ipv6(host))
		return config_error(x, "brackets hold an IPv6 address, got \"%s\"", arg);
	const char *p = colon + 1;
	char *end;
	long v = strtol(p, &end, 10);
	if (*p == '\0' || *end || v < 1 || v > 65535 || strlen(p) >= portlen)
		return config_error(x, "bad port in \"%s\" (1-65535)", s);
	snprintf(port, portlen, "%s", p);
	return 0;
}

/* make a path absolute relative to the config file's folder */
static int config_path(struct config_ctx *x, const char *v, char *out, size_t outlen)
{
	int n;
	if (v[0] == '/')
		n = snprintf(out, outlen, "%s", v);
	else
		n = snprintf(out, outlen, "%s/%s", x->c->dir, v);
	if (n < 0 || (size_t)n >= outlen)
		return config_error(x, "path too long");
	return 0;
}

static int config_bool(struct config_ctx *x, const char *v, bool *out)
{
	if (!strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "true"))
		*out = true;
	else if (!strcmp(v, "no") || !strcmp(v, "off") || !strcmp(v, "false"))
		*out = false;
	else
		return config_error(x, "expected yes or no, got \"%s\"", v);
	return 0;
}

static int config_listen(struct config_ctx *x, int argc, char **argv)
{
	struct config *c = x->c;
	if (argc != 3)
		return config_error(x, "expected: listen ADDRESS:PORT starttls|tls|plain");
	if (c->nlisten == CONFIG_MAX_LISTEN)
		return config_error(x, "too many listen lines (at most %d)", CONFIG_MAX_LISTEN);
	struct listen_cfg *l = &c->listen[c->nlisten];
	if (config_hostport(x, argv[1], l->host, sizeof(l->host), l->port, sizeof(l->port)) < 0)
		return -1;
	if (!strcmp(argv[2], "starttls"))
		l->mode = LISTEN_STARTTLS;
	else if (!strcmp(argv[2], "tls"))
		l->mode = LISTEN_TLS;
	else if (!strcmp(argv[2], "plain"))
		l->mode = LISTEN_PLAIN;
	else
		return config_error(x, "listen mode must be starttls, tls or plain, got \"%s\"", argv[2]);
	if (l->mode == LISTEN_PLAIN && strcmp(l->host, "127.0.0.1") && strcmp(l->host, "::1") &&
	    strcmp(l->host, "localhost"))
		return config_error(x, "listen mode plain is allowed on loopback addresses only");
	l->line = x->line;
	c->nlisten++;
	return 0;
}

static int config_rate(struct config_ctx *x, const char *v, struct upstream_cfg *u)
{
	char *end;
	long n = strtol(v, &end, 10);
	if (end == v || n <= 0 || *end != '/')
		return config_error(x, "rate must look like 250/hour, got \"%s\"", v);
	if (n > CONFIG_RATE_MAX)
		return config_error(x, "rate= must be 1 to %d messages per unit, got \"%s\"", CONFIG_RATE_MAX, v);
	end++;
	if (!strcmp(end, "second") || !strcmp(end, "s"))
		u->rate_window = 1;
	else if (!strcmp(end, "minute") || !strcmp(end, "min"))
		u->rate_window = 60;
	else if (!strcmp(end, "hour") || !strcmp(end, "h"))
		u->rate_window = 3600;
	else if (!strcmp(end, "day") || !strcmp(end, "d"))
		u->rate_window = 86400;
	else
		return config_error(x, "rate unit must be second, minute, hour or day, got \"%s\"", end);
	u->rate_count = (unsigned)n;
	return 0;
}

/* an upstream's ca= or auth= file (empty, config_path would make it the config folder) */
static int config_upstream_file(struct config_ctx *x, const char *key, const char *v, char *out, size_t outlen)
{
	if (!*v)
		return config_error(x, "%s= needs a file name", key);
	return config_path(x, v, out, outlen);
}

static int config_upstream_opt(struct config_ctx *x, struct upstream_cfg *u, const char *opt)
{
	const char *eq = strchr(opt, '=');
	if (!eq)
		return config_error(x, "expected key=value on the upstream line, got \"%s\"", opt);
	const char *v = eq + 1;
	size_t kl = (size_t)(eq - opt);
	if (kl == 3 && !strncmp(opt, "tls", kl)) {
		if (!strcmp(v, "starttls"))
			u->tls = UPSTREAM_TLS_STARTTLS;
		else if (!strcmp(v, "implicit"))
			u->tls = UPSTREAM_TLS_IMPLICIT;
		else if (!strcmp(v, "none"))
			u->tls = UPSTREAM_TLS_NONE;
		else
			return config_error(x, "tls= must be starttls, implicit or none, got \"%s\"", v);
	} else if (kl == 6 && !strncmp(opt, "verify", kl)) {
		return config_bool(x, v, &u->verify);
	} else if (kl == 2 && !strncmp(opt, "ca", kl)) {
		return config_upstream_file(x, "ca", v, u->ca, sizeof(u->ca));
	} else if (kl == 4 && !strncmp(opt, "auth", kl)) {
		return config_upstream_file(x, "auth", v, u->auth_file, sizeof(u->auth_file));
	} else if (kl == 4 && !strncmp(opt, "rate", kl)) {
		return config_rate(x, v, u);
	} else if (kl == 11 && !strncmp(opt, "connections", kl)) {
		char *end;
		long n = strtol(v, &end, 10);
		if (end == v || *end || n < 1 || n > 100)
			return config_error(x, "connections= must be 1 to 100, got \"%s\"", v);
		u->max_connections = (unsigned)n;
	} else {
		return config_error(x, "unknown upstream option \"%.*s\" (tls, verify, ca, auth, rate, connections)",
				    (int)kl, opt);
	}
	return 0;
}

static int config_upstream(struct config_ctx *x, int argc, char **argv)
{
	struct config *c = x->c;
	if (argc < 2)
		return config_error(x, "expected: upstream HOST:PORT [tls=starttls|implicit|none] [verify=yes|no] [ca=FILE] [auth=FILE] [rate=N/hour]");
	if (c->nupstream == CONFIG_MAX_UPSTREAM)
		return config_error(x, "too many upstream lines (at most %d)", CONFIG_MAX_UPSTREAM);
	struct upstream_cfg *u = &c->upstream[c->nupstream];
	memset(u, 0, sizeof(*u));
	u->tls = UPSTREAM_TLS_STARTTLS;
	u->verify = true;
	u->max_connections = 4;
	if (config_hostport(x, argv[1], u->host, sizeof(u->host), u->port, sizeof(u->port)) < 0)
		return -1;
	for (int i = 2; i < argc; i++)
		if (config_upstream_opt(x, u, argv[i]) < 0)
			return -1;
	u->line = x->line;
	c->nupstream++;
	return 0;
}

static int config_string(struct config_ctx *x, int argc, char **argv, char *out, size_t outlen)
{
	if (argc != 2)
		return config_error(x, "%s takes one value", argv[0]);
	if (strlen(argv[1]) >= outlen)
		return config_error(x, "%s: value too long", argv[0]);
	snprintf(out, outlen, "%s", argv[1]);
	return 0;
}

/* a domain name as RFC 5321 writes one (sub-domain *("." sub-domain)): labels of 1 to 63
 * letters, digits and hyphens, not beginning or ending with a hyphen; 253 characters in all */
static bool config_domain(const char *s)
{
	size_t total = strlen(s);
	if (total == 0 || total > 253)
		return false;
	for (const char *label = s;; label++) {
		size_t n = strspn(label, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-");
		if (n == 0 || n > 63 || label[0] == '-' || label[n - 1] == '-')
			return false;
		label += n;
		if (!*label)
			return true;
		if (*label != '.')
			return false;
	}
}

/* hostname goes into the greeting, the EHLO reply, Received: and Message-ID: */
static int config_hostname(struct config_ctx *x, int argc, char **argv)
{
	if (config_string(x, argc, argv, x->c->hostname, sizeof(x->c->hostname)) < 0)
		return -1;
	if (!config_domain(x->c->hostname))
		return config_error(x, "hostname: \"%s\" is not a domain name (letters, digits and hyphens in labels "
				    "of 1 to 63 characters, joined by dots; at most 253 characters)", x->c->hostname);
	return 0;
}

static int config_unsigned(struct config_ctx *x, int argc, char **argv, unsigned *out, long long max,
			   long long (*parse)(const char *))
{
	if (argc != 2)
		return config_error(x, "%s takes one value", argv[0]);
	long long v = parse ? parse(argv[1]) : -1;
	if (!parse) {
		char *end;
		v = strtoll(argv[1], &end, 10);
		if (*end || end == argv[1])
			v = -1;
	}
	if (v < 0 || v > max)
		return config_error(x, "%s: bad value \"%s\"", argv[0], argv[1]);
	*out = (unsigned)v;
	return 0;
}

/* an unsigned from 1 to max: 0 would refuse every session, recipient or command */
static int config_positive(struct config_ctx *x, int argc, char **argv, unsigned *out, long long max)
{
	if (config_unsigned(x, argc, argv, out, max, NULL) < 0)
		return -1;
	return *out ? 0 : config_error(x, "%s must be at least 1", argv[0]);
}

/* a size of at least 1k: "35M", "512k" (example: a value to show in the error) */
static int config_size(struct config_ctx *x, int argc, char **argv, size_t *out, const char *example)
{
	long long v = argc == 2 ? config_parse_size(argv[1]) : -1;
	if (v < 1024)
		return config_error(x, "%s: expected a size such as %s (at least 1k)", argv[0], example);
	*out = (size_t)v;
	return 0;
}

/* "100/hour", "50M/day" (the unit is minute, hour or day) */
static int config_limit(struct config_ctx *x, int argc, char **argv, unsigned long long *limit, unsigned *window)
{
	uint64_t l;
	uint32_t w;
	if (argc != 2 || ratelimit_parse(argv[1], &l, &w) < 0)
		return config_error(x, "%s: expected N/minute, N/hour or N/day (0 = unlimited)", argv[0]);
	*limit = l;
	*window = w;
	return 0;
}

static int config_directive(struct config_ctx *x, int argc, char **argv)
{
	struct config *c = x->c;
	const char *d = argv[0];

	if (!strcmp(d, "listen"))
		return config_listen(x, argc, argv);
	if (!strcmp(d, "upstream"))
		return config_upstream(x, argc, argv);
	if (!strcmp(d, "hostname"))
		return config_hostname(x, argc, argv);
	if (!strcmp(d, "user"))
		return config_string(x, argc, argv, c->user, sizeof(c->user));
	if (argc == 2 && !strcmp(d, "tls_cert")) {
		if (c->ncert == CONFIG_MAX_CERTS)
			return config_error(x, "at most %d tls_cert lines", CONFIG_MAX_CERTS);
		return config_path(x, argv[1], c->tls_cert[c->ncert++], sizeof(c->tls_cert[0]));
	}
	if (argc == 2 && !strcmp(d, "tls_key")) {
		if (c->nkey == CONFIG_MAX_CERTS)
			return config_error(x, "at most %d tls_key lines", CONFIG_MAX_CERTS);
		return config_path(x, argv[1], c->tls_key[c->nkey++], sizeof(c->tls_key[0]));
	}
	if (argc == 2 && !strcmp(d, "database"))
		return config_path(x, argv[1], c->database, sizeof(c->database));
	if (argc == 2 && !strcmp(d, "queue"))
		return config_path(x, argv[1], c->queue, sizeof(c->queue));
	if (argc == 2 && !strcmp(d, "pidfile"))
		return config_path(x, argv[1], c->pidfile, sizeof(c->pidfile));
	if (argc == 2 && !strcmp(d, "control"))
		return config_path(x, argv[1], c->control, sizeof(c->control));
	if (!strcmp(d, "max_message_size"))
		return config_size(x, argc, argv, &c->max_message_size, "35M");
	if (!strcmp(d, "message_memory"))
		return config_size(x, argc, argv, &c->message_memory, "512M");
	if (!strcmp(d, "max_recipients"))
		return config_positive(x, argc, argv, &c->max_recipients, 100000);
	if (!strcmp(d, "max_errors"))
		return config_positive(x, argc, argv, &c->max_errors, 1000);
	if (!strcmp(d, "max_junk_commands"))
		return config_positive(x, argc, argv, &c->max_junk_commands, 100000);
	if (!strcmp(d, "max_sessions"))
		return config_positive(x, argc, argv, &c->max_sessions, 1000000);
	if (!strcmp(d, "timeout_idle"))
		return config_unsigned(x, argc, argv, &c->timeout_idle, 86400, config_parse_duration);
	if (!strcmp(d, "timeout_session"))
		return config_unsigned(x, argc, argv, &c->timeout_session, 86400 * 7, config_parse_duration);
	if (!strcmp(d, "upstream_timeout"))
		return config_unsigned(x, argc, argv, &c->upstream_timeout, 3600, config_parse_duration);
	if (!strcmp(d, "retry_min"))
		return config_unsigned(x, argc, argv, &c->retry_min, 86400, config_parse_duration);
	if (!strcmp(d, "retry_max"))
		return config_unsigned(x, argc, argv, &c->retry_max, 86400 * 7, config_parse_duration);
	if (!strcmp(d, "queue_lifetime"))
		return config_unsigned(x, argc, argv, &c->queue_lifetime, 86400 * 60, config_parse_duration);
	if (!strcmp(d, "delay_warning"))
		return config_unsigned(x, argc, argv, &c->delay_warning, 86400 * 60, config_parse_duration);
	if (!strcmp(d, "auth_cache_ttl"))
		return config_unsigned(x, argc, argv, &c->auth_cache_ttl, 86400, config_parse_duration);
	if (!strcmp(d, "metrics")) {
		if (argc != 2)
			return config_error(x, "expected: metrics ADDRESS:PORT");
		return config_hostport(x, argv[1], c->metrics_host, sizeof(c->metrics_host), c->metrics_port,
				       sizeof(c->metrics_port));
	}
	if (!strcmp(d, "tls_threads")) {
		if (argc == 2 && !strcmp(argv[1], "auto")) {
			c->tls_threads = CONFIG_TLS_THREADS_AUTO;
			return 0;
		}
		return config_unsigned(x, argc, argv, &c->tls_threads, 8, NULL);
	}
	if (!strcmp(d, "drain_timeout"))
		return config_unsigned(x, argc, argv, &c->drain_timeout, 3600, config_parse_duration);
	if (!strcmp(d, "limit_msgs"))
		return config_limit(x, argc, argv, &c->limit_msgs, &c->limit_msgs_window);
	if (!strcmp(d, "limit_rcpts"))
		return config_limit(x, argc, argv, &c->limit_rcpts, &c->limit_rcpts_window);
	if (!strcmp(d, "limit_bytes"))
		return config_limit(x, argc, argv, &c->limit_bytes, &c->limit_bytes_window);
	if (!strcmp(d, "max_conn_per_ip"))
		return config_unsigned(x, argc, argv, &c->max_conn_per_ip, 1000000, NULL);
	if (!strcmp(d, "max_conn_rate_per_ip"))
		return config_unsigned(x, argc, argv, &c->max_conn_rate_per_ip, 1000000, NULL);
	if (!strcmp(d, "auth_fail_limit"))
		return config_unsigned(x, argc, argv, &c->auth_fail_limit, 1000, NULL);
	if (!strcmp(d, "auth_lockout"))
		return config_unsigned(x, argc, argv, &c->auth_lockout, 86400 * 7, config_parse_duration);
	if (!strcmp(d, "ipv6_prefix_length")) {
		if (argc == 2 && atoi(argv[1]) < 16)
			return config_error(x, "ipv6_prefix_length: bad value \"%s\" (16 to 128)", argv[1]);
		return config_unsigned(x, argc, argv, &c->ipv6_prefix_length, 128, NULL);
	}
	if (!strcmp(d, "limit_loopback")) {
		if (argc != 2)
			return config_error(x, "limit_loopback takes yes or no");
		return config_bool(x, argv[1], &c->limit_loopback);
	}
	if (!strcmp(d, "check_header_from")) {
		if (argc != 2)
			return config_error(x, "check_header_from takes yes or no");
		return config_bool(x, argv[1], &c->check_header_from);
	}
	if (argc != 2 && (!strcmp(d, "tls_cert") || !strcmp(d, "tls_key") || !strcmp(d, "database") ||
			  !strcmp(d, "queue") || !strcmp(d, "pidfile") || !strcmp(d, "control")))
		return config_error(x, "%s takes one path", d);
	return config_error(x, "unknown directive \"%s\"", d);
}

/* remember that directive d was read on the current line */
static void config_mark(struct config_ctx *x, const char *d)
{
	int i = 0;
	while (i < x->nseen && strcmp(x->seen[i].name, d))
		i++;
	if (i == x->nseen) {
		if (x->nseen == CONFIG_MAX_SEEN || strlen(d) >= sizeof(x->seen[0].name))
			return;
		snprintf(x->seen[x->nseen++].name, sizeof(x->seen[0].name), "%s", d);
	}
	x->seen[i].line = x->line;
}

/* the last line directive d was on, 0 when it was not in the file */
static int config_line_of(const struct config_ctx *x, const char *d)
{
	for (int i = 0; i < x->nseen; i++)
		if (!strcmp(x->seen[i].name, d))
			return x->seen[i].line;
	return 0;
}

/* point an error found after reading at the later of directives a and b (b may be NULL); when
 * neither is in the file, at its last line, where the missing line would go */
static void config_check_at(struct config_ctx *x, const char *a, const char *b)
{
	int la = config_line_of(x, a), lb = b ? config_line_of(x, b) : 0;
	x->line = la > lb ? la : lb;
	if (!x->line)
		x->line = x->lines;
}

/* is the line fgets just read longer than CONFIG_LINE_MAX? */
static bool config_too_long(const char *line, FILE *f)
{
	size_t len = strcspn(line, "\n");
	if (!line[len] && !feof(f))
		return true; /* the buffer filled before the end of the line */
	if (len && line[len - 1] == '\r')
		len--;
	return len > CONFIG_LINE_MAX;
}

/* split a line into words; strips the comment */
static int config_split(char *line, char **argv)
{
	int argc = 0;
	char *hash = strchr(line, '#');
	if (hash)
		*hash = '\0';
	for (char *p = line; *p;) {
		while (*p && isspace((unsigned char)*p))
			*p++ = '\0';
		if (!*p)
			break;
		if (argc == CONFIG_MAX_WORDS)
			return -1;
		argv[argc++] = p;
		while (*p && !isspace((unsigned char)*p))
			p++;
	}
	return argc;
}

/* the memory.max of the cgroup (v2) this process runs in, 0 when there is none or no limit */
static size_t config_cgroup_memory_max(void)
{
	char line[4096], path[4200];
	size_t max = 0;
	FILE *f = fopen("/proc/self/cgroup", "r");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "0::", 3)) {
			line[strcspn(line, "\n")] = '\0';
			snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.max", line + 3);
			FILE *m = fopen(path, "r");
			unsigned long long v;
			if (m && fscanf(m, "%llu", &v) == 1) /* "max" (no limit) does not scan */
				max = (size_t)v;
			if (m)
				fclose(m);
		}
	fclose(f);
	return max;
}

/* a quarter of the machine's memory (or of the cgroup's limit, when lower), but never less
 * than one message of the largest size */
static size_t config_default_message_memory(size_t max_message_size)
{
	long pages = sysconf(_SC_PHYS_PAGES), pagesize = sysconf(_SC_PAGESIZE);
	size_t mem = pages > 0 && pagesize > 0 ? (size_t)pages * (size_t)pagesize : 0, limit = config_cgroup_memory_max();
	if (limit && limit < mem)
		mem = limit;
	return mem / 4 > max_message_size ? mem / 4 : max_message_size;
}

static int config_check(struct config_ctx *x)
{
	struct config *c = x->c;
	config_check_at(x, "listen", NULL);
	if (c->nlisten == 0)
		return config_error(x, "no listen line");
	for (int i = 0; i < c->nlisten; i++)
		if (c->listen[i].mode != LISTEN_PLAIN && (!c->ncert || !c->nkey)) {
			x->line = c->listen[i].line;
			return config_error(x, "a %s listener needs tls_cert and tls_key",
					    config_listen_mode_str(c->listen[i].mode));
		}
	config_check_at(x, "tls_cert", "tls_key");
	if (c->ncert != c->nkey)
		return config_error(x, "every tls_cert needs its tls_key (%d tls_cert, %d tls_key lines)", c->ncert, c->nkey);
	config_check_at(x, "database", NULL);
	if (!c->database[0])
		return config_error(x, "no database line");
	config_check_at(x, "queue", NULL);
	if (!c->queue[0])
		return config_error(x, "no queue line");
	config_check_at(x, "timeout_idle", NULL);
	if (c->timeout_idle == 0) /* a session could then hold its slot for timeout_session */
		return config_error(x, "timeout_idle must be at least 1s");
	config_check_at(x, "timeout_session", NULL);
	if (c->timeout_session == 0)
		return config_error(x, "timeout_session must be at least 1s");
	config_check_at(x, "auth_lockout", NULL);
	if (c->auth_lockout == 0) /* failures would be forgotten at once: no lockout, no growing delay */
		return config_error(x, "auth_lockout must be at least 1s (auth_fail_limit 0 turns lockouts off)");
	config_check_at(x, "retry_min", "retry_max");
	if (c->retry_min == 0 || c->retry_max < c->retry_min)
		return config_error(x, "retry_min (%us) must be at least 1s and not above retry_max (%us)",
				    c->retry_min, c->retry_max);
	config_check_at(x, "queue_lifetime", NULL);
	if (c->queue_lifetime == 0) /* a message an upstream never takes would stay queued for ever */
		return config_error(x, "queue_lifetime must be at least 1s");
	config_check_at(x, "message_memory", "max_message_size");
	if (!c->message_memory)
		c->message_memory = config_default_message_memory(c->max_message_size);
	else if (c->message_memory < c->max_message_size)
		return config_error(x, "message_memory (%zu bytes) must be at least max_message_size (%zu): "
				    "a message of the largest size could never be taken", c->message_memory, c->max_message_size);
	config_check_at(x, "control", "queue");
	if (!c->control[0]) {
		int n = snprintf(c->control, sizeof(c->control), "%s/control.sock", c->queue);
		if (n < 0 || (size_t)n >= sizeof(c->control))
			return config_error(x, "control socket path too long (from the queue path)");
	}
	return 0;
}

/* config_load - parse a config file */
int config_load(const char *path, struct config *c, char *err, size_t errlen)
{
	struct config_ctx x = { .c = c, .file = path, .line = 0, .err = err, .errlen = errlen };
	char buf[CONFIG_LINE_MAX + 6]; /* and a BOM, CR, LF, NUL */
	char *argv[CONFIG_MAX_WORDS];

	config_defaults(c);
	snprintf(c->path, sizeof(c->path), "%s", path);
	FILE *f = fopen(path, "r");
	if (!f)
		return config_error(&x, "cannot open: %s", strerror(errno));
	if (path[0] == '/' || strchr(path, '/')) {
		char tmp[PATH_MAX];
		snprintf(tmp, sizeof(tmp), "%s", path);
		char *slash = strrchr(tmp, '/');
		*slash = '\0';
		if (tmp[0] != '/' ) {
			char cwd[PATH_MAX];
			if (!getcwd(cwd, sizeof(cwd)))
				cwd[0] = '\0';
			snprintf(c->dir, sizeof(c->dir), "%.2000s/%.2000s", cwd, tmp);
		} else {
			snprintf(c->dir, sizeof(c->dir), "%s", tmp[0] ? tmp : "/");
		}
	} else if (!getcwd(c->dir, sizeof(c->dir))) {
		snprintf(c->dir, sizeof(c->dir), ".");
	}
	int rc = 0;
	while (fgets(buf, sizeof(buf), f)) {
		x.line++;
		char *line = buf;
		if (x.line == 1 && !strncmp(line, "\xef\xbb\xbf", 3))
			line += 3; /* a UTF-8 byte order mark, as some editors write */
		if (config_too_long(line, f)) {
			rc = config_error(&x, "line too long (at most %d characters)", CONFIG_LINE_MAX);
			break;
		}
		int argc = config_split(line, argv);
		if (argc < 0) {
			rc = config_error(&x, "too many words");
			break;
		}
		if (argc == 0)
			continue;
		if (config_directive(&x, argc, argv) < 0) {
			rc = -1;
			break;
		}
		config_mark(&x, argv[0]);
	}
	fclose(f);
	x.lines = x.line;
	if (rc == 0)
		rc = config_check(&x);
	return rc;
}
