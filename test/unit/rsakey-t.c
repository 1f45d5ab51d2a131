/*
 * rsakey-t - unit tests of rsakey: its signatures verify (every algorithm TLS asks for, across
 * several fresh blinding factors), PKCS #1 v1.5 ones are byte for byte GnuTLS's own, and a key
 * whose CRT numbers do not belong together is refused rather than used.
 */
#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>
#include <pthread.h>
#include <string.h>

#include "../../relayd/rsakey.h"
#include "tap.h"

static gnutls_x509_privkey_t x509_key;	/* a fresh RSA-2048 key */
static gnutls_privkey_t gnutls_key;	/* the same key, signing through GnuTLS */
static gnutls_pubkey_t pub;		/* its public half */

static const gnutls_datum_t message = { (unsigned char *)"relayd rsakey test message", 27 };

/* verifies - does sig verify as algo over message under pub? */
static bool verifies(gnutls_sign_algorithm_t algo, const gnutls_datum_t *sig)
{
	return gnutls_pubkey_verify_data2(pub, algo, 0, &message, sig) >= 0;
}

/* sign - rc of signing message with k as algo; *sig holds the signature */
static int sign(gnutls_privkey_t k, gnutls_sign_algorithm_t algo, gnutls_datum_t *sig)
{
	sig->data = NULL;
	sig->size = 0;
	return gnutls_privkey_sign_data2(k, algo, 0, &message, sig);
}

static void test_algorithms(gnutls_privkey_t k)
{
	static const struct {
		gnutls_sign_algorithm_t algo;
		const char *name;
	} algos[] = {
		{ GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, "rsa_pss_rsae_sha256" },
		{ GNUTLS_SIGN_RSA_PSS_RSAE_SHA384, "rsa_pss_rsae_sha384" },
		{ GNUTLS_SIGN_RSA_PSS_RSAE_SHA512, "rsa_pss_rsae_sha512" },
		{ GNUTLS_SIGN_RSA_SHA256, "rsa_pkcs1_sha256" },
		{ GNUTLS_SIGN_RSA_SHA384, "rsa_pkcs1_sha384" },
		{ GNUTLS_SIGN_RSA_SHA512, "rsa_pkcs1_sha512" },
	};
	for (size_t i = 0; i < sizeof(algos) / sizeof(algos[0]); i++) {
		gnutls_datum_t sig;
		int rc = sign(k, algos[i].algo, &sig);
		ok(rc == 0 && sig.size == 256 && verifies(algos[i].algo, &sig), "%s: 256 bytes that verify",
		   algos[i].name);
		gnutls_free(sig.data);
	}
}

static void test_same_as_gnutls(gnutls_privkey_t k)
{
	gnutls_datum_t a, b;
	int ra = sign(k, GNUTLS_SIGN_RSA_SHA256, &a), rb = sign(gnutls_key, GNUTLS_SIGN_RSA_SHA256, &b);
	ok(ra == 0 && rb == 0 && a.size == b.size && memcmp(a.data, b.data, a.size) == 0,
	   "a PKCS #1 v1.5 signature is byte for byte GnuTLS's (the blinding is taken off exactly)");
	gnutls_free(a.data);
	gnutls_free(b.data);
	int rc = sign(k, GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, &a);
	rc |= sign(k, GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, &b);
	ok(rc == 0 && a.size == b.size && memcmp(a.data, b.data, a.size) != 0,
	   "two PSS signatures of the same message differ (a random salt each)");
	gnutls_free(a.data);
	gnutls_free(b.data);
}

static void test_many(gnutls_privkey_t k)
{
	int good = 0, n = 4 * RSAKEY_BLIND_USES + 3;
	for (int i = 0; i < n; i++) {
		gnutls_datum_t sig;
		gnutls_sign_algorithm_t algo = i % 2 ? GNUTLS_SIGN_RSA_SHA256 : GNUTLS_SIGN_RSA_PSS_RSAE_SHA256;
		if (sign(k, algo, &sig) == 0 && verifies(algo, &sig))
			good++;
		gnutls_free(sig.data);
	}
	is_int(good, n, "every signature verifies across four fresh blinding factors and their squares");
}

struct thread_arg {
	gnutls_privkey_t k;
	int good;
};

static void *signer_thread(void *p)
{
	struct thread_arg *a = p;
	for (int i = 0; i < 40; i++) {
		gnutls_datum_t sig;
		if (sign(a->k, GNUTLS_SIGN_RSA_SHA512, &sig) == 0 && verifies(GNUTLS_SIGN_RSA_SHA512, &sig))
			a->good++;
		gnutls_free(sig.data);
	}
	return NULL;
}

