/*
 * utf8-t - unit tests of the UTF-8 decoder (RFC 3629 §4) and utf8_clean.
 */
#include <string.h>

#include "../../relayd/utf8.h"
#include "tap.h"

static void test_char(void)
{
	unsigned cp = 0;
	ok(utf8_char("a", &cp) == 1 && cp == 'a', "ASCII");
	ok(utf8_char("\xc3\xa9", &cp) == 2 && cp == 0xe9, "U+00E9 in two bytes");
	ok(utf8_char("\xe2\x82\xac", &cp) == 3 && cp == 0x20ac, "U+20AC in three bytes");
	ok(utf8_char("\xf0\x9f\x98\x80", &cp) == 4 && cp == 0x1f600, "U+1F600 in four bytes");
	ok(utf8_char("\xf4\x8f\xbf\xbf", &cp) == 4 && cp == 0x10ffff, "U+10FFFF, the last one");
	ok(utf8_char("\xef\xbf\xbf", &cp) == 3 && cp == 0xffff, "U+FFFF");
	ok(utf8_char("", &cp) == 0, "the NUL is no character");
	ok(utf8_char("\x80", &cp) == 0, "a stray continuation byte");
	ok(utf8_char("\xc0\xaf", &cp) == 0, "overlong '/' in two bytes");
	ok(utf8_char("\xc1\xbf", &cp) == 0, "overlong U+007F");
	ok(utf8_char("\xe0\x80\xaf", &cp) == 0, "overlong '/' in three bytes");
	ok(utf8_char("\xe0\x9f\xbf", &cp) == 0, "overlong U+07FF");
	ok(utf8_char("\xf0\x8f\xbf\xbf", &cp) == 0, "overlong U+FFFF");
	ok(utf8_char("\xed\xa0\x80", &cp) == 0, "surrogate U+D800");
	ok(utf8_char("\xed\xbf\xbf", &cp) == 0, "surrogate U+DFFF");
	ok(utf8_char("\xed\x9f\xbf", &cp) == 3 && cp == 0xd7ff, "U+D7FF before the surrogates");
	ok(utf8_char("\xf4\x90\x80\x80", &cp) == 0, "U+110000 is too high");
	ok(utf8_char("\xf5\x80\x80\x80", &cp) == 0, "lead byte F5");
	ok(utf8_char("\xff", &cp) == 0, "byte FF");
	ok(utf8_char("\xe2\x82", &cp) == 0, "cut short at the NUL");
	ok(utf8_char("\xe2\x82x", &cp) == 0, "cut short by ASCII");
	ok(utf8_char("\xf0\x9f\x98", &cp) == 0, "four-byte form cut short");
}

static void test_clean(void)
{
	ok(utf8_clean(""), "empty");
	ok(utf8_clean("j\xc3\xb6rg@b\xc3\xbc" "cher.example"), "UTF-8 text");
	ok(utf8_clean("\xc2\xa0"), "U+00A0 (after the C1 range)");
	ok(!utf8_clean("x\xc2\x85y"), "NEL (U+0085) refused");
	ok(!utf8_clean("\xc2\x9b" "31m"), "CSI (U+009B) refused");
	ok(!utf8_clean("\xc2\x80"), "U+0080 refused");
	ok(!utf8_clean("\xc2\x9f"), "U+009F refused");
	ok(!utf8_clean("abc\xff"), "invalid byte at the end refused");
	ok(!utf8_clean("\x9b"), "raw C1 byte refused");
}

int main(void)
{
	test_char();
	test_clean();
	return done_testing();
}
