/*
 * buf-t - the growable buffer: append, consume, and buf_replace's splice in place.
 */
#include <string.h>

#include "../../relayd/buf.h"
#include "tap.h"

static bool holds(const struct buf *b, const char *want)
{
	return b->len == strlen(want) && (b->len == 0 || memcmp(b->data, want, b->len) == 0) &&
	       (!b->data || b->data[b->len] == '\0');
}

int main(void)
{
	struct buf b = { 0 };
	ok(buf_append(&b, "Subject: x\r\n\r\nbody\r\n", 20) == 0 && holds(&b, "Subject: x\r\n\r\nbody\r\n"), "append");
	ok(buf_replace(&b, 0, 12, "Received: r\r\nSubject: x\r\nDate: d\r\n", 34) == 0 &&
	   holds(&b, "Received: r\r\nSubject: x\r\nDate: d\r\n\r\nbody\r\n"), "replace the header block by a longer one");
	ok(buf_replace(&b, 0, 13, "", 0) == 0 && holds(&b, "Subject: x\r\nDate: d\r\n\r\nbody\r\n"),
	   "replace a part by nothing");
	ok(buf_replace(&b, b.len, 0, "!", 1) == 0 && holds(&b, "Subject: x\r\nDate: d\r\n\r\nbody\r\n!"), "at the end");
	ok(buf_replace(&b, b.len, 1, "x", 1) < 0 && buf_replace(&b, b.len + 1, 0, "x", 1) < 0,
	   "a range past the end is refused");
	ok(holds(&b, "Subject: x\r\nDate: d\r\n\r\nbody\r\n!"), "and changes nothing");
	buf_free(&b);
	ok(buf_replace(&b, 0, 0, "", 0) == 0 && holds(&b, ""), "empty into an empty buffer");
	ok(buf_replace(&b, 0, 0, "ab", 2) == 0 && holds(&b, "ab"), "into an empty buffer");
	buf_free(&b);
	/* a large body moves once, and keeps every byte */
	static char big[1 << 20];
	for (size_t i = 0; i < sizeof(big); i++)
		big[i] = (char)('a' + i % 26);
	buf_append(&b, "H: 1\r\n", 6);
	buf_append(&b, big, sizeof(big));
	ok(buf_replace(&b, 0, 6, "Received: x\r\nH: 1\r\n", 19) == 0 && b.len == 19 + sizeof(big) &&
	   memcmp(b.data, "Received: x\r\nH: 1\r\n", 19) == 0 && memcmp(b.data + 19, big, sizeof(big)) == 0,
	   "1 MiB after the splice is intact");
	buf_consume(&b, 19);
	ok(b.len == sizeof(big) && memcmp(b.data, big, sizeof(big)) == 0, "consume");
	buf_free(&b);
	return done_testing();
}
