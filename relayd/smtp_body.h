/*
 * smtp_body - the DATA and BDAT decoders: pure functions over bytes (no I/O), so they are
 * unit-tested and fuzzed on their own.
 *
 * DATA (RFC 5321 §4.1.1.4, §4.5.2): lines end in CRLF; a line "." alone ends the message;
 * a leading "." is removed (dot-unstuffing). Only CRLF "." CRLF ends it: "\n.\n" or
 * "\r\n.\n" do not (SMTP smuggling). BDAT (RFC 3030): raw octets, counted.
 * Both check what they pass through: bare LF or CR, NUL, lines over 998 octets, and the
 * size cap; the session refuses a flagged message after the end marker, so it stays in
 * sync with the client whatever it sent.
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
	bool oversize, bare, nul, longline;
};

/* smtp_body_init - start decoding a message into out, at most max bytes */
void smtp_body_init(struct smtp_body *b, struct buf *out, size_t max);
/* smtp_body_data - decode DATA input; returns the bytes consumed and sets *done when the
 * final dot was consumed. Unconsumed bytes (a partial line) must be offered again with more. */
size_t smtp_body_data(struct smtp_body *b, const char *p, size_t n, bool *done);
/* smtp_body_chunk - pass BDAT octets through (all n consumed) */
void smtp_body_chunk(struct smtp_body *b, const char *p, size_t n);
/* smtp_body_error - the reply for a flagged message, or NULL when it is acceptable */
const char *smtp_body_error(const struct smtp_body *b);

#endif