static void test_threads(gnutls_privkey_t k)
{
	pthread_t t[4];
	struct thread_arg a[4];
	for (int i = 0; i < 4; i++) {
		a[i] = (struct thread_arg){ k, 0 };
		pthread_create(&t[i], NULL, signer_thread, &a[i]);
	}
	int good = 0;
	for (int i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		good += a[i].good;
	}
	is_int(good, 160, "four threads sharing the blinding pair: 160 signatures that verify");
}

/* refused - does rsakey refuse the numbers w (and not abort)? */
static bool refused(const gnutls_datum_t *w)
{
	gnutls_privkey_t k = rsakey_import_numbers(w);
	gnutls_privkey_deinit(k);
	return k == NULL;
}

static void test_faulty_key(void)
{
	gnutls_datum_t v[RSAKEY_NUMBERS], w[RSAKEY_NUMBERS];
	gnutls_x509_privkey_export_rsa_raw2(x509_key, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
	memcpy(w, v, sizeof(w));
	ok(!refused(w), "the key's own numbers are taken");
	w[RSAKEY_E1].data[w[RSAKEY_E1].size - 1] ^= 2; /* d mod (p-1) off by two: a faulty CRT half */
	ok(refused(w), "with e1 off by two they are refused: the self-test signature does not verify");
	w[RSAKEY_E1].data[w[RSAKEY_E1].size - 1] ^= 2;
	w[RSAKEY_N].data[w[RSAKEY_N].size / 2] ^= 0x10; /* GnuTLS takes n as a file has it */
	ok(refused(w), "an n that is not pq is refused");
	w[RSAKEY_N].data[w[RSAKEY_N].size / 2] ^= 0x10;
	unsigned char longer[RSAKEY_MAX_LIMBS * 8 + 1] = { 1 }; /* 1 || n: a byte longer than pq */
	memcpy(longer + 1, v[RSAKEY_N].data, v[RSAKEY_N].size);
	w[RSAKEY_N] = (gnutls_datum_t){ longer, v[RSAKEY_N].size + 1 };
	ok(refused(w), "an n a byte longer than pq is refused (nettle would abort on an assertion)");
	w[RSAKEY_N] = v[RSAKEY_N];
	w[RSAKEY_E1] = v[RSAKEY_N];
	ok(refused(w), "a CRT exponent above p is refused");
	memcpy(w, v, sizeof(w));
	w[RSAKEY_P] = v[RSAKEY_Q];
	w[RSAKEY_Q] = v[RSAKEY_P];
	ok(refused(w), "p and q swapped, e1, e2 and u left: refused");
	memcpy(w, v, sizeof(w));
	ok(!refused(w), "and the key's own numbers once more: taken");
	for (int i = 0; i < RSAKEY_NUMBERS; i++)
		gnutls_free(v[i].data);
}

static void test_not_rsa(void)
{
	gnutls_x509_privkey_t ec;
	gnutls_x509_privkey_init(&ec);
	int rc = gnutls_x509_privkey_generate(ec, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0);
	ok(rc == 0 && rsakey_import(ec) == NULL, "an ECDSA key is left to GnuTLS");
	gnutls_x509_privkey_deinit(ec);
}

int main(void)
{
	plan(20);
	gnutls_global_init();
	gnutls_x509_privkey_init(&x509_key);
	if (gnutls_x509_privkey_generate(x509_key, GNUTLS_PK_RSA, 2048, 0) < 0)
		diag("cannot make an RSA key");
	gnutls_privkey_init(&gnutls_key);
	gnutls_privkey_import_x509(gnutls_key, x509_key, 0);
	gnutls_pubkey_init(&pub);
	gnutls_pubkey_import_privkey(pub, gnutls_key, 0, 0);

	gnutls_privkey_t k = rsakey_import(x509_key);
	ok(k != NULL, "an RSA-2048 key is taken");
	int bits = 0;
	ok(k && gnutls_privkey_get_pk_algorithm(k, (unsigned *)&bits) == GNUTLS_PK_RSA && bits == 2048,
	   "it says RSA, 2048 bits");
	if (k) {
		test_algorithms(k);
		test_same_as_gnutls(k);
		test_many(k);
		test_threads(k);
	}
	test_faulty_key();
	test_not_rsa();
	gnutls_privkey_deinit(k);
	gnutls_pubkey_deinit(pub);
	gnutls_privkey_deinit(gnutls_key);
	gnutls_x509_privkey_deinit(x509_key);
	gnutls_global_deinit();
	return done_testing();
}
