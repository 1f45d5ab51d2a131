/*
 * credcache - the verified-credential cache: lets a client that opens one connection per
 * message skip the slow password hash after its first success, without storing passwords.
 * An entry is HMAC-SHA256(per-process random key, user NUL password NUL stored-hash) with an
 * expiry. Including the stored hash means a password change or a deleted user makes every
 * old entry useless at once, with no invalidation message from relayctl needed.
 */
#ifndef RELAYD_CREDCACHE_H
#define RELAYD_CREDCACHE_H

#include <stdbool.h>
#include <time.h>

/* credcache_init - a fresh random key; ttl 0 disables the cache */
int credcache_init(unsigned ttl);
/* credcache_check - true when this user+password+hash was verified less than ttl ago */
bool credcache_check(const char *user, const char *password, const char *hash, time_t now);
/* credcache_put - remember a successful verification */
void credcache_put(const char *user, const char *password, const char *hash, time_t now);
/* credcache_block - while name is locked out (until `until`), neither answer nor store for it,
 * so that the right password costs the same slow hash as a wrong one (no timing oracle); a
 * name shares its mark with others hashed to the same slot, which only costs them the hash */
void credcache_block(const char *name, time_t until);
/* credcache_clear - forget everything */
void credcache_clear(void);

#endif
