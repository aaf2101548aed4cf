/* The scaled sign's CPU kernels: one pass to encode a block (the float64 sum of |x| and the sign bits together), one
 * pass to decode it. Compiled on first use by `native.py` (plain C, no Python or torch headers) and called through
 * ctypes; `compressors.py` keeps a torch implementation of the same arithmetic as the reference and the fallback.
 *
 * The sum's order is part of the payload format (scaled sign format 2), because LIEC-SGD's ranks each compute the
 * server's scale and must get the same bits: element i of a block adds into lane i % LANES, each lane in the order of
 * its elements, starting from 0; then the lanes are folded in halves, lane k += lane k + half, until one is left. The
 * AVX2 version adds 8 lanes at a time and so does exactly those additions: no FMA, no reassociation (built with
 * -ffp-contract=off), the same bits on every x86 CPU and on any other architecture through the plain C loop. (Lanes
 * that go through the block in order and a fold of halves are also what NumPy's reduction along the first axis and
 * elementwise additions do: the fallback in sign_format.py needs no loop in Python.)
 *
 * Decoding writes -scale where a bit is set and +scale elsewhere, or adds that to another vector (one rounding, as
 * torch's add), so that summing decoded payloads takes one pass per payload; or writes it beside what the
 * compression left out of the vector it was encoded from (x - C(x)), in the same pass.
 *
 * Sign bits: element i is bit i % 8 (least significant first) of byte i / 8, set where x < 0 (not for -0.0 or NaN),
 * the last byte's unused bits zero. A block starts on a byte (its length a multiple of 8 but for the last block).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define LANES 1024

#if (defined(__x86_64__) || defined(__i386__)) && !defined(LLSGD_PLAIN_ONLY) /* tests build the plain loop alone */
#include <immintrin.h>
#define HAVE_AVX2_VERSION 1
#endif

static double fold_lanes(double lane[LANES]) {
    for (int half = LANES / 2; half >= 1; half /= 2)
        for (int k = 0; k < half; ++k) lane[k] = lane[k] + lane[k + half];
    return lane[0];
}

/* The last elements of a block (fewer than 8): into their lanes one by one, and their sign bits. */
static void add_tail(const float* x, int64_t start, int64_t end, double lane[LANES], uint8_t* bits) {
    unsigned byte = 0;
    for (int64_t i = start; i < end; ++i) {
        lane[i % LANES] += (double)fabsf(x[i]);
        byte |= (unsigned)(x[i] < 0.0f) << (i - start);
    }
    if (bits != NULL && end > start) bits[start >> 3] = (uint8_t)byte;
}

static double abs_sum_signs_plain(const float* x, int64_t n, uint8_t* bits) {
    double lane[LANES] = {0.0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) { /* 8 divides LANES: a group of 8 never wraps around the lanes */
        double* at = lane + j % LANES;
        unsigned byte = 0;
        for (int k = 0; k < 8; ++k) {
            at[k] += (double)fabsf(x[j + k]);
            byte |= (unsigned)(x[j + k] < 0.0f) << k;
        }
        if (bits != NULL) bits[j >> 3] = (uint8_t)byte;
    }
    add_tail(x, j, n, lane, bits);
    return fold_lanes(lane);
}

static void decode_plain(const uint8_t* bits, int64_t n, float scale, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = ((bits[i >> 3] >> (i & 7)) & 1u) ? -scale : scale;
}

static void decode_add_plain(const uint8_t* bits, int64_t n, float scale, const float* addend, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = addend[i] + (((bits[i >> 3] >> (i & 7)) & 1u) ? -scale : scale);
}

static void residual_plain(const uint8_t* bits, int64_t n, float scale, const float* x, float* residual,
                           const float* addend, float* decoded) {
    for (int64_t i = 0; i < n; ++i) {
        float c = ((bits[i >> 3] >> (i & 7)) & 1u) ? -scale : scale;
        float value = x[i];
        residual[i] = value - c;
        decoded[i] = addend != NULL ? c + addend[i] : c;
    }
}

#ifdef HAVE_AVX2_VERSION
__attribute__((target("avx2"))) static double abs_sum_signs_avx2(const float* x, int64_t n, uint8_t* bits) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    double lane[LANES] = {0.0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        double* at = lane + j % LANES;
        __m256 v = _mm256_loadu_ps(x + j);
        if (bits != NULL) bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        __m256 a = _mm256_and_ps(v, magnitude);
        _mm256_storeu_pd(at, _mm256_add_pd(_mm256_loadu_pd(at), _mm256_cvtps_pd(_mm256_castps256_ps128(a))));
        _mm256_storeu_pd(at + 4, _mm256_add_pd(_mm256_loadu_pd(at + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
    }
    add_tail(x, j, n, lane, bits);
    return fold_lanes(lane);
}

/* The 8 values one byte of sign bits decodes to: -scale where bit k is set, +scale elsewhere. */
__attribute__((target("avx2"))) static inline __m256 signed_scales(uint8_t byte, float scale) {
    const __m256i weights = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), weights), weights);
    return _mm256_blendv_ps(_mm256_set1_ps(scale), _mm256_set1_ps(-scale), _mm256_castsi256_ps(set));
}

