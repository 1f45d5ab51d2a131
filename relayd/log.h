/*
 * log - one line per event, key=value, to stderr (foreground) or syslog.
 * Lines start with the session or queue id when there is one:
 *   a1b2c3d4e5f60718 smtp event=auth result=fail user=alice reason=bad-password
 * Never pass a password or a secret to these functions. A value that a client or an upstream
 * chose, and that was not validated to be clean, goes through log_value().
 */
#ifndef RELAYD_LOG_H
#define RELAYD_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum log_level { LOG_LVL_ERR, LOG_LVL_WARN, LOG_LVL_INFO, LOG_LVL_DEBUG };

/* log_init - choose stderr (foreground) or syslog; ident is the program name */
void log_init(const char *ident, int to_stderr, int debug);
/* log_msg - write one event line at the given level */
void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* fatal - log and exit(1); only for broken invariants and start-up failures */
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* the size of a log_value() buffer that holds any value of n bytes */
#define LOG_VALUE_SIZE(n) (4 * (n) + 1)

/* log_value - in made safe as a log value, in out: bytes below 0x20, DEL, bytes that are not
 * well-formed UTF-8 and C1 controls (U+0080-U+009F) as \xHH, '"' and '\' as \" and \\, the
 * rest (UTF-8 included) as it is; cut at a whole character to fit outlen; returns out */
const char *log_value(const char *in, char *out, size_t outlen);

/* err_set - format a message into a caller's error buffer; nothing when err is NULL or
 * errlen 0 (the convention of functions that take char *err, size_t errlen) */
void err_set(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define log_err(...)   log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)

#endif
