/*
 * buf - growable byte buffer.
 */
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* buf_reserve - room for need more bytes (and the NUL) */
int buf_reserve(struct buf *b, size_t need)
{
	if (b->len + need + 1 <= b->cap)
		return 0;
	size_t ncap = b->cap ? b->cap : 256;
	while (ncap < b->len + need + 1) {
		if (ncap > ((size_t)-1) / 2)
			return -1;
		ncap *= 2;
	}
	char *p = realloc(b->data, ncap);
	if (!p)
		return -1;
	b->data = p;
	b->cap = ncap;
	return 0;
}

/* buf_append - append n bytes, keeping a NUL after the contents */
int buf_append(struct buf *b, const void *p, size_t n)
{
	if (buf_reserve(b, n) < 0)
		return -1;
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

/* buf_replace - splice p[0..n) in for b[off..off+oldlen) */
int buf_replace(struct buf *b, size_t off, size_t oldlen, const void *p, size_t n)
{
	if (off > b->len || oldlen > b->len - off)
		return -1;
	if (n > oldlen && buf_reserve(b, n - oldlen) < 0)
		return -1;
	if (!b->data) /* empty and nothing to put in */
		return 0;
	memmove(b->data + off + n, b->data + off + oldlen, b->len - off - oldlen);
	if (n)
		memcpy(b->data + off, p, n);
	b->len = b->len - oldlen + n;
	b->data[b->len] = '\0';
	return 0;
}

/* buf_printf - append formatted text */
int buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || buf_reserve(b, (size_t)n) < 0)
		return -1;
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
	return 0;
}

/* buf_consume - drop n bytes from the front */
void buf_consume(struct buf *b, size_t n)
{
	if (n >= b->len) {
		b->len = 0;
	} else {
		memmove(b->data, b->data + n, b->len - n);
		b->len -= n;
	}
	if (b->data)
		b->data[b->len] = '\0';
}

/* buf_reset - empty the buffer */
void buf_reset(struct buf *b)
{
	b->len = 0;
	if (b->data)
		b->data[0] = '\0';
}

/* buf_free - release the buffer */
void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}
