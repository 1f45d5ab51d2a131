/*
 * credcache - verified-credential cache (see credcache.h).
 * A direct-mapped table of CREDCACHE_SLOTS entries indexed by the digest: bounded memory,
 * a collision simply evicts. Shared by the worker threads under one mutex.
 * Invariant: no password or password-derived value other than the keyed digest is kept.
 * Locked-out names (credcache_block) are marked in a second table indexed by a hash of the
 * name: bounded too, and a collision only sends another name to the slow hash meanwhile.
 */
#include "credcache.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CREDCACHE_SLOTS 4096
#define CREDCACHE_DIGEST 32
#define CREDCACHE_BLOCK_SLOTS 1024

struct credcache_entry {
	unsigned char digest[CREDCACHE_DIGEST];
	time_t expires;
};

static struct credcache_entry credcache_table[CREDCACHE_SLOTS];
static unsigned char credcache_key[32];
static unsigned credcache_ttl;
static time_t credcache_blocked[CREDCACHE_BLOCK_SLOTS];   /* per name slot: no cache until */
static pthread_mutex_t credcache_lock = PTHREAD_MUTEX_INITIALIZER;

/* credcache_init - new key, empty table */
int credcache_init(unsigned ttl)
{
	credcache_ttl = ttl;
	credcache_clear();
	return gnutls_rnd(GNUTLS_RND_KEY, credcache_key, sizeof(credcache_key)) < 0 ? -1 : 0;
}

static int credcache_digest(const char *user, const char *password, const char *hash,
			    unsigned char out[CREDCACHE_DIGEST])
{
	gnutls_hmac_hd_t h;
	if (gnutls_hmac_init(&h, GNUTLS_MAC_SHA256, credcache_key, sizeof(credcache_key)) < 0)
		return -1;
	gnutls_hmac(h, user, strlen(user) + 1);
	gnutls_hmac(h, password, strlen(password) + 1);
	gnutls_hmac(h, hash, strlen(hash));
	gnutls_hmac_deinit(h, out);
	return 0;
}

static size_t credcache_slot(const unsigned char d[CREDCACHE_DIGEST])
{
	return ((size_t)d[0] << 8 | d[1]) % CREDCACHE_SLOTS;
}

static size_t credcache_name_slot(const char *name)
{
	uint32_t h = 2166136261u; /* FNV-1a */
	for (; *name; name++)
		h = (h ^ (unsigned char)*name) * 16777619u;
	return h % CREDCACHE_BLOCK_SLOTS;
}

/* is name's slot blocked? (under the lock) */
static bool credcache_is_blocked(const char *name, time_t now)
{
	return credcache_blocked[credcache_name_slot(name)] > now;
}

/* credcache_block - no cache for name's slot until `until` */
void credcache_block(const char *name, time_t until)
{
	pthread_mutex_lock(&credcache_lock);
	time_t *b = &credcache_blocked[credcache_name_slot(name)];
	if (*b < until)
		*b = until;
	pthread_mutex_unlock(&credcache_lock);
}

/* credcache_check - a fresh matching entry? (constant-time digest compare) */
bool credcache_check(const char *user, const char *password, const char *hash, time_t now)
{
	unsigned char d[CREDCACHE_DIGEST];
	if (!credcache_ttl || credcache_digest(user, password, hash, d) < 0)
		return false;
	pthread_mutex_lock(&credcache_lock);
	const struct credcache_entry *e = &credcache_table[credcache_slot(d)];
	unsigned char diff = 0;
	for (size_t i = 0; i < CREDCACHE_DIGEST; i++)
		diff |= (unsigned char)(e->digest[i] ^ d[i]);
	bool hit = diff == 0 && e->expires > now && !credcache_is_blocked(user, now);
	pthread_mutex_unlock(&credcache_lock);
	explicit_bzero(d, sizeof(d));
	return hit;
}

/* credcache_put - remember a verified credential for ttl seconds */
void credcache_put(const char *user, const char *password, const char *hash, time_t now)
{
	unsigned char d[CREDCACHE_DIGEST];
	if (!credcache_ttl || credcache_digest(user, password, hash, d) < 0)
		return;
	pthread_mutex_lock(&credcache_lock);
	if (!credcache_is_blocked(user, now)) {
		struct credcache_entry *e = &credcache_table[credcache_slot(d)];
		memcpy(e->digest, d, sizeof(d));
		e->expires = now + (time_t)credcache_ttl;
	}
	pthread_mutex_unlock(&credcache_lock);
	explicit_bzero(d, sizeof(d));
}

/* credcache_clear - empty the table */
void credcache_clear(void)
{
	pthread_mutex_lock(&credcache_lock);
	explicit_bzero(credcache_table, sizeof(credcache_table));
	pthread_mutex_unlock(&credcache_lock);
}
