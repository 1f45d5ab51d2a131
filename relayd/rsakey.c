/*
 * rsakey - RSA server keys that sign through nettle's constant-time CRT root with cached
 * blinding.
 *
 * GnuTLS 3.7 with nettle 3.8 signs RSA with rsa_compute_root_tr: the constant-time CRT root
 * (_rsa_sec_compute_root, about 0.6 ms for RSA-2048 on our CI machine), preceded by a fresh
 * blinding factor per signature whose inverse it takes with the constant-time mpn_sec_invert,
 * which costs about as much again; with the rest, 1.5 ms a signature, against 0.3 ms for
 * OpenSSL. An RSA handshake costs one signature, so that was most of relayd's CPU per message
 * with an RSA certificate.
 *
 * rsakey keeps the same constant-time root (nettle's rsa_compute_root) and keeps blinding, but
 * draws the blinding factor as OpenSSL's BN_BLINDING does: a random r, with r^e and r^-1 mod n
 * computed once (the inverse in constant time), then both squared after each use, so each
 * signature has its own factor; a fresh r after RSAKEY_BLIND_USES uses, drawn by the thread
 * that used the last one up, outside the lock. The blinding arithmetic is constant-time too
 * (mpn_sec_mul and mpn_sec_div_r, as nettle's own blinding). Each signature is
 * checked (s^e = m mod n) before it leaves, so a fault in the CRT root cannot hand out a
 * signature that reveals a factor of n (Boneh-DeMillo-Lipton); nettle's _tr variant checks
 * the same.
 *
 * Padding is nettle's: EMSA-PSS with MGF1 and a salt as long as the hash (RFC 8017 9.1;
 * RFC 8446 4.2.3 rsa_pss_rsae_*), and EMSA-PKCS1-v1_5 over the DigestInfo GnuTLS hands over
 * (RFC 8017 9.2; TLS 1.2 peers without PSS).
 *
 * A key file's n, p and q are taken as they are written (GnuTLS recomputes only d, e1, e2
 * and u), so rsakey checks that they belong together (rsakey_consistent) before nettle sees
 * them: an n that is not pq would trip an assertion in rsa_compute_root.
 *
 * Invariants: the key's secret numbers live only in struct rsakey and are wiped when it is
 * freed; a signature that fails its check is never returned (and is logged); the blinding
 * pair is shared by the TLS threads under a mutex and each signature takes a different one.
 */
#include "rsakey.h"

#include "log.h"

#include <gmp.h>
#include <nettle/bignum.h>
#include <nettle/nettle-meta.h>
#include <nettle/pkcs1.h>
#include <nettle/pss.h>
#include <nettle/rsa.h>
#include <pthread.h>
#include <gnutls/crypto.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct rsakey {
	struct rsa_public_key pub;
	struct rsa_private_key priv;
	pthread_mutex_t lock; /* guards the blinding pair */
	mpz_t blind;	      /* r^e mod n */
	mpz_t unblind;	      /* r^-1 mod n */
	unsigned blind_uses;  /* signatures left for this r; 0: a fresh one is being drawn */
};

/* rsakey_wipe - zero an mpz's limbs, then free it */
static void rsakey_wipe(mpz_t z)
{
	size_t n = mpz_size(z);
	if (n)
		gnutls_memset(mpz_limbs_modify(z, n), 0, n * sizeof(mp_limb_t));
	mpz_clear(z);
}

/* rsakey_free - wipe and free a key */
static void rsakey_free(struct rsakey *k)
{
	if (!k)
		return;
	rsakey_wipe(k->priv.d);
	rsakey_wipe(k->priv.p);
	rsakey_wipe(k->priv.q);
	rsakey_wipe(k->priv.a);
	rsakey_wipe(k->priv.b);
	rsakey_wipe(k->priv.c);
	rsakey_wipe(k->blind);
	rsakey_wipe(k->unblind);
	rsa_public_key_clear(&k->pub);
	pthread_mutex_destroy(&k->lock);
	free(k);
}

