/*
 * smtp_body - the DATA and BDAT decoders: pure functions over bytes (no I/O), so they are
 * unit-tested and fuzzed on their own.
 *
 * DATA (RFC 5321 §4.1.1.4, §4.5.2): lines end in CRLF; a line "." alone ends the message;
 * a leading "." is removed (dot-unstuffing). Only CRLF "." CRLF ends it: "\n.\n" or
 * "\r\n.\n" do not (SMTP smuggling). BDAT (RFC 3030): raw octets, counted.
 * Both check what they pass through: bare LF or CR, NUL, lines over 998 octets, and the
 * size cap; the session refuses a flagged message after the end marker, so it stays in
 * sync with the client whatever it sent. A memory pool shared by every body in transfer
 * (smtp_body_set_pool) caps what they hold at once: a message that would pass it is read
 * to its end and refused with 452 4.3.1, so the client tries again later.
 */
#ifndef RELAYD_SMTP_BODY_H
#define RELAYD_SMTP_BODY_H

#include <stdbool.h>
#include <stddef.h>

#include "buf.h"

#define SMTP_BODY_LINE_MAX 1000   /* RFC 5321 §4.5.3.1.6, CRLF included */

struct smtp_body {
	struct buf *out;          /* the decoded message (freed when it grows past max) */
	size_t max;               /* size cap in bytes */
	bool at_line_start;
	bool prev_cr;
	size_t line_len;
	size_t *pool;             /* bytes held by every body using the pool, or NULL */
	size_t pool_max;
	size_t pooled;            /* this body's part of *pool */
	bool oversize, nomem, bare, nul, longline;
};

/* smtp_body_init - start decoding a message into out, at most max bytes */
void smtp_body_init(struct smtp_body *b, struct buf *out, size_t max);
/* smtp_body_set_pool - count what b holds in *used, which must stay at most max */
void smtp_body_set_pool(struct smtp_body *b, size_t *used, size_t max);
/* smtp_body_release - b's message buffer was freed or handed on: its bytes leave the pool */
void smtp_body_release(struct smtp_body *b);
/* smtp_body_data - decode DATA input; returns the bytes consumed and sets *done when the
 * final dot was consumed. Unconsumed bytes (a partial line) must be offered again with more. */
size_t smtp_body_data(struct smtp_body *b, const char *p, size_t n, bool *done);
/* smtp_body_chunk - pass BDAT octets through (all n consumed) */
void smtp_body_chunk(struct smtp_body *b, const char *p, size_t n);
/* smtp_body_error - the reply for a flagged message, or NULL when it is acceptable */
const char *smtp_body_error(const struct smtp_body *b);

#endif
