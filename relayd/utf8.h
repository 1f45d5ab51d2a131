/*
 * utf8 - well-formed UTF-8 (RFC 3629 §4) for what clients send: SMTPUTF8 addresses
 * (RFC 6531 §3.3), AUTH user names, and the log's escaping of free text.
 */
#ifndef RELAYD_UTF8_H
#define RELAYD_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* utf8_char - the length (1-4) of the well-formed character at s, its code point in *cp;
 * 0 when the bytes there are not one (a stray continuation byte, an overlong form, a
 * surrogate, above U+10FFFF, cut short) or s is at its NUL */
size_t utf8_char(const char *s, unsigned *cp);
/* utf8_clean - s is well-formed UTF-8 without C1 controls (U+0080-U+009F), which
 * terminals act on; bytes below 0x80 are the caller's to check */
bool utf8_clean(const char *s);

#endif