/* rsakey_random - a uniformly random x with 1 < x < n, from GnuTLS's generator */
static int rsakey_random(mpz_t x, const mpz_t n)
{
	uint8_t buf[1024];
	size_t bits = mpz_sizeinbase(n, 2), len = (bits + 7) / 8;
	int rc = -1;
	for (int tries = 0; rc < 0 && tries < 100 && len <= sizeof(buf); tries++) {
		if (gnutls_rnd(GNUTLS_RND_RANDOM, buf, len) < 0)
			break;
		nettle_mpz_set_str_256_u(x, len, buf);
		mpz_fdiv_r_2exp(x, x, bits);
		if (mpz_cmp_ui(x, 1) > 0 && mpz_cmp(x, n) < 0)
			rc = 0;
	}
	gnutls_memset(buf, 0, sizeof(buf));
	return rc;
}

/* rsakey_limbs - x (< n) as exactly nn limbs, zero-padded, in dst */
static void rsakey_limbs(mp_limb_t *dst, const mpz_t x, mp_size_t nn)
{
	size_t xn = mpz_size(x);
	memcpy(dst, mpz_limbs_read(x), xn * sizeof(mp_limb_t));
	memset(dst + xn, 0, ((size_t)nn - xn) * sizeof(mp_limb_t));
}

/* rsakey_sec_invert - inv = x^-1 mod n in time independent of x (GMP's mpn_sec_invert);
 * -1 when x has no inverse */
static int rsakey_sec_invert(mpz_t inv, const mpz_t x, const mpz_t n)
{
	mp_size_t nn = mpz_size(n);
	size_t tn = (size_t)mpn_sec_invert_itch(nn);
	mp_limb_t a[RSAKEY_MAX_LIMBS];
	mp_limb_t *t = calloc(tn, sizeof(mp_limb_t));
	int ok = 0;
	if (t) {
		rsakey_limbs(a, x, nn);
		ok = mpn_sec_invert(mpz_limbs_write(inv, nn), a, mpz_limbs_read(n), nn, 2 * nn * GMP_NUMB_BITS, t);
		mpz_limbs_finish(inv, ok ? nn : 0);
		gnutls_memset(t, 0, tn * sizeof(mp_limb_t));
	}
	gnutls_memset(a, 0, sizeof(a));
	free(t);
	return ok ? 0 : -1;
}

/* rsakey_sec_mulmod - r = a*b mod n (a, b < n) in time independent of a and b (GMP's
 * mpn_sec_mul and mpn_sec_div_r, as nettle blinds); -1 when out of memory */
static int rsakey_sec_mulmod(mpz_t r, const mpz_t a, const mpz_t b, const mpz_t n)
{
	mp_size_t nn = mpz_size(n);
	size_t tn = (size_t)mpn_sec_mul_itch(nn, nn), dn = (size_t)mpn_sec_div_r_itch(2 * nn, nn);
	mp_limb_t ap[RSAKEY_MAX_LIMBS], bp[RSAKEY_MAX_LIMBS], prod[2 * RSAKEY_MAX_LIMBS];
	mp_limb_t *t = calloc(tn > dn ? tn : dn, sizeof(mp_limb_t));
	if (!t)
		return -1;
	rsakey_limbs(ap, a, nn);
	rsakey_limbs(bp, b, nn);
	mpn_sec_mul(prod, ap, nn, bp, nn, t);
	mpn_sec_div_r(prod, 2 * nn, mpz_limbs_read(n), nn, t);
	memcpy(mpz_limbs_write(r, nn), prod, (size_t)nn * sizeof(mp_limb_t));
	mpz_limbs_finish(r, nn);
	gnutls_memset(prod, 0, sizeof(prod));
	gnutls_memset(t, 0, (tn > dn ? tn : dn) * sizeof(mp_limb_t));
	free(t);
	return 0;
}

