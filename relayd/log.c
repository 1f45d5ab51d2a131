/*
 * log - event lines to stderr or syslog.
 * Invariant: one call writes one whole line (a single write(2) on stderr), so lines from
 * worker threads never interleave. log_value() leaves nothing in a value that a terminal,
 * journalctl (which shows text that is not printable UTF-8 as a blob) or a key=value parser
 * could take for something else.
 */
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "utf8.h"

static int log_to_stderr = 1;
static int log_debug_on;

/* log_init - choose the destination */
void log_init(const char *ident, int to_stderr, int debug)
{
	log_to_stderr = to_stderr;
	log_debug_on = debug;
	if (!to_stderr)
		openlog(ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
}

static void log_vmsg(enum log_level lvl, const char *fmt, va_list ap)
{
	static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
	char line[2048];
	int off = 0;

	if (lvl == LOG_LVL_DEBUG && !log_debug_on)
		return;
	if (log_to_stderr) {
		struct timespec ts;
		struct tm tm;
		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		off = (int)strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
		off += snprintf(line + off, sizeof(line) - (size_t)off, ".%03ldZ ", ts.tv_nsec / 1000000);
	}
	int n = vsnprintf(line + off, sizeof(line) - (size_t)off - 1, fmt, ap);
	if (n < 0)
		return;
	off += n;
	if ((size_t)off > sizeof(line) - 2)
		off = (int)sizeof(line) - 2;
	if (log_to_stderr) {
		line[off++] = '\n';
		ssize_t w = write(STDERR_FILENO, line, (size_t)off);
		(void)w;
	} else {
		line[off] = '\0';
		syslog(prio[lvl], "%s", line);
	}
}

/* log_msg - write one event line */
void log_msg(enum log_level lvl, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vmsg(lvl, fmt, ap);
	va_end(ap);
}

/* fatal - log and exit */
void fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vmsg(LOG_LVL_ERR, fmt, ap);
	va_end(ap);
	exit(1);
}

/* log_value - escape a value */
const char *log_value(const char *in, char *out, size_t outlen)
{
	size_t o = 0;
	if (outlen == 0)
		return "";
	for (const char *p = in ? in : ""; *p;) {
		char esc[5];
		unsigned cp = 0;
		size_t n = utf8_char(p, &cp);
		const char *piece = p;
		size_t plen = n;
		if (n == 0 || cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)) {
			n = 1; /* one byte at a time: a C1 character is its two bytes */
			plen = (size_t)snprintf(esc, sizeof(esc), "\\x%02x", (unsigned char)*p);
			piece = esc;
		} else if (cp == '"' || cp == '\\') {
			esc[0] = '\\';
			esc[1] = (char)cp;
			plen = 2;
			piece = esc;
		}
		if (o + plen >= outlen)
			break;
		memcpy(out + o, piece, plen);
		o += plen;
		p += n;
	}
	out[o] = '\0';
	return out;
}

/* err_set - the caller's err buffer, when it gave one */
void err_set(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}
