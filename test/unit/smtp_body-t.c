/*
 * smtp_body-t - the DATA/BDAT decoder: unstuffing, the end marker, smuggling variants,
 * the checks, and that feeding any split of the input gives the same result.
 */
#include <stdlib.h>
#include <string.h>

#include "../../relayd/smtp_body.h"
#include "tap.h"

struct result {
	struct buf out;
	size_t used;
	bool done;
	const char *err;
};

/* feed in pieces of `step` bytes, re-offering what was not consumed, like the session */
static void decode(const char *in, size_t n, size_t step, size_t max, struct result *r)
{
	struct smtp_body b;
	struct buf pending = { 0 };
	memset(r, 0, sizeof(*r));
	smtp_body_init(&b, &r->out, max);
	size_t fed = 0;
	while (!r->done && fed < n) {
		size_t k = n - fed < step ? n - fed : step;
		buf_append(&pending, in + fed, k);
		fed += k;
		size_t used = smtp_body_data(&b, pending.data, pending.len, &r->done);
		r->used += used;
		buf_consume(&pending, used);
	}
	r->used = fed - pending.len;
	r->err = smtp_body_error(&b);
	buf_free(&pending);
}

/* two bodies sharing a memory pool of 100 bytes */
static void pool_tests(void)
{
	size_t used = 0;
	struct smtp_body a, b;
	struct buf oa = { 0 }, ob = { 0 };
	smtp_body_init(&a, &oa, 1000);
	smtp_body_set_pool(&a, &used, 100);
	smtp_body_init(&b, &ob, 1000);
	smtp_body_set_pool(&b, &used, 100);
	bool done;
	smtp_body_data(&a, "0123456789012345678901234567890123456789012345678901234567\r\n", 60, &done);
	is_int((long long)used, 60, "pool: the first body's 60 bytes are counted");
	smtp_body_data(&b, "0123456789012345678901234567890123456789012345\r\n.\r\n", 53, &done);
	ok(done, "pool: the second body is read to its end all the same");
	is_str(smtp_body_error(&b), "452 4.3.1 Insufficient system storage", "pool: past it, 452 4.3.1 (try later)");
	ok(ob.len == 0 && !ob.data, "pool: and nothing of it is kept");
	is_int((long long)used, 60, "pool: the refused body holds nothing of the pool");
	smtp_body_release(&a);
	buf_free(&oa);
	is_int((long long)used, 0, "pool: a released body gives its bytes back");
	smtp_body_init(&b, &ob, 1000);
	smtp_body_set_pool(&b, &used, 100);
	smtp_body_chunk(&b, "0123456789012345678901234567890123456789012345\r\n", 48);
	ok(!smtp_body_error(&b) && ob.len == 48 && used == 48, "pool: the same message fits once the pool has room");
	smtp_body_chunk(&b, "\0", 1);
	smtp_body_chunk(&b, "0123456789012345678901234567890123456789012345678901234567890123456789", 70);
	is_str(smtp_body_error(&b), "554 5.6.0 Message contains NUL bytes",
	       "pool: a message that can never pass gets its permanent reply, not 452");
	is_int((long long)used, 0, "pool: and gave back what it held");
	buf_free(&ob);
	smtp_body_init(&a, &oa, 50);
	smtp_body_set_pool(&a, &used, 100);
	smtp_body_chunk(&a, "0123456789012345678901234567890123456789012345678901234567890123456789", 70);
	is_str(smtp_body_error(&a), "552 5.3.4 Message size exceeds fixed limit", "pool: over the size limit is 552");
	is_int((long long)used, 0, "pool: nothing held by it");
}