/* rsakey_draw - a fresh blinding pair for k: r random, blind = r^e, unblind = r^-1 mod n */
static int rsakey_draw(const struct rsakey *k, mpz_t blind, mpz_t unblind)
{
	mpz_t r;
	mpz_init(r);
	int rc = rsakey_random(r, k->pub.n);
	if (rc == 0)
		rc = rsakey_sec_invert(unblind, r, k->pub.n);
	if (rc == 0)
		mpz_powm_sec(blind, r, k->pub.e, k->pub.n);
	rsakey_wipe(r);
	return rc;
}

/* rsakey_next_blinding - the blinding pair for one signature: the last pair squared; the
 * signature that uses up RSAKEY_BLIND_USES draws the next pair outside the lock, while the
 * other threads go on squaring the old one */
static int rsakey_next_blinding(struct rsakey *k, mpz_t blind, mpz_t unblind)
{
	pthread_mutex_lock(&k->lock);
	int rc = rsakey_sec_mulmod(k->blind, k->blind, k->blind, k->pub.n);
	if (rc == 0)
		rc = rsakey_sec_mulmod(k->unblind, k->unblind, k->unblind, k->pub.n);
	mpz_set(blind, k->blind);
	mpz_set(unblind, k->unblind);
	bool draw = rc == 0 && k->blind_uses > 0 && --k->blind_uses == 0;
	pthread_mutex_unlock(&k->lock);
	if (!draw)
		return rc;
	mpz_t b, u;
	mpz_inits(b, u, NULL);
	bool drawn = rsakey_draw(k, b, u) == 0;
	pthread_mutex_lock(&k->lock);
	if (drawn) {
		mpz_swap(k->blind, b);
		mpz_swap(k->unblind, u);
	}
	k->blind_uses = drawn ? RSAKEY_BLIND_USES : 1; /* not drawn: the next signature tries again */
	pthread_mutex_unlock(&k->lock);
	rsakey_wipe(b);
	rsakey_wipe(u);
	return 0;
}

/* rsakey_root - s = m^d mod n, blinded, through the constant-time CRT root, and checked:
 * -1 (s zeroed, logged) when s^e is not m */
static int rsakey_root(struct rsakey *k, mpz_t s, const mpz_t m)
{
	mpz_t blind, unblind, x;
	mpz_inits(blind, unblind, x, NULL);
	int rc = rsakey_next_blinding(k, blind, unblind);
	if (rc == 0)
		rc = rsakey_sec_mulmod(x, m, blind, k->pub.n);
	if (rc == 0) {
		rsa_compute_root(&k->priv, s, x);
		rc = rsakey_sec_mulmod(s, s, unblind, k->pub.n);
	}
	if (rc == 0) {
		mpz_powm(x, s, k->pub.e, k->pub.n);
		if (mpz_cmp(x, m) != 0) {
			rc = -1;
			log_err("rsakey event=signature-check-failed bits=%zu: not sent (a fault in the CRT root, "
				"or a key whose numbers do not belong together)", mpz_sizeinbase(k->pub.n, 2));
		}
	}
	if (rc < 0)
		mpz_set_ui(s, 0);
	rsakey_wipe(blind);
	rsakey_wipe(unblind);
	rsakey_wipe(x);
	return rc;
}

/* rsakey_pss_hash - nettle's hash for an RSA-PSS signature algorithm, NULL for others */
static const struct nettle_hash *rsakey_pss_hash(gnutls_sign_algorithm_t algo)
{
	switch (algo) {
	case GNUTLS_SIGN_RSA_PSS_RSAE_SHA256:
		return &nettle_sha256;
	case GNUTLS_SIGN_RSA_PSS_RSAE_SHA384:
		return &nettle_sha384;
	case GNUTLS_SIGN_RSA_PSS_RSAE_SHA512:
		return &nettle_sha512;
	default:
		return NULL;
	}
}

