/*
 * log-t - unit tests of log_value, the escaper for values a client or an upstream chose.
 */
#include <string.h>

#include "../../relayd/log.h"
#include "tap.h"

static void test_value(void)
{
	char v[LOG_VALUE_SIZE(64)];
	is_str(log_value("alice@example.org", v, sizeof(v)), "alice@example.org", "plain ASCII as it is");
	is_str(log_value("j\xc3\xb6rg@b\xc3\xbc" "cher.example", v, sizeof(v)), "j\xc3\xb6rg@b\xc3\xbc" "cher.example",
	       "UTF-8 as it is");
	is_str(log_value("\xf0\x9f\x98\x80 \xc2\xa0", v, sizeof(v)), "\xf0\x9f\x98\x80 \xc2\xa0",
	       "four-byte UTF-8, SP and U+00A0 as they are");
	is_str(log_value("a\x1b[2Jb\r\n\t\x7f", v, sizeof(v)), "a\\x1b[2Jb\\x0d\\x0a\\x09\\x7f", "C0 controls and DEL");
	is_str(log_value("x\xc2\x85y\xc2\x9b" "31m", v, sizeof(v)), "x\\xc2\\x85y\\xc2\\x9b" "31m",
	       "C1 controls (NEL, CSI) byte by byte");
	is_str(log_value("a\xff\xfe\x9b", v, sizeof(v)), "a\\xff\\xfe\\x9b", "bytes that are not UTF-8");
	is_str(log_value("\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80", v, sizeof(v)),
	       "\\xc0\\xaf\\xed\\xa0\\x80\\xf4\\x90\\x80\\x80", "overlong, surrogate, above U+10FFFF");
	is_str(log_value("ab\xe2\x82", v, sizeof(v)), "ab\\xe2\\x82", "a sequence cut by the end");
	is_str(log_value("x=\"evil\" a\\b", v, sizeof(v)), "x=\\\"evil\\\" a\\\\b", "quote and backslash escaped");
	is_str(log_value(NULL, v, sizeof(v)), "", "NULL is empty");
	is_str(log_value("", v, sizeof(v)), "", "empty");
}

static void test_cut(void)
{
	char v[6];
	is_str(log_value("abcdefgh", v, sizeof(v)), "abcde", "cut to the buffer");
	is_str(log_value("abc\xff", v, sizeof(v)), "abc", "an escape that does not fit is left out whole");
	is_str(log_value("ab\xe2\x82\xac", v, sizeof(v)), "ab\xe2\x82\xac", "a character that fits exactly");
	is_str(log_value("abc\xe2\x82\xac", v, sizeof(v)), "abc", "a character that does not fit is left out whole");
	is_str(log_value("abcd\"", v, sizeof(v)), "abcd", "so is an escaped quote");
	char w[LOG_VALUE_SIZE(4)];
	is_str(log_value("\xff\xff\xff\xff", w, sizeof(w)), "\\xff\\xff\\xff\\xff", "LOG_VALUE_SIZE(n) holds n bytes");
	char z[1];
	is_str(log_value("abc", z, sizeof(z)), "", "a buffer of 1 gets the empty string");
}

int main(void)
{
	test_value();
	test_cut();
	return done_testing();
}
