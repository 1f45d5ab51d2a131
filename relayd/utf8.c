/*
 * utf8 - decoding of one UTF-8 character by the table of RFC 3629 §4 (UTF8-2 .. UTF8-4):
 * the first byte fixes the length and the range of the second byte, which is what rules out
 * overlong forms, surrogates (U+D800-U+DFFF) and code points above U+10FFFF.
 * Invariant: never reads past the NUL (a NUL is not a continuation byte).
 */
#include "utf8.h"

/* the range of the second byte after each lead byte (RFC 3629 §4) */
static bool utf8_second_ok(unsigned char lead, unsigned char b)
{
	if (lead == 0xe0)
		return b >= 0xa0 && b <= 0xbf;
	if (lead == 0xed)
		return b >= 0x80 && b <= 0x9f;
	if (lead == 0xf0)
		return b >= 0x90 && b <= 0xbf;
	if (lead == 0xf4)
		return b >= 0x80 && b <= 0x8f;
	return b >= 0x80 && b <= 0xbf;
}

/* utf8_char - one character's length and code point */
size_t utf8_char(const char *s, unsigned *cp)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n;
	if (p[0] == 0)
		return 0;
	if (p[0] < 0x80) {
		*cp = p[0];
		return 1;
	}
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		n = 3;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4;
	else
		return 0; /* a continuation byte, an overlong lead (C0, C1), or F5-FF */
	if (!utf8_second_ok(p[0], p[1]))
		return 0;
	unsigned c = p[0] & (0x7fu >> n);
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		c = c << 6 | (p[i] & 0x3fu);
	}
	*cp = c;
	return n;
}

/* utf8_clean - well-formed, no C1 control */
bool utf8_clean(const char *s)
{
	while (*s) {
		unsigned cp;
		size_t n = utf8_char(s, &cp);
		if (n == 0 || (cp >= 0x80 && cp <= 0x9f))
			return false;
		s += n;
	}
	return true;
}