/* Each AVX2 loop below does whole bytes of bits; the plain loop finishes a last byte the vector ends inside. */
__attribute__((target("avx2"))) static void decode_avx2(const uint8_t* bits, int64_t n, float scale, float* out) {
    int64_t whole = n / 8;
    for (int64_t b = 0; b < whole; ++b) _mm256_storeu_ps(out + 8 * b, signed_scales(bits[b], scale));
    decode_plain(bits + whole, n - 8 * whole, scale, out + 8 * whole);
}

__attribute__((target("avx2"))) static void decode_add_avx2(const uint8_t* bits, int64_t n, float scale,
                                                             const float* addend, float* out) {
    int64_t whole = n / 8;
    for (int64_t b = 0; b < whole; ++b)
        _mm256_storeu_ps(out + 8 * b, _mm256_add_ps(_mm256_loadu_ps(addend + 8 * b), signed_scales(bits[b], scale)));
    decode_add_plain(bits + whole, n - 8 * whole, scale, addend + 8 * whole, out + 8 * whole);
}

__attribute__((target("avx2"))) static void residual_avx2(const uint8_t* bits, int64_t n, float scale, const float* x,
                                                           float* residual, const float* addend, float* decoded) {
    int64_t whole = n / 8;
    for (int64_t b = 0; b < whole; ++b) {
        __m256 c = signed_scales(bits[b], scale);
        __m256 value = _mm256_loadu_ps(x + 8 * b);
        __m256 out = addend != NULL ? _mm256_add_ps(c, _mm256_loadu_ps(addend + 8 * b)) : c;
        _mm256_storeu_ps(residual + 8 * b, _mm256_sub_ps(value, c));
        _mm256_storeu_ps(decoded + 8 * b, out);
    }
    residual_plain(bits + whole, n - 8 * whole, scale, x + 8 * whole, residual + 8 * whole,
                   addend != NULL ? addend + 8 * whole : NULL, decoded + 8 * whole);
}

static int use_avx2(void) {
    static int answer = -1;
    if (answer < 0) answer = __builtin_cpu_supports("avx2") ? 1 : 0;
    return answer;
}
#endif

/* Which version runs here: 2 for AVX2, 1 for the plain loop (both give the same bits). */
int llsgd_sign_version(void) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) return 2;
#endif
    return 1;
}

/* The float64 sum of |x[0..n)| in the order above; the sign bits into bits[0..ceil(n/8)) unless bits is NULL. */
double llsgd_abs_sum_signs(const float* x, int64_t n, uint8_t* bits) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) return abs_sum_signs_avx2(x, n, bits);
#endif
    return abs_sum_signs_plain(x, n, bits);
}

/* out[i] = -scale where bit i is set, +scale elsewhere, for i in [0, n). */
void llsgd_sign_decode(const uint8_t* bits, int64_t n, float scale, float* out) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) {
        decode_avx2(bits, n, scale, out);
        return;
    }
#endif
    decode_plain(bits, n, scale, out);
}

/* out[i] = addend[i] + (-scale where bit i is set, +scale elsewhere), for i in [0, n); out may be addend. */
void llsgd_sign_decode_add(const uint8_t* bits, int64_t n, float scale, const float* addend, float* out) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) {
        decode_add_avx2(bits, n, scale, addend, out);
        return;
    }
#endif
    decode_add_plain(bits, n, scale, addend, out);
}

/* With c = what llsgd_sign_decode writes: residual[i] = x[i] - c[i] and decoded[i] = c[i] (+ addend[i] unless addend
 * is NULL), for i in [0, n), in one pass. residual may be x; decoded must not alias x, residual or addend. */
void llsgd_sign_residual(const uint8_t* bits, int64_t n, float scale, const float* x, float* residual,
                         const float* addend, float* decoded) {
#ifdef HAVE_AVX2_VERSION
    if (use_avx2()) {
        residual_avx2(bits, n, scale, x, residual, addend, decoded);
        return;
    }
#endif
    residual_plain(bits, n, scale, x, residual, addend, decoded);
}
