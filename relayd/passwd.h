/*
 * passwd - salted slow password hashes through crypt(3) (libxcrypt, yescrypt "$y$").
 */
#ifndef RELAYD_PASSWD_H
#define RELAYD_PASSWD_H

#include <stdbool.h>
#include <stddef.h>

/* passwd_hash - hash password with a fresh random salt into out; -1 on failure */
int passwd_hash(const char *password, char *out, size_t outlen);
/* passwd_verify - true when password matches hash (constant-time compare) */
bool passwd_verify(const char *password, const char *hash);

#endif
