/* Gossip's elementwise CPU kernels: a round's mix (and DeTAG's extrapolation), the tracker's update, and the
 * finiteness checks, each one pass over memory where torch takes two to six. Compiled on first use by
 * `gossip_native.py` (plain C, no Python or torch headers) and called through ctypes; `gossip.py` keeps the torch
 * expressions as the reference and the fallback.
 *
 * Same bits as those expressions, which round after each operation but one: torch's `add(a, b, alpha=w)` on float32
 * CPU tensors is a fused multiply-add, a + w * b rounded once (its vector loops use FMA instructions). So are the
 * additions with a weight here (fmaf, or _mm256_fmadd_ps); everything else is one IEEE operation per rounding, built
 * with -ffp-contract=off. A CPU or torch build whose torch rounds twice there fails the self-check in
 * gossip_native.py and keeps the torch path.
 *
 * Finite: an element's exponent bits are not all ones (inf and NaN have all ones, nothing else does).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EXPONENT 0x7f800000u

#if (defined(__x86_64__) || defined(__i386__)) && !defined(LLSGD_PLAIN_ONLY) /* tests build the plain loop alone */
#include <immintrin.h>
#define HAVE_AVX2_VERSION 1
#endif

static inline int finite_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & EXPONENT) != EXPONENT;
}

static int all_finite_plain(const float* x, int64_t n) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i) finite &= finite_bits(x[i]);
    return finite;
}

static int copy_finite_plain(const float* source, float* out, int64_t n) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i) {
        float value = source[i];
        finite &= finite_bits(value);
        out[i] = value;
    }
    return finite;
}

static int track_plain(const float* y, const float* g, const float* old, float* out, float* last, int64_t n) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i) {
        float gradient = g[i];
        float value = (y[i] + gradient) - old[i];
        finite &= finite_bits(value);
        if (last != NULL) last[i] = gradient; /* after old[i] is read: last may be old */
        out[i] = value;
    }
    return finite;
}

static void mix_plain(const float* own, const float* const* received, const float* weights, int k,
                      const float* previous, float eta, float* out, float* copy, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        float o = own[i];
        float mixed = o;
        for (int j = 0; j < k; ++j) mixed = fmaf(weights[j], received[j][i] - o, mixed);
        if (previous != NULL) mixed = fmaf(eta, mixed - previous[i], mixed);
        out[i] = mixed;
        if (copy != NULL) copy[i] = mixed;
    }
}

#ifdef HAVE_AVX2_VERSION
__attribute__((target("avx2"))) static inline __m256i exponent_all_ones(__m256 v) {
    const __m256i exponent = _mm256_set1_epi32((int)EXPONENT);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exponent), exponent);
}

__attribute__((target("avx2"))) static int all_finite_avx2(const float* x, int64_t n) {
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) bad = _mm256_or_si256(bad, exponent_all_ones(_mm256_loadu_ps(x + i)));
    return _mm256_testz_si256(bad, bad) && all_finite_plain(x + i, n - i);
}

__attribute__((target("avx2"))) static int copy_finite_avx2(const float* source, float* out, int64_t n) {
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(source + i);
        bad = _mm256_or_si256(bad, exponent_all_ones(v));
        _mm256_storeu_ps(out + i, v);
    }
    return copy_finite_plain(source + i, out + i, n - i) && _mm256_testz_si256(bad, bad);
}

__attribute__((target("avx2"))) static int track_avx2(const float* y, const float* g, const float* old, float* out,
                                                       float* last, int64_t n) {
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gradient = _mm256_loadu_ps(g + i);
        __m256 value = _mm256_sub_ps(_mm256_add_ps(_mm256_loadu_ps(y + i), gradient), _mm256_loadu_ps(old + i));
        bad = _mm256_or_si256(bad, exponent_all_ones(value));
        if (last != NULL) _mm256_storeu_ps(last + i, gradient);
        _mm256_storeu_ps(out + i, value);
    }
    return track_plain(y + i, g + i, old + i, out + i, last != NULL ? last + i : NULL, n - i) &&
           _mm256_testz_si256(bad, bad);
}

__attribute__((target("avx2,fma"))) static void mix_avx2(const float* own, const float* const* received,
                                                          const float* weights, int k, const float* previous,
                                                          float eta, float* out, float* copy, int64_t n) {
    const __m256 extrapolation = _mm256_set1_ps(eta);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 o = _mm256_loadu_ps(own + i);
        __m256 mixed = o;
        for (int j = 0; j < k; ++j)
            mixed = _mm256_fmadd_ps(_mm256_set1_ps(weights[j]), _mm256_sub_ps(_mm256_loadu_ps(received[j] + i), o),
                                    mixed);
        if (previous != NULL)
            mixed = _mm256_fmadd_ps(extrapolation, _mm256_sub_ps(mixed, _mm256_loadu_ps(previous + i)), mixed);
        _mm256_storeu_ps(out + i, mixed);
        if (copy != NULL) _mm256_storeu_ps(copy + i, mixed);
    }
    if (i < n) {
        const float* rest[64];
        for (int j = 0; j < k; ++j) rest[j] = received[j] + i;
        mix_plain(own + i, rest, weights, k, previous != NULL ? previous + i : NULL, eta, out + i,
                  copy != NULL ? copy + i : NULL, n - i);
    }
}

static int use_avx2(void) {
    static int answer = -1;
    if (answer < 0) answer = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
    return answer;
}
#define DISPATCH(avx2_call, plain_call) return use_avx2() ? (avx2_call) : (plain_call)
#else
#define DISPATCH(avx2_call, plain_call) return (plain_call)
#endif

/* Which version runs here: 2 for AVX2 with FMA, 1 for the plain loop (both give the same bits). */
int llsgd_gossip_version(void) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) return 2;
#endif
    return 1;
}

/* 1 where every element of x[0..n) is finite, else 0. */
int llsgd_all_finite(const float* x, int64_t n) { DISPATCH(all_finite_avx2(x, n), all_finite_plain(x, n)); }

/* out[i] = source[i] for i in [0, n); returns whether they were all finite. */
int llsgd_copy_finite(const float* source, float* out, int64_t n) {
    DISPATCH(copy_finite_avx2(source, out, n), copy_finite_plain(source, out, n));
}

/* Gradient tracking: out[i] = (y[i] + g[i]) - old[i], and last[i] = g[i] unless last is NULL, for i in [0, n);
 * returns whether out is all finite. out may be y; last may be old; g aliases neither out nor last. */
int llsgd_track(const float* y, const float* g, const float* old, float* out, float* last, int64_t n) {
    DISPATCH(track_avx2(y, g, old, out, last, n), track_plain(y, g, old, out, last, n));
}

/* One gossip round on n elements, k <= 64 neighbours: mixed = own, then mixed = fma(weights[j], received[j] - own,
 * mixed) for j in order; out = fma(eta, mixed - previous, mixed) (the acceleration's extrapolation), or mixed where
 * previous is NULL; the same into copy unless it is NULL (DeTAG's tracker and direction). out may be own or
 * previous; received[j] and copy alias nothing else. */
void llsgd_gossip_mix(const float* own, const float* const* received, const float* weights, int k,
                      const float* previous, float eta, float* out, float* copy, int64_t n) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) {
        mix_avx2(own, received, weights, k, previous, eta, out, copy, n);
        return;
    }
#endif
    mix_plain(own, received, weights, k, previous, eta, out, copy, n);
}