/* rsakey_pkcs1 - is algo an RSA PKCS #1 v1.5 signature? (GnuTLS asks about these by name, then
 * hands over the DigestInfo as GNUTLS_SIGN_RSA_RAW) */
static bool rsakey_pkcs1(gnutls_sign_algorithm_t algo)
{
	switch (algo) {
	case GNUTLS_SIGN_RSA_SHA1:
	case GNUTLS_SIGN_RSA_SHA224:
	case GNUTLS_SIGN_RSA_SHA256:
	case GNUTLS_SIGN_RSA_SHA384:
	case GNUTLS_SIGN_RSA_SHA512:
	case GNUTLS_SIGN_RSA_SHA3_224:
	case GNUTLS_SIGN_RSA_SHA3_256:
	case GNUTLS_SIGN_RSA_SHA3_384:
	case GNUTLS_SIGN_RSA_SHA3_512:
	case GNUTLS_SIGN_RSA_RAW:
		return true;
	default:
		return false;
	}
}

/* rsakey_encode - m = the padded message for hash: a digest for PSS, a DigestInfo for PKCS #1
 * v1.5 (GNUTLS_SIGN_RSA_RAW; a PKCS #1 algorithm by name would come without one: refused) */
static int rsakey_encode(const struct rsakey *k, gnutls_sign_algorithm_t algo, const gnutls_datum_t *hash, mpz_t m)
{
	const struct nettle_hash *h = rsakey_pss_hash(algo);
	if (h) {
		uint8_t salt[64];
		if (hash->size != h->digest_size || gnutls_rnd(GNUTLS_RND_NONCE, salt, h->digest_size) < 0)
			return -1;
		return pss_encode_mgf1(m, mpz_sizeinbase(k->pub.n, 2) - 1, h, h->digest_size, salt, hash->data) ? 0
														 : -1;
	}
	if (algo == GNUTLS_SIGN_RSA_RAW)
		return pkcs1_rsa_digest_encode(m, k->pub.size, hash->size, hash->data) ? 0 : -1;
	return -1;
}

/* rsakey_sign_hash - GnuTLS's sign_hash callback: pad, take the checked root, write it out
 * as long as n */
static int rsakey_sign_hash(gnutls_privkey_t key, gnutls_sign_algorithm_t algo, void *userdata, unsigned flags,
			    const gnutls_datum_t *hash, gnutls_datum_t *signature)
{
	(void)key;
	(void)flags;
	struct rsakey *k = userdata;
	mpz_t m, s;
	mpz_inits(m, s, NULL);
	int rc = rsakey_encode(k, algo, hash, m) == 0 && rsakey_root(k, s, m) == 0 ? 0 : GNUTLS_E_PK_SIGN_FAILED;
	if (rc == 0) {
		signature->data = gnutls_malloc(k->pub.size);
		signature->size = (unsigned)k->pub.size;
		if (signature->data)
			nettle_mpz_get_str_256(k->pub.size, signature->data, s);
		else
			rc = GNUTLS_E_MEMORY_ERROR;
	}
	mpz_clears(m, s, NULL);
	return rc;
}

/* rsakey_info - GnuTLS's info callback: RSA, its size, the signature algorithms made here */
static int rsakey_info(gnutls_privkey_t key, unsigned flags, void *userdata)
{
	(void)key;
	struct rsakey *k = userdata;
	if (flags & GNUTLS_PRIVKEY_INFO_PK_ALGO)
		return GNUTLS_PK_RSA;
	if (flags & GNUTLS_PRIVKEY_INFO_PK_ALGO_BITS)
		return (int)mpz_sizeinbase(k->pub.n, 2);
	if (flags & GNUTLS_PRIVKEY_INFO_SIGN_ALGO)
		return GNUTLS_SIGN_UNKNOWN; /* no preference: GnuTLS picks by the peer's list */
	if (flags & GNUTLS_PRIVKEY_INFO_HAVE_SIGN_ALGO) {
		gnutls_sign_algorithm_t algo = GNUTLS_FLAGS_TO_SIGN_ALGO(flags);
		return rsakey_pss_hash(algo) || rsakey_pkcs1(algo);
	}
	return -1; /* what GnuTLS's API asks for a question it does not know */
}

