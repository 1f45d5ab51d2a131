/*
 * fuzz_upstream_reply - libFuzzer target for the forwarder's reply parsing (relayd/smtp_reply.c).
 *
 * The input (after one seed byte) is parsed twice: once in one piece, once in pieces whose
 * sizes come from a PRNG seeded by the first byte, dropping the consumed bytes after each
 * call the way forward_session.c drops them from c->in. Invariants: consumed <= offered;
 * after "need more" what is left holds no complete line; the text is NUL-terminated, holds
 * no NUL, and never passes SMTP_REPLY_MAX; a complete reply has a 2xx..5xx code and at
 * least one line; the split does not change the sequence of replies (code, status, text)
 * nor where parsing fails. Every reply's text also goes through smtp_reply_ehlo().
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp_reply.h"

#define FZ_MAX_REPLIES 4096

struct fz_seen {
	int code;
	char status[16];
	uint32_t hash;              /* of the text */
	size_t len;
};

struct fz_run {
	struct fz_seen seen[FZ_MAX_REPLIES];
	size_t n;
	bool failed;                /* -1 at some point */
	size_t total;               /* bytes consumed by complete replies */
};

static struct smtp_reply fz_r;
static struct fz_run fz_a, fz_b;

static uint32_t fz_hash(const char *p, size_t n)
{
	uint32_t h = 2166136261u;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)p[i]) * 16777619u;
	return h;
}

static void fz_check(const struct smtp_reply *r)
{
	assert(r->len <= SMTP_REPLY_MAX);
	assert(r->text[r->len] == '\0');
	assert(strlen(r->text) == r->len);
	assert(memchr(r->status, '\0', sizeof(r->status)));
}

static void fz_record(struct fz_run *run, const struct smtp_reply *r)
{
	fz_check(r);
	assert(r->code >= 200 && r->code <= 599 && r->nlines >= 1);
	if (r->status[0])
		assert(r->status[0] == '0' + r->code / 100 && !strncmp(r->text, r->status, strlen(r->status)));
	struct smtp_ehlo e;
	smtp_reply_ehlo(r->text, &e);
	if (run->n < FZ_MAX_REPLIES) {
		struct fz_seen *s = &run->seen[run->n];
		s->code = r->code;
		memcpy(s->status, r->status, sizeof(s->status));
		s->hash = fz_hash(r->text, r->len);
		s->len = r->len;
	}
	run->n++;
}

/* parse data in pieces of the sizes the PRNG gives (st == 0: one piece) */
static void fz_run(struct fz_run *run, const char *data, size_t n, uint32_t st)
{
	char *buf = malloc(n ? n : 1);
	size_t have = 0, off = 0;
	memset(run, 0, sizeof(*run));
	smtp_reply_init(&fz_r);
	assert(buf);
	while (off < n) {
		size_t k = n - off;
		if (st) {
			st ^= st << 13;
			st ^= st >> 17;
			st ^= st << 5;
			k = 1 + st % k;
		}
		memcpy(buf + have, data + off, k);
		have += k;
		off += k;
		for (;;) {
			size_t used = 0;
			int rc = smtp_reply_parse(buf, have, &fz_r, &used);
			assert(used <= have);
			if (rc < 0) {
				run->failed = true;
				free(buf);
				return;
			}
			fz_check(&fz_r);
			memmove(buf, buf + used, have - used);
			have -= used;
			run->total += used;
			if (rc == 0) {
				assert(!memchr(buf, '\n', have));
				break;
			}
			fz_record(run, &fz_r);
		}
	}
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	const char *p = (const char *)data + 1;
	size_t n = size - 1;
	fz_run(&fz_a, p, n, 0);
	fz_run(&fz_b, p, n, data[0] | 0x100);
	/* a split may only find a malformed line earlier (an overlong partial line is seen
	 * before its newline in both); the replies completed before agree */
	assert(fz_a.failed == fz_b.failed);
	if (!fz_a.failed)
		assert(fz_a.n == fz_b.n && fz_a.total == fz_b.total);
	size_t common = fz_a.n < fz_b.n ? fz_a.n : fz_b.n;
	if (common > FZ_MAX_REPLIES)
		common = FZ_MAX_REPLIES;
	for (size_t i = 0; i < common; i++) {
		assert(fz_a.seen[i].code == fz_b.seen[i].code);
		assert(!strcmp(fz_a.seen[i].status, fz_b.seen[i].status));
		assert(fz_a.seen[i].hash == fz_b.seen[i].hash && fz_a.seen[i].len == fz_b.seen[i].len);
	}
	return 0;
}
