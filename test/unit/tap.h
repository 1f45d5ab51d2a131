/*
 * tap - a tiny header-only TAP (Test Anything Protocol) producer for unit tests.
 *   plan(n);  ok(cond, "fmt", ...);  is_int(a, b, "name");  is_str(a, b, "name");
 *   diag("fmt", ...);  return done_testing();
 * Prints "1..N" then "ok N - name" / "not ok N - name"; diagnostics go to stdout as
 * "# ..." lines. done_testing() prints the plan if plan() was not called, and returns
 * the exit status: 0 when every test passed and the count matches the plan, else 1.
 * Static functions: include it from one .c file per test program.
 */
#ifndef RELAYD_TAP_H
#define RELAYD_TAP_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static int tap_planned = -1;
static int tap_run;
static int tap_failed;

/* plan - announce how many tests will run */
static inline void plan(int n)
{
	tap_planned = n;
	printf("1..%d\n", n);
	fflush(stdout);
}

static inline void tap_vdiag(const char *fmt, va_list ap)
{
	char line[1024];
	char *p, *nl;

	vsnprintf(line, sizeof(line), fmt, ap);
	for (p = line; p; p = nl) {
		nl = strchr(p, '\n');
		if (nl)
			*nl++ = '\0';
		printf("# %s\n", p);
		if (nl && !*nl)
			break;
	}
	fflush(stdout);
}

/* diag - print a diagnostic line ("# ...") */
static inline __attribute__((format(printf, 1, 2))) void diag(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	tap_vdiag(fmt, ap);
	va_end(ap);
}

static inline bool tap_vok(bool cond, const char *fmt, va_list ap)
{
	char name[512];

	vsnprintf(name, sizeof(name), fmt, ap);
	tap_run++;
	if (!cond)
		tap_failed++;
	printf("%sok %d - %s\n", cond ? "" : "not ", tap_run, name);
	fflush(stdout);
	return cond;
}

/* ok - one test: passes when cond is true */
static inline __attribute__((format(printf, 2, 3))) bool ok(bool cond, const char *fmt, ...)
{
	va_list ap;
	bool r;

	va_start(ap, fmt);
	r = tap_vok(cond, fmt, ap);
	va_end(ap);
	return r;
}

/* is_int - passes when a == b; shows both on failure */
static inline bool is_int(long long a, long long b, const char *name)
{
	bool r = ok(a == b, "%s", name);

	if (!r) {
		diag("     got: %lld", a);
		diag("expected: %lld", b);
	}
	return r;
}

/* is_str - passes when both strings are equal (or both NULL); shows both on failure */
static inline bool is_str(const char *a, const char *b, const char *name)
{
	bool same = (a && b) ? strcmp(a, b) == 0 : a == b;
	bool r = ok(same, "%s", name);

	if (!r) {
		diag("     got: %s%s%s", a ? "\"" : "", a ? a : "(null)", a ? "\"" : "");
		diag("expected: %s%s%s", b ? "\"" : "", b ? b : "(null)", b ? "\"" : "");
	}
	return r;
}

/* done_testing - finish; returns the exit status (0 all passed as planned, 1 otherwise) */
static inline int done_testing(void)
{
	if (tap_planned < 0)
		printf("1..%d\n", tap_run);
	else if (tap_planned != tap_run)
		diag("planned %d tests but ran %d", tap_planned, tap_run);
	if (tap_failed)
		diag("failed %d of %d tests", tap_failed, tap_run);
	fflush(stdout);
	return (tap_failed || (tap_planned >= 0 && tap_planned != tap_run)) ? 1 : 0;
}

#endif