/* rsakey_deinit - GnuTLS's deinit callback */
static void rsakey_deinit(gnutls_privkey_t key, void *userdata)
{
	(void)key;
	rsakey_free(userdata);
}

/* rsakey_set - z = the big-endian number in d */
static void rsakey_set(mpz_t z, const gnutls_datum_t *d)
{
	nettle_mpz_set_str_256_u(z, d->size, d->data);
}

/* rsakey_between - 0 < x < bound? */
static bool rsakey_between(const mpz_t x, const mpz_t bound)
{
	return mpz_sgn(x) > 0 && mpz_cmp(x, bound) < 0;
}

/* rsakey_consistent - do k's numbers make a key nettle can take (n = pq, p and q odd, the
 * CRT exponents and coefficient below their primes, n no longer than RSAKEY_MAX_LIMBS)? A
 * file whose n is not pq would trip an assertion in nettle's rsa_compute_root */
static bool rsakey_consistent(struct rsakey *k)
{
	if (!rsa_public_key_prepare(&k->pub) || !rsa_private_key_prepare(&k->priv) || k->priv.size != k->pub.size ||
	    mpz_size(k->pub.n) > RSAKEY_MAX_LIMBS || !mpz_odd_p(k->priv.p) || !mpz_odd_p(k->priv.q) ||
	    !mpz_odd_p(k->pub.e) || !rsakey_between(k->priv.a, k->priv.p) || !rsakey_between(k->priv.b, k->priv.q) ||
	    !rsakey_between(k->priv.c, k->priv.p))
		return false;
	mpz_t pq;
	mpz_init(pq);
	mpz_mul(pq, k->priv.p, k->priv.q);
	bool same = mpz_cmp(pq, k->pub.n) == 0;
	mpz_clear(pq);
	return same;
}

/* rsakey_from_numbers - a key from its numbers in nettle's form; NULL if they do not make one */
static struct rsakey *rsakey_from_numbers(const gnutls_datum_t v[RSAKEY_NUMBERS])
{
	struct rsakey *k = calloc(1, sizeof(*k));
	if (!k)
		return NULL;
	rsa_public_key_init(&k->pub);
	rsa_private_key_init(&k->priv);
	mpz_inits(k->blind, k->unblind, NULL);
	pthread_mutex_init(&k->lock, NULL);
	mpz_t *dst[RSAKEY_NUMBERS] = { &k->pub.n, &k->pub.e,  &k->priv.d, &k->priv.p,
				       &k->priv.q, &k->priv.c, &k->priv.a, &k->priv.b };
	for (int i = 0; i < RSAKEY_NUMBERS; i++)
		rsakey_set(*dst[i], &v[i]);
	if (!rsakey_consistent(k) || rsakey_draw(k, k->blind, k->unblind) < 0) {
		rsakey_free(k);
		return NULL;
	}
	k->blind_uses = RSAKEY_BLIND_USES;
	return k;
}

/* rsakey_self_test - does k sign a random message so that it verifies? (catches a key whose
 * CRT numbers do not belong together; every later signature is checked the same way) */
static bool rsakey_self_test(struct rsakey *k)
{
	mpz_t m, s;
	mpz_inits(m, s, NULL);
	bool ok = rsakey_random(m, k->pub.n) == 0 && rsakey_root(k, s, m) == 0;
	mpz_clears(m, s, NULL);
	return ok;
}