static void check(const char *name, const char *in, const char *want_out, bool want_done, const char *want_err)
{
	size_t n = strlen(in);
	bool same = true;
	struct result whole;
	decode(in, n, n ? n : 1, 1 << 20, &whole);
	ok(whole.done == want_done, "%s: end marker %s", name, want_done ? "seen" : "not seen");
	if (want_out)
		is_str(whole.out.data ? whole.out.data : "", want_out, name);
	ok((whole.err == NULL) == (want_err == NULL) && (!want_err || !strncmp(whole.err, want_err, 9)), "%s: verdict %s",
	   name, want_err ? want_err : "ok");
	for (size_t step = 1; step < n && same; step++) {
		struct result r;
		decode(in, n, step, 1 << 20, &r);
		same = r.done == whole.done && r.used == whole.used && (r.err == NULL) == (whole.err == NULL) &&
		       r.out.len == whole.out.len && (!r.out.len || !memcmp(r.out.data, whole.out.data, r.out.len));
		buf_free(&r.out);
	}
	ok(same, "%s: every split of the input decodes the same", name);
	buf_free(&whole.out);
}

int main(void)
{
	check("plain message", "Subject: x\r\n\r\nHello\r\n.\r\n", "Subject: x\r\n\r\nHello\r\n", true, NULL);
	check("dot-unstuffing", "a\r\n..b\r\n.\r\n", "a\r\n.b\r\n", true, NULL);
	check("empty message", ".\r\n", "", true, NULL);
	check("no end yet", "a\r\nb\r\n", "a\r\nb\r\n", false, NULL);
	check("LF.LF does not end DATA (smuggling)", "a\n.\nMAIL FROM:<x@y>\r\n.\r\n", NULL, true, "554 5.6.0");
	check("CRLF.LF does not end DATA (smuggling)", "a\r\n.\nb\r\n.\r\n", NULL, true, "554 5.6.0");
	check("LF.CRLF does not end DATA (smuggling)", "a\n.\r\nb\r\n.\r\n", NULL, true, "554 5.6.0");
	check("bare CR refused", "a\rb\r\n.\r\n", NULL, true, "554 5.6.0");

	/* NUL and the long line need explicit lengths */
	const char nul[] = "a\0b\r\n.\r\n";
	struct result r;
	decode(nul, sizeof(nul) - 1, 3, 1 << 20, &r);
	ok(r.done && r.err && !strncmp(r.err, "554 5.6.0 Message contains NUL", 30), "NUL byte refused after the end");
	buf_free(&r.out);

	size_t big = 5000;
	char *longline = malloc(big + 16);
	memset(longline, 'x', big);
	memcpy(longline + big, "\r\n.\r\n", 6);
	decode(longline, big + 5, 1500, 1 << 20, &r);
	ok(r.done && r.err && strstr(r.err, "longer than 998"), "5000-octet line refused, decoder stays in sync");
	buf_free(&r.out);
	memset(longline, 'x', 998);
	memcpy(longline + 998, "\r\n.\r\n", 6);
	decode(longline, 998 + 5, 7, 1 << 20, &r);
	ok(r.done && !r.err, "a 998-octet line is fine");
	buf_free(&r.out);
	free(longline);

	decode("0123456789\r\n0123456789\r\n.\r\n", 27, 4, 15, &r);
	ok(r.done && r.err && !strncmp(r.err, "552 5.3.4", 9) && r.out.len == 0, "over the size cap: 552 5.3.4, buffer freed");
	buf_free(&r.out);

	decode("a\r\n.\r\nQUIT\r\n", 12, 12, 1 << 20, &r);
	is_int((long long)r.used, 6, "bytes after the final dot are left for the command parser");
	buf_free(&r.out);

	struct smtp_body b;
	struct buf out = { 0 };
	smtp_body_init(&b, &out, 100);
	smtp_body_chunk(&b, "line\r\n.\r\n", 9);
	ok(out.len == 9 && !smtp_body_error(&b), "BDAT passes a dot line through untouched");
	smtp_body_chunk(&b, "x\ny", 3);
	ok(smtp_body_error(&b) != NULL, "BDAT with a bare LF is refused");
	buf_free(&out);
	pool_tests();
	return done_testing();
}
