/*
 * passwd - salted slow password hashes through crypt(3) from libxcrypt.
 * New hashes are yescrypt ("$y$") with a salt from the kernel's random source
 * (crypt_gensalt_rn with no entropy argument). Verification recomputes the hash
 * with the stored one as setting and compares in constant time, so any method
 * libxcrypt knows is accepted on verify.
 * Invariants: thread-safe (struct crypt_data on the caller's stack, nothing
 * static); the crypt_data, which holds the password's derived state, is wiped.
 * Slow by design: never call from the event loop.
 */
#include "passwd.h"

#include <crypt.h>
#include <string.h>

#define PASSWD_PREFIX "$y$"

/* passwd_hash - hash password with a fresh random salt into out; -1 on failure */
int passwd_hash(const char *password, char *out, size_t outlen)
{
	struct crypt_data cd;
	char salt[CRYPT_GENSALT_OUTPUT_SIZE];
	const char *h;
	size_t len;
	int rc = -1;

	if (!password || !out || outlen == 0)
		return -1;
	out[0] = '\0';
	if (!crypt_gensalt_rn(PASSWD_PREFIX, 0, NULL, 0, salt, (int)sizeof(salt)))
		return -1;
	memset(&cd, 0, sizeof(cd));
	h = crypt_rn(password, salt, &cd, (int)sizeof(cd));
	/* failure is NULL or a string starting with '*' */
	if (h && h[0] != '*') {
		len = strlen(h);
		if (len < outlen) {
			memcpy(out, h, len + 1);
			rc = 0;
		}
	}
	explicit_bzero(&cd, sizeof(cd));
	explicit_bzero(salt, sizeof(salt));
	return rc;
}

/* passwd_verify - true when password matches hash (constant-time compare) */
bool passwd_verify(const char *password, const char *hash)
{
	struct crypt_data cd;
	const char *h;
	size_t hlen, i;
	unsigned char diff = 0;
	bool match = false;

	if (!password || !hash || hash[0] == '\0' || hash[0] == '*')
		return false;
	memset(&cd, 0, sizeof(cd));
	h = crypt_rn(password, hash, &cd, (int)sizeof(cd));
	if (h && h[0] != '*') {
		hlen = strlen(hash);
		if (strlen(h) == hlen) {
			for (i = 0; i < hlen; i++)
				diff |= (unsigned char)(h[i] ^ hash[i]);
			match = diff == 0;
		}
	}
	explicit_bzero(&cd, sizeof(cd));
	return match;
}