/* rsakey_import_numbers - a key from its numbers behind rsakey's callbacks */
gnutls_privkey_t rsakey_import_numbers(const gnutls_datum_t v[RSAKEY_NUMBERS])
{
	struct rsakey *k = rsakey_from_numbers(v);
	if (!k)
		return NULL;
	gnutls_privkey_t pk = NULL;
	if (!rsakey_self_test(k) || gnutls_privkey_init(&pk) < 0) {
		rsakey_free(k);
		return NULL;
	}
	if (gnutls_privkey_import_ext4(pk, k, NULL, rsakey_sign_hash, NULL, rsakey_deinit, rsakey_info, 0) < 0) {
		rsakey_free(k);
		gnutls_privkey_deinit(pk);
		return NULL;
	}
	return pk;
}

/* rsakey_import - x's RSA key behind rsakey's callbacks */
gnutls_privkey_t rsakey_import(gnutls_x509_privkey_t x)
{
	gnutls_datum_t v[RSAKEY_NUMBERS];
	if (gnutls_x509_privkey_get_pk_algorithm2(x, NULL) != GNUTLS_PK_RSA ||
	    gnutls_x509_privkey_export_rsa_raw2(x, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) < 0)
		return NULL;
	gnutls_privkey_t pk = rsakey_import_numbers(v);
	for (int i = 0; i < RSAKEY_NUMBERS; i++) {
		gnutls_memset(v[i].data, 0, v[i].size);
		gnutls_free(v[i].data);
	}
	return pk;
}

/* rsakey_load_x509 - the private key in file (PEM, PKCS #1 or PKCS #8 without a password) */
static gnutls_x509_privkey_t rsakey_load_x509(const char *file)
{
	gnutls_datum_t data = { NULL, 0 };
	gnutls_x509_privkey_t x = NULL;
	if (gnutls_load_file(file, &data) < 0)
		return NULL;
	if (gnutls_x509_privkey_init(&x) == 0 &&
	    gnutls_x509_privkey_import2(x, &data, GNUTLS_X509_FMT_PEM, NULL, 0) < 0) {
		gnutls_x509_privkey_deinit(x);
		x = NULL;
	}
	gnutls_memset(data.data, 0, data.size);
	gnutls_free(data.data);
	return x;
}

/* rsakey_matches - is the first certificate's public key the one in x? */
static bool rsakey_matches(const gnutls_pcert_st *cert, gnutls_x509_privkey_t x)
{
	uint8_t a[64], b[64];
	size_t alen = sizeof(a), blen = sizeof(b);
	return gnutls_pubkey_get_key_id(cert->pubkey, GNUTLS_KEYID_USE_SHA256, a, &alen) == 0 &&
	       gnutls_x509_privkey_get_key_id(x, GNUTLS_KEYID_USE_SHA256, b, &blen) == 0 && alen == blen &&
	       memcmp(a, b, alen) == 0;
}

/* rsakey_set_cert - a certificate chain with an rsakey key, or 1 to leave it to GnuTLS */
int rsakey_set_cert(gnutls_certificate_credentials_t cred, const char *certfile, const char *keyfile)
{
	gnutls_x509_privkey_t x = rsakey_load_x509(keyfile);
	if (!x)
		return 1;
	gnutls_pcert_st chain[16];
	unsigned n = sizeof(chain) / sizeof(chain[0]);
	if (gnutls_pcert_list_import_x509_file(chain, &n, certfile, GNUTLS_X509_FMT_PEM, NULL, NULL,
					       GNUTLS_X509_CRT_LIST_SORT) < 0) {
		gnutls_x509_privkey_deinit(x);
		return 1;
	}
	gnutls_privkey_t pk = rsakey_matches(&chain[0], x) ? rsakey_import(x) : NULL;
	gnutls_x509_privkey_deinit(x);
	int rc = pk ? gnutls_certificate_set_key(cred, NULL, 0, chain, (int)n, pk) : 0;
	if (pk && rc >= 0)
		return 0; /* cred owns the chain's certificates and the key now */
	for (unsigned i = 0; i < n; i++)
		gnutls_pcert_deinit(&chain[i]);
	if (!pk)
		return 1;
	gnutls_privkey_deinit(pk);
	return rc;
}
