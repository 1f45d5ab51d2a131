/*
 * config - relayd.conf: one directive per line, '#' starts a comment, repeatable
 * `listen` and `upstream`, up to CONFIG_MAX_CERTS `tls_cert`/`tls_key` pairs; any other
 * directive repeated: the last one wins. Relative paths are relative to the config file's folder.
 * Every error is reported as "FILE:LINE: what is wrong".
 */
#ifndef RELAYD_CONFIG_H
#define RELAYD_CONFIG_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>

#define CONFIG_TLS_THREADS_AUTO UINT_MAX /* tls_threads auto */

#define CONFIG_MAX_LISTEN   16
#define CONFIG_MAX_UPSTREAM 8
#define CONFIG_MAX_CERTS    4   /* tls_cert/tls_key pairs, e.g. ECDSA and RSA */

enum listen_mode { LISTEN_STARTTLS, LISTEN_TLS, LISTEN_PLAIN };
enum upstream_tls { UPSTREAM_TLS_STARTTLS, UPSTREAM_TLS_IMPLICIT, UPSTREAM_TLS_NONE };

struct listen_cfg {
	char host[256];           /* numeric address, "0.0.0.0", "::", "localhost" ... */
	char port[16];
	enum listen_mode mode;
	int line;
};

struct upstream_cfg {
	char host[256];
	char port[16];
	enum upstream_tls tls;
	bool verify;              /* verify chain and host name (default yes) */
	char ca[PATH_MAX];        /* CA file; empty = system trust store */
	char auth_file[PATH_MAX]; /* file with "username:password"; empty = no AUTH */
	unsigned rate_count;      /* pacing: rate_count messages per rate_window seconds; 0 = none */
	unsigned rate_window;
	unsigned max_connections; /* cap on parallel connections (default 4) */
	int line;
};

struct config {
	char path[PATH_MAX];
	char dir[PATH_MAX];
	char hostname[256];
	struct listen_cfg listen[CONFIG_MAX_LISTEN];
	int nlisten;
	struct upstream_cfg upstream[CONFIG_MAX_UPSTREAM];
	int nupstream;
	char tls_cert[CONFIG_MAX_CERTS][PATH_MAX]; /* paired with tls_key by order */
	char tls_key[CONFIG_MAX_CERTS][PATH_MAX];
	int ncert, nkey;
	char database[PATH_MAX];
	char queue[PATH_MAX];
	char user[64];            /* drop privileges to this user after binding; empty = stay */
	char pidfile[PATH_MAX];
	char control[PATH_MAX];   /* unix control socket; default QUEUE/control.sock */
	char metrics_host[256];   /* Prometheus listener; empty = off */
	char metrics_port[16];
	unsigned drain_timeout;   /* seconds SIGTERM waits for sessions in progress (default 30) */
	unsigned tls_threads;     /* server TLS handshake threads (0 = on the loop), or CONFIG_TLS_THREADS_AUTO
	                           * (the default): a thread per CPU for RSA keys, none for EC keys */

	size_t max_message_size;  /* SIZE, bytes (default 35 MiB) */
	size_t message_memory;    /* message bodies in transfer at once, bytes (0 in the file: a
				   * quarter of the machine's memory, at least max_message_size) */
	unsigned max_recipients;  /* per message (default 100) */
	unsigned timeout_idle;    /* seconds without a command (default 300) */
	unsigned timeout_session; /* total session seconds (default 3600) */
	unsigned upstream_timeout; /* forwarder: every wait for an upstream (0 = RFC 5321 §4.5.3.2's, the default) */
	unsigned max_errors;      /* bad commands before 421 (default 10) */
	unsigned max_junk_commands; /* commands without progress (NOOP, RSET...) before 421 (default 100) */
	unsigned max_sessions;    /* concurrent sessions (default 10000) */

	unsigned retry_min;       /* forwarding backoff, seconds (default 60) */
	unsigned retry_max;       /* (default 3600) */
	unsigned queue_lifetime;  /* seconds before a bounce (default 5 days, at least 1) */
	unsigned delay_warning;   /* seconds deferred before a "delayed" DSN (default 4h, 0 = off) */
	bool check_header_from;   /* check From: against allowed senders (default yes) */
	unsigned auth_cache_ttl;  /* verified-credential cache, seconds (default 300, 0 = off) */

	/* per-user limit defaults: N per window seconds; 0 = unlimited */
	unsigned long long limit_msgs, limit_rcpts, limit_bytes;
	unsigned limit_msgs_window, limit_rcpts_window, limit_bytes_window;
	unsigned max_conn_per_ip;      /* concurrent (default 20, 0 = off) */
	unsigned max_conn_rate_per_ip; /* new connections per minute (default 120, 0 = off) */
	bool limit_loopback;           /* apply per-IP limits to loopback too (default no) */
	unsigned ipv6_prefix_length;   /* IPv6 clients count as one per this prefix (default 64) */
	unsigned auth_fail_limit;      /* failures per IP or user name before lockout (default 5) */
	unsigned auth_lockout;         /* seconds (default 900, at least 1) */
};

/* config_defaults - fill c with the built-in defaults */
void config_defaults(struct config *c);
/* config_load - parse path into c; on error write "FILE:LINE: what" into err and return -1 */
int config_load(const char *path, struct config *c, char *err, size_t errlen);
/* config_parse_size - "35M", "1024", "10k" -> bytes; -1 if not a size */
long long config_parse_size(const char *s);
/* config_parse_duration - "30s", "5m", "2h", "5d", "60" -> seconds; -1 if not a duration */
long long config_parse_duration(const char *s);
/* config_hostport_str - host and port for logs and labels: "[::1]:25" for an IPv6 host, as
 * written in relayd.conf */
void config_hostport_str(const char *host, const char *port, char *out, size_t outlen);
/* config_listen_mode_str - "starttls" | "tls" | "plain" */
const char *config_listen_mode_str(enum listen_mode m);

#endif
