/*
 * fuzz_log_stub - log.c for the fuzz targets: every event line is formatted (so a bad
 * format argument still shows up under the sanitizers) but not written, which keeps the
 * fuzzer's output readable and fast. fatal() aborts so libFuzzer reports it as a crash.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"

void log_init(const char *ident, int to_stderr, int debug)
{
	(void)ident; (void)to_stderr; (void)debug;
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	(void)lvl;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
}

void fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}
