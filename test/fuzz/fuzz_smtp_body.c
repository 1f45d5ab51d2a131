/*
 * fuzz_smtp_body - libFuzzer target for relayd/smtp_body.c.
 * DATA: the input (after 2 control bytes) is decoded once in one piece and once in pieces
 * whose sizes come from a PRNG seeded by the control bytes, offering unconsumed bytes again
 * as the session does. Invariants: consumed <= offered on every call; the output is never
 * larger than the input consumed; a split does not change the result (output, end marker,
 * flags, total consumed) once the message has ended; before that, a split run may hold
 * back more of an overlong partial line, never more than one line. BDAT: smtp_body_chunk in
 * pieces; output == input unless flagged oversize, and the flags agree with a one-piece pass.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp_body.h"

struct result {
	struct buf out;
	size_t consumed;
	bool done;
	bool oversize, bare, nul, longline;
};

static uint32_t rng_next(uint32_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 17;
	*s ^= *s << 5;
	return *s;
}

/* decode p[0..n) as DATA, offering at most `step` new bytes a time (0 = all at once) */
static void run_data(const char *p, size_t n, size_t max, uint32_t seed, bool split, struct result *r)
{
	struct smtp_body b;
	memset(r, 0, sizeof(*r));
	smtp_body_init(&b, &r->out, max);
	size_t off = 0, avail = 0; /* [off, off+avail) is offered */
	uint32_t st = seed | 1;
	while (off + avail < n || avail > 0) {
		size_t add = n - off - avail;
		if (split && add > 0)
			add = 1 + rng_next(&st) % (add < 2048 ? add : 2048);
		avail += add;
		bool done = false;
		size_t before = r->out.len;
		size_t c = smtp_body_data(&b, p + off, avail, &done);
		assert(c <= avail);
		if (!b.oversize)
			assert(r->out.len - before <= c);
		off += c;
		avail -= c;
		if (done) {
			r->done = true;
			break;
		}
		if (off + avail >= n)
			break; /* no more input: a partial line stays unconsumed */
	}
	r->consumed = off;
	r->oversize = b.oversize;
	r->bare = b.bare;
	r->nul = b.nul;
	r->longline = b.longline;
	if (!b.oversize)
		assert(r->out.len <= r->consumed);
	(void)smtp_body_error(&b);
}

/* two decodes of one message agree on everything */
static void compare(const struct result *a, const struct result *b, bool full)
{
	if (!full)
		return;
	assert(a->done == b->done && a->consumed == b->consumed);
	assert(a->oversize == b->oversize);
	assert(a->bare == b->bare && a->nul == b->nul && a->longline == b->longline);
	if (!a->oversize) {
		assert(a->out.len == b->out.len);
		assert(a->out.len == 0 || memcmp(a->out.data, b->out.data, a->out.len) == 0);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	uint32_t seed = (uint32_t)data[0] << 8 | data[1];
	size_t max = (data[0] & 0x80) ? 64 + (size_t)(data[1] % 128) : (size_t)1 << 20;
	const char *p = (const char *)data + 2;
	size_t n = size - 2;

	/* as it is: whatever the split, what is left unconsumed is at most one line, and the
	 * output of a split run is a prefix of the one-piece run's (it may hold back more of an
	 * overlong partial line) */
	struct result whole, parts;
	run_data(p, n, max, seed, false, &whole);
	run_data(p, n, max, seed, true, &parts);
	assert(whole.done == parts.done);
	if (!whole.done) {
		assert(n - whole.consumed <= SMTP_BODY_LINE_MAX && n - parts.consumed <= SMTP_BODY_LINE_MAX);
		assert(parts.consumed <= whole.consumed);
	}
	if (!whole.oversize && !parts.oversize) {
		assert(parts.out.len <= whole.out.len);
		assert(parts.out.len == 0 || memcmp(whole.out.data, parts.out.data, parts.out.len) == 0);
	}
	compare(&whole, &parts, whole.done);
	buf_free(&whole.out);
	buf_free(&parts.out);

	/* with an end marker appended: the message always ends, identically for any split */
	char *q = malloc(n + 5);
	memcpy(q, p, n);
	memcpy(q + n, "\r\n.\r\n", 5);
	run_data(q, n + 5, max, seed, false, &whole);
	run_data(q, n + 5, max, seed ^ 0x5a5a, true, &parts);
	assert(whole.done && parts.done);
	compare(&whole, &parts, true);
	buf_free(&whole.out);
	buf_free(&parts.out);
	free(q);

	/* BDAT, in a memory pool that others already hold `pre` bytes of */
	struct buf o1 = { 0 }, o2 = { 0 };
	struct smtp_body b1, b2;
	size_t pre = seed % (max + 1), pool1 = pre, pool2 = pre;
	smtp_body_init(&b1, &o1, max);
	smtp_body_init(&b2, &o2, max);
	smtp_body_set_pool(&b1, &pool1, max);
	smtp_body_set_pool(&b2, &pool2, max);
	smtp_body_chunk(&b1, p, n);
	uint32_t st = seed | 1;
	for (size_t off = 0; off < n;) {
		size_t k = 1 + rng_next(&st) % (n - off);
		smtp_body_chunk(&b2, p + off, k);
		off += k;
	}
	bool refused1 = b1.oversize || b1.nomem, refused2 = b2.oversize || b2.nomem;
	assert(refused1 == refused2 && b1.bare == b2.bare && b1.nul == b2.nul && b1.longline == b2.longline);
	if (!b1.nomem && !b2.nomem)
		assert(b1.oversize == b2.oversize);
	if (!refused1) {
		assert(o1.len == n && o2.len == n);
		assert(n == 0 || (memcmp(o1.data, p, n) == 0 && memcmp(o2.data, p, n) == 0));
	} else {
		assert(o1.len == 0 && o2.len == 0);
	}
	assert(pool1 == pre + o1.len && b1.pooled == o1.len && pool2 == pre + o2.len && b2.pooled == o2.len);
	smtp_body_release(&b1);
	smtp_body_release(&b2);
	assert(pool1 == pre && pool2 == pre);
	buf_free(&o1);
	buf_free(&o2);
	return 0;
}
