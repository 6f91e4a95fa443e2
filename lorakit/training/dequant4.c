/* 4-bit codes to weights for training on a quantized base (lorakit/training/native.py builds and loads this).

   W[o, j] = ((lut[c] - Z) * S - M) for the code c of weight j of row o (two codes a byte, the first in the high
   nibble), Z, S and M per group of `group` columns, each operation rounded to fp32 as torch's eager arithmetic
   rounds it (built with -ffp-contract=off: no fused multiply-add), then stored as fp32 or rounded once to bf16
   (round to nearest even, NaN as 0x7FC0: torch's conversion). Rows [row0, row1), split over OpenMP threads: built
   with -fopenmp, this library needs libgomp.so.1, which inside a torch process is torch's own (already loaded), so
   the kernel runs on torch's threads instead of competing with them while they spin after a matmul.
   Grid tensors are read at S[o * s_row + g * s_group] (strides 0 broadcast one value). AVX-512 only, with `in` and
   `group` multiples of 16 (lorakit_dequant4_vector says whether this CPU has it; the caller checks the rest). */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *codes;  /* [out, in / 2] */
    const float *lut;      /* [16] */
    const float *S, *Z, *M; /* Z, M may be NULL */
    int64_t in, group, s_row, s_group, z_row, z_group, m_row, m_group;
    void *out;             /* [out, in], fp32 or bf16 */
    int bf16;
} job_t;

#if defined(__x86_64__)
/* 16 weights (8 bytes of codes) a step: the 16-value table is one register, looked up with a permute. */
__attribute__((target("avx512f"))) static void rows_avx512(const job_t *j, int64_t row0, int64_t row1) {
    const __m512 lut = _mm512_loadu_ps(j->lut);
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i low4 = _mm512_set1_epi32(15);
    const __m512i exponent = _mm512_set1_epi32(0x7f800000), magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512i round = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), nan = _mm512_set1_epi32(0x7fc0);
#pragma omp parallel for schedule(static)
    for (int64_t o = row0; o < row1; o++) {
        const uint8_t *c = j->codes + o * (j->in / 2);
        for (int64_t k = 0; k < j->in; k += 16) {
            int64_t g = k / j->group;
            uint64_t eight;
            memcpy(&eight, c + k / 2, 8);
            __m128i bytes = _mm_cvtsi64_si128((long long)eight);
            __m512i pairs = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)); /* b0 b0 b1 b1 ... */
            __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(pairs, shifts), low4);
            __m512 v = _mm512_permutexvar_ps(idx, lut);
            if (j->Z) v = _mm512_sub_ps(v, _mm512_set1_ps(j->Z[o * j->z_row + g * j->z_group]));
            v = _mm512_mul_ps(v, _mm512_set1_ps(j->S[o * j->s_row + g * j->s_group]));
            if (j->M) v = _mm512_sub_ps(v, _mm512_set1_ps(j->M[o * j->m_row + g * j->m_group]));
            if (!j->bf16) {
                _mm512_storeu_ps((float *)j->out + o * j->in + k, v);
                continue;
            }
            __m512i u = _mm512_castps_si512(v);
            __m512i r = _mm512_srli_epi32(
                _mm512_add_epi32(_mm512_add_epi32(u, round), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
            __mmask16 isnan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, magnitude), exponent);
            r = _mm512_mask_mov_epi32(r, isnan, nan);
            _mm256_storeu_si256((__m256i *)((uint16_t *)j->out + o * j->in + k), _mm512_cvtepi32_epi16(r));
        }
    }
}
#endif

int lorakit_dequant4_vector(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

void lorakit_dequant4(const uint8_t *codes, const float *lut, const float *S, int64_t s_row, int64_t s_group,
                      const float *Z, int64_t z_row, int64_t z_group, const float *M, int64_t m_row,
                      int64_t m_group, int64_t in, int64_t group, void *out, int bf16, int64_t row0, int64_t row1) {
#if defined(__x86_64__)
    job_t j = {codes, lut, S, Z, M, in, group, s_row, s_group, z_row, z_group, m_row, m_group, out, bf16};
    rows_avx512(&j, row0, row1);
#else
    (void)codes, (void)lut, (void)S, (void)s_row, (void)s_group, (void)Z, (void)z_row, (void)z_group, (void)M;
    (void)m_row, (void)m_group, (void)in, (void)group, (void)out, (void)bf16, (void)row0, (void)row1;
#endif
}
