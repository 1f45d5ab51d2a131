/*
 * config-t - unit tests of relayd.conf parsing and its error messages.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../relayd/config.h"
#include "tap.h"

static char dir[] = "/tmp/config-t.XXXXXX";

static int load(const char *text, struct config *c, char *err, size_t errlen)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/relayd.conf", dir);
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
	return config_load(path, c, err, errlen);
}

#define BASE "listen 127.0.0.1:2587 starttls\ntls_cert c.pem\ntls_key k.pem\ndatabase db.sqlite\nqueue q\n"

int main(void)
{
	struct config c;
	char err[512] = "", want[512];
	int rc;
	if (!mkdtemp(dir))
		return 1;

	ok(load(BASE "listen [::1]:2465 tls # implicit\nupstream smtp.example.net:587 tls=starttls auth=up.secret rate=250/hour\n"
		"max_message_size 10M\ntimeout_idle 5m\n", &c, err, sizeof(err)) == 0, "a full config loads: %s", err);
	is_int(c.nlisten, 2, "two listeners");
	is_str(c.listen[1].host, "::1", "IPv6 host without brackets");
	is_str(c.listen[1].port, "2465", "port");
	ok(c.listen[1].mode == LISTEN_TLS, "tls mode");
	is_int(c.nupstream, 1, "one upstream");
	ok(c.upstream[0].verify, "verify defaults to yes");
	is_int((int)c.upstream[0].rate_count, 250, "rate count");
	is_int((int)c.upstream[0].rate_window, 3600, "rate window");
	snprintf(want, sizeof(want), "%s/up.secret", dir);
	is_str(c.upstream[0].auth_file, want, "auth path relative to the config folder");
	is_int((int)c.max_message_size, 10 * 1024 * 1024, "10M");
	is_int((int)c.timeout_idle, 300, "5m");
	snprintf(want, sizeof(want), "%s/db.sqlite", dir);
	is_str(c.database, want, "database path made absolute");

	ok(load(BASE "listen 0.0.0.0:25 plain\n", &c, err, sizeof(err)) < 0, "plain on a public address refused");
	snprintf(want, sizeof(want), "%s/relayd.conf:6: listen mode plain is allowed on loopback addresses only", dir);
	is_str(err, want, "error names file and line");
	ok(load(BASE "bogus 1\n", &c, err, sizeof(err)) < 0 && strstr(err, ":6: unknown directive \"bogus\""),
	   "unknown directive: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 tls=maybe\n", &c, err, sizeof(err)) < 0 && strstr(err, "tls= must be"),
	   "bad tls= value: %s", err);
	ok(load(BASE "listen 127.0.0.1:99999 tls\n", &c, err, sizeof(err)) < 0 && strstr(err, "bad port"), "bad port: %s", err);
	ok(load("listen 127.0.0.1:2587 starttls\ndatabase d\nqueue q\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "tls_cert and tls_key"), "TLS listener without certificate: %s", err);
	ok(load("tls_cert c\ntls_key k\ndatabase d\nqueue q\n", &c, err, sizeof(err)) < 0 && strstr(err, "no listen line"),
	   "no listener: %s", err);
	/* checks made after reading name the line to look at: the directive that contradicts, the
	 * listener that lacks a certificate, or the last line where a missing one would go */
	ok(load("database d\nlisten 127.0.0.1:2587 plain\nlisten 127.0.0.1:2465 tls\nqueue q\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:3: a tls listener needs tls_cert and tls_key"), "line of the listener: %s", err);
	ok(load("tls_cert c\ntls_key k\ndatabase d\nqueue q\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:4: no listen line"), "missing listen: the last line: %s", err);
	ok(load("", &c, err, sizeof(err)) < 0 && strstr(err, "relayd.conf: no listen line"), "empty file: no line: %s", err);
	ok(load(BASE "tls_cert c2.pem\n# end\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: every tls_cert needs its tls_key"), "unpaired tls_cert: its line: %s", err);
	ok(load("retry_max 10m\n" BASE "retry_min 1h\n\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:7: retry_min (3600s) must be at least 1s and not above retry_max (600s)"),
	   "retry_min above retry_max: the later line: %s", err);
	ok(load(BASE "message_memory 1M\ntimeout_idle 5m\nmax_message_size 2M\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:8: message_memory (1048576 bytes) must be at least max_message_size"),
	   "message_memory below max_message_size: the later line: %s", err);
	ok(load(BASE "message_memory 1M\n", &c, err, sizeof(err)) < 0 && strstr(err, "relayd.conf:6: message_memory"),
	   "message_memory below the default max_message_size: its line: %s", err);
	ok(load(BASE "timeout_idle 0\n", &c, err, sizeof(err)) < 0 && strstr(err, "relayd.conf:6: timeout_idle must be at least 1s"),
	   "timeout_idle 0 (no idle timeout at all) refused: %s", err);
	ok(load(BASE "timeout_session 0s\n", &c, err, sizeof(err)) < 0 && strstr(err, "timeout_session must be at least 1s"),
	   "timeout_session 0 refused: %s", err);
	const char *positive[] = { "max_sessions", "max_errors", "max_recipients", "max_junk_commands" };
	for (size_t i = 0; i < sizeof(positive) / sizeof(*positive); i++) {
		char line[256], expect[96];
		snprintf(line, sizeof(line), BASE "%s 0\n", positive[i]);
		snprintf(expect, sizeof(expect), "relayd.conf:6: %s must be at least 1", positive[i]);
		ok(load(line, &c, err, sizeof(err)) < 0 && strstr(err, expect), "%s 0 (refuse them all) refused: %s",
		   positive[i], err);
		snprintf(line, sizeof(line), BASE "%s 1\n", positive[i]);
		ok(load(line, &c, err, sizeof(err)) == 0, "%s 1 loads", positive[i]);
	}
	ok(load(BASE, &c, err, sizeof(err)) == 0 && c.max_junk_commands == 100, "max_junk_commands defaults to 100");
	ok(load(BASE "max_junk_commands 100000\n", &c, err, sizeof(err)) == 0 && c.max_junk_commands == 100000,
	   "max_junk_commands 100000 loads: %s", err);
	ok(load(BASE "max_junk_commands 100001\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: max_junk_commands: bad value \"100001\""), "max_junk_commands 100001 refused: %s", err);
	ok(load(BASE "max_junk_commands -1\n", &c, err, sizeof(err)) < 0 && strstr(err, "max_junk_commands: bad value"),
	   "max_junk_commands -1 refused: %s", err);
	ok(load(BASE "auth_lockout 0\n# end\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: auth_lockout must be at least 1s (auth_fail_limit 0 turns lockouts off)"),
	   "auth_lockout 0 (no lockout and no growing delay) refused: %s", err);
	ok(load(BASE "auth_fail_limit 0\n", &c, err, sizeof(err)) == 0 && c.auth_fail_limit == 0 && c.auth_lockout == 900,
	   "auth_fail_limit 0 (no lockout) accepted: %s", err);
	ok(load(BASE "queue_lifetime 0\nretry_max 1h\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: queue_lifetime must be at least 1s"),
	   "queue_lifetime 0 (never bounce) refused: %s", err);
	ok(load(BASE "queue_lifetime 3s\n", &c, err, sizeof(err)) == 0 && c.queue_lifetime == 3,
	   "queue_lifetime 3s (the tests' short lifetimes) accepted: %s", err);
	/* relayd.conf.5: 4095 characters a line, not counting its LF or CRLF */
	static char text[sizeof(BASE) + 4200];
	for (int len = 4094; len <= 4096; len++)
		for (int crlf = 0; crlf <= 1; crlf++) {
			int n = snprintf(text, sizeof(text), BASE "hostname relay.test #");
			int pad = len - (n - (int)strlen(BASE));
			memset(text + n, 'a', (size_t)pad);
			snprintf(text + n + pad, sizeof(text) - (size_t)(n + pad), "%s# end\n", crlf ? "\r\n" : "\n");
			rc = load(text, &c, err, sizeof(err));
			if (len <= 4095)
				ok(rc == 0, "a line of %d characters and %s loads: %s", len, crlf ? "CRLF" : "LF", err);
			else
				ok(rc < 0 && strstr(err, "relayd.conf:6: line too long (at most 4095 characters)"),
				   "a line of %d characters and %s refused: %s", len, crlf ? "CRLF" : "LF", err);
		}
	/* relayd.conf.5: tls_cert and tls_key accumulate; any other directive repeated, the last wins */
	ok(load(BASE "tls_cert c2.pem\ntls_key k2.pem\nhostname a.test\nhostname b.test\n", &c, err, sizeof(err)) == 0 &&
	   c.ncert == 2 && c.nkey == 2 && !strcmp(c.hostname, "b.test"),
	   "two tls_cert/tls_key pairs kept, the last hostname wins: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 rate=5000000000/hour\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: rate= must be 1 to 1000000 messages per unit, got \"5000000000/hour\""),
	   "rate=5000000000/hour (was truncated to 32 bits) refused: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 rate=1000000/second\n", &c, err, sizeof(err)) == 0 &&
	   c.upstream[0].rate_count == 1000000 && c.upstream[0].rate_window == 1, "rate=1000000/second: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 auth=\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: auth= needs a file name"), "empty auth= (was the config folder) refused: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 ca=\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: ca= needs a file name"), "empty ca= refused: %s", err);
	ok(load(BASE "listen [localhost]:25 starttls\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "relayd.conf:6: brackets hold an IPv6 address, got \"[localhost]:25\""),
	   "listen [localhost]:25 refused: %s", err);
	ok(load(BASE "upstream [192.0.2.1]:25\n", &c, err, sizeof(err)) < 0 && strstr(err, "brackets hold an IPv6 address"),
	   "upstream [192.0.2.1]:25 refused: %s", err);
	ok(load(BASE "listen [::]:25 starttls\nupstream [2001:db8::1]:25\nmetrics [::1]:9100\n", &c, err, sizeof(err)) == 0 &&
	   !strcmp(c.listen[1].host, "::") && !strcmp(c.upstream[0].host, "2001:db8::1") && !strcmp(c.metrics_host, "::1"),
	   "[::]:25, [2001:db8::1]:25 and [::1]:9100 load: %s", err);
	ok(load(BASE "upstream [fe80::1%eth0]:25\n", &c, err, sizeof(err)) == 0 && !strcmp(c.upstream[0].host, "fe80::1%eth0"),
	   "a link-local address with its zone loads: %s", err);
	/* hostname goes into the greeting, Received: and Message-ID: a domain name (RFC 5321 Domain) */
	static const char *bad_names[] = { "a<b>@c", "my_host.test", "-relay.test", "relay-.test", "relay..test",
					   "relay.test.", ".relay.test", "r\xc3\xa9lay.test" };
	for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
		snprintf(text, sizeof(text), BASE "hostname %s\n", bad_names[i]);
		ok(load(text, &c, err, sizeof(err)) < 0 && strstr(err, "relayd.conf:6: hostname: \"") &&
		   strstr(err, "\" is not a domain name"), "hostname %s refused: %s", bad_names[i], err);
	}
	char label[64], name[300];
	memset(label, 'a', 63);
	label[63] = '\0';
	snprintf(name, sizeof(name), "%s.%s.%s.%.61s", label, label, label, label); /* 253 */
	snprintf(text, sizeof(text), BASE "hostname %s\n", name);
	ok(load(text, &c, err, sizeof(err)) == 0 && strlen(c.hostname) == 253, "a 253-character name of 63-character labels: %s", err);
	snprintf(text, sizeof(text), BASE "hostname %s.%s.%s.%.62s\n", label, label, label, label); /* 254 */
	ok(load(text, &c, err, sizeof(err)) < 0 && strstr(err, "is not a domain name"), "a 254-character name refused");
	snprintf(text, sizeof(text), BASE "hostname a%s.test\n", label);
	ok(load(text, &c, err, sizeof(err)) < 0 && strstr(err, "is not a domain name"), "a 64-character label refused");
	ok(load(BASE "hostname Relay-1.Example.org\n", &c, err, sizeof(err)) == 0 && !strcmp(c.hostname, "Relay-1.Example.org"),
	   "hostname Relay-1.Example.org: %s", err);
	ok(load(BASE "hostname localhost\n", &c, err, sizeof(err)) == 0, "hostname localhost (the default): %s", err);
	/* a UTF-8 byte order mark, as some Windows editors write, is skipped at the start of the file only */
	ok(load("\xef\xbb\xbf" BASE, &c, err, sizeof(err)) == 0 && c.nlisten == 1, "a leading BOM is skipped: %s", err);
	snprintf(text, sizeof(text), "\xef\xbb\xbfhostname relay.test #%4074d\n" BASE, 1); /* 4095 after the BOM */
	ok(load(text, &c, err, sizeof(err)) == 0, "a BOM is not counted in the first line's 4095 characters: %s", err);
	ok(load(BASE "\xef\xbb\xbfhostname relay.test\n", &c, err, sizeof(err)) < 0 && strstr(err, "relayd.conf:6: unknown directive"),
	   "a BOM further down is not: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 connections=4x\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "connections= must be 1 to 100, got \"4x\""), "connections=4x refused: %s", err);
	ok(load(BASE "upstream smtp.example.net:587 connections=4\n", &c, err, sizeof(err)) == 0 &&
	   c.upstream[0].max_connections == 4, "connections=4: %s", err);
	ok(load(BASE, &c, err, sizeof(err)) == 0 && c.upstream_timeout == 0, "upstream_timeout unset: RFC 5321's waits");
	ok(load(BASE "upstream_timeout 2m\n", &c, err, sizeof(err)) == 0 && c.upstream_timeout == 120, "upstream_timeout 2m");
	ok(load(BASE "upstream_timeout 2h\n", &c, err, sizeof(err)) < 0, "upstream_timeout above 1h refused");
	ok(load(BASE "max_message_size lots\n", &c, err, sizeof(err)) < 0, "bad size refused");
	ok(load(BASE "message_memory 64M\n", &c, err, sizeof(err)) == 0 && c.message_memory == 64u << 20, "message_memory 64M");
	ok(load(BASE "max_message_size 2M\nmessage_memory 1M\n", &c, err, sizeof(err)) < 0 &&
	   strstr(err, "must be at least max_message_size"), "message_memory below max_message_size refused: %s", err);
	long pages = sysconf(_SC_PHYS_PAGES), pagesize = sysconf(_SC_PAGESIZE);
	rc = load(BASE, &c, err, sizeof(err));
	ok(rc == 0 && c.message_memory >= 35u << 20 && c.message_memory <= (size_t)pages * (size_t)pagesize / 4,
	   "message_memory defaults to at most a quarter of the memory, at least max_message_size (%zu MB)",
	   c.message_memory >> 20);
	config_hostport_str("::1", "25", want, sizeof(want));
	is_str(want, "[::1]:25", "an IPv6 host:port is written in brackets");
	config_hostport_str("smtp.example.net", "587", want, sizeof(want));
	is_str(want, "smtp.example.net:587", "a name:port as is");
	is_int((int)config_parse_size("35M"), 35 * 1024 * 1024, "35M");
	is_int((int)config_parse_size("10k"), 10240, "10k");
	ok(config_parse_size("-1") < 0, "negative size refused");
	is_int((int)config_parse_duration("2h"), 7200, "2h");
	ok(config_parse_duration("5x") < 0, "bad unit refused");

	ok(load(BASE, &c, err, sizeof(err)) == 0 && c.tls_threads == CONFIG_TLS_THREADS_AUTO, "tls_threads defaults to auto");
	ok(load(BASE "tls_threads 2\n", &c, err, sizeof(err)) == 0 && c.tls_threads == 2, "tls_threads 2");
	ok(load(BASE "tls_threads 1\ntls_threads auto\n", &c, err, sizeof(err)) == 0 &&
	   c.tls_threads == CONFIG_TLS_THREADS_AUTO, "tls_threads auto");
	ok(load(BASE "tls_threads 9\n", &c, err, sizeof(err)) < 0 && strstr(err, "bad value"), "tls_threads 9 refused: %s", err);
	ok(load(BASE "tls_threads some\n", &c, err, sizeof(err)) < 0, "tls_threads some refused");

	char path[300];
	snprintf(path, sizeof(path), "%s/relayd.conf", dir);
	unlink(path);
	rmdir(dir);
	return done_testing();
}
