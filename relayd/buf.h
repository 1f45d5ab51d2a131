/*
 * buf - a growable byte buffer with a hard cap. All appends check the cap.
 */
#ifndef RELAYD_BUF_H
#define RELAYD_BUF_H

#include <stddef.h>

struct buf {
	char *data;
	size_t len;
	size_t cap;
};

/* buf_reserve - room for n more bytes without another allocation; -1 on failure */
int buf_reserve(struct buf *b, size_t n);
/* buf_append - append n bytes; -1 on allocation failure */
int buf_append(struct buf *b, const void *p, size_t n);
/* buf_printf - append formatted text; -1 on failure */
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* buf_replace - put p[0..n) where b[off..off+oldlen) was, moving what follows once (in
 * place: no second copy of a large buffer); -1 on a bad range or allocation failure */
int buf_replace(struct buf *b, size_t off, size_t oldlen, const void *p, size_t n);
/* buf_consume - drop n bytes from the front */
void buf_consume(struct buf *b, size_t n);
/* buf_reset - keep the allocation, empty the contents */
void buf_reset(struct buf *b);
/* buf_free - release the allocation */
void buf_free(struct buf *b);

#endif
