/*
 * smtp_body - DATA/BDAT decoding (see smtp_body.h).
 * Invariant: every byte handed in is either consumed (and scanned) or left for the next
 * call, and a partial line is never held longer than SMTP_BODY_LINE_MAX bytes, so memory
 * per session stays bounded however long the client's lines are.
 */
#include "smtp_body.h"

#include <string.h>

/* smtp_body_init - reset (a body in a pool is released first: smtp_body_release) */
void smtp_body_init(struct smtp_body *b, struct buf *out, size_t max)
{
	memset(b, 0, sizeof(*b));
	b->out = out;
	b->max = max;
	b->at_line_start = true;
}

/* smtp_body_set_pool - share a memory cap with other bodies */
void smtp_body_set_pool(struct smtp_body *b, size_t *used, size_t max)
{
	b->pool = used;
	b->pool_max = max;
}

/* smtp_body_release - give b's bytes back to the pool */
void smtp_body_release(struct smtp_body *b)
{
	if (b->pool)
		*b->pool -= b->pooled;
	b->pooled = 0;
}

/* the message is refused: keep nothing of it */
static void smtp_body_drop(struct smtp_body *b)
{
	buf_free(b->out);
	smtp_body_release(b);
}

static void smtp_body_append(struct smtp_body *b, const char *p, size_t n)
{
	if (b->oversize || b->nomem)
		return;
	if (b->out->len + n > b->max) {
		b->oversize = true;
	} else if ((b->pool && *b->pool + n > b->pool_max) || buf_append(b->out, p, n) < 0) {
		b->nomem = true; /* now, not for good */
	} else {
		if (b->pool)
			*b->pool += n;
		b->pooled += n;
		return;
	}
	smtp_body_drop(b);
}

/* line syntax of body bytes: CRLF only, no NUL, lines of at most 998 octets */
static void smtp_body_scan(struct smtp_body *b, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char ch = p[i];
		if (ch == '\n') {
			if (!b->prev_cr)
				b->bare = true;
			b->line_len = 0;
		} else {
			if (b->prev_cr)
				b->bare = true;
			if (ch == '\0')
				b->nul = true;
			if (ch != '\r' && ++b->line_len > SMTP_BODY_LINE_MAX - 2)
				b->longline = true;
		}
		b->prev_cr = ch == '\r';
	}
}

/* one piece of a DATA line: the whole line, or a passed-through part of an overlong one */
static void smtp_body_piece(struct smtp_body *b, const char *p, size_t n)
{
	if (b->at_line_start && n > 0 && p[0] == '.') {
		p++; /* RFC 5321 §4.5.2 dot-unstuffing */
		n--;
	}
	bool cr_before = b->prev_cr;
	smtp_body_scan(b, p, n);
	smtp_body_append(b, p, n);
	/* only CRLF starts a new line for the end-of-data check */
	if (n > 0 && p[n - 1] == '\n')
		b->at_line_start = n >= 2 ? p[n - 2] == '\r' : cr_before;
	else if (n > 0)
		b->at_line_start = false;
}

/* smtp_body_data - decode DATA input */
size_t smtp_body_data(struct smtp_body *b, const char *p, size_t n, bool *done)
{
	size_t off = 0;
	*done = false;
	while (off < n) {
		const char *line = p + off;
		size_t avail = n - off;
		const char *nl = memchr(line, '\n', avail);
		if (!nl) {
			if (avail <= SMTP_BODY_LINE_MAX)
				break; /* wait for the rest of the line */
			/* an overlong line: pass it on (refused at the end), keep a possible CR */
			smtp_body_piece(b, line, avail - 1);
			off += avail - 1;
			break;
		}
		size_t len = (size_t)(nl - line) + 1;
		if (b->at_line_start && len == 3 && line[0] == '.' && line[1] == '\r') {
			*done = true;
			return off + len;
		}
		smtp_body_piece(b, line, len);
		off += len;
	}
	return off;
}

/* smtp_body_chunk - BDAT octets */
void smtp_body_chunk(struct smtp_body *b, const char *p, size_t n)
{
	smtp_body_scan(b, p, n);
	smtp_body_append(b, p, n);
}

/* smtp_body_error - the reply for a flagged message */
const char *smtp_body_error(const struct smtp_body *b)
{
	if (b->oversize)
		return "552 5.3.4 Message size exceeds fixed limit";
	if (b->nul)
		return "554 5.6.0 Message contains NUL bytes";
	if (b->bare)
		return "554 5.6.0 Message contains bare LF or bare CR (RFC 5321 §2.3.8)";
	if (b->longline)
		return "554 5.6.0 Message contains a line longer than 998 characters (RFC 5322 §2.1.1)";
	if (b->nomem) /* after the permanent ones: trying again would not help them */
		return "452 4.3.1 Insufficient system storage";
	return NULL;
}
