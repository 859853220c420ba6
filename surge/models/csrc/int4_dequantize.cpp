// int4 weights out of ATen's CPU int4 layout into a dense matrix, in one pass, for the
// many-token path of surge.models.quantization.Int4LinearMethod (dequantize, then the dense
// GEMM). In torch ops the same takes unpack, transpose, copy, subtract, multiply and add, each
// a pass over the weight: 1.7 ms for a 3072x576 layer, twice the GEMM it feeds at 512 tokens.
//
// The layout (_convert_weight_to_int4pack_for_cpu, AVX-512 build): per block of 64 rows and
// per column, 32 bytes; the low nibble of byte i is row i of the block, the high nibble row
// 32 + i. A value is (code - 8) * scale + zero, with one scale and zero per row and group of
// `group_size` columns, stored as scale_zeros [groups, rows, 2].
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kBlockBytes = kRowBlock / 2;  // bytes per column of a row block

#if defined(__AVX512F__)
// Sixteen floats into sixteen elements of the output, rounded to nearest even.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(c10::BFloat16* p, __m512 v) {
  // Round to nearest even on the dropped 16 bits (the values are finite: codes times scales).
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// Rows i and 32 + i of one row block, 16 columns at a time: one gather reads the column
// bytes of both rows (the word holding byte i of each column's 32), so each byte is read once.
template <typename T>
void dequantize_row_pair(const uint8_t* block, const T* scale_zeros, T* out, int64_t i,
                         int64_t first_row, int64_t rows, int64_t columns, int64_t group_size) {
  const __m512i column_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(kBlockBytes));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(8 * (i & 3)));
  const uint8_t* words = block + (i & ~int64_t{3});  // aligned words: no read past the block
  const int64_t low_row = first_row + i, high_row = low_row + kBlockBytes;
  T* low_out = out + low_row * columns;
  T* high_out = out + high_row * columns;
  for (int64_t c = 0; c < columns; c += 16) {
    const int64_t group = c / group_size;  // 16 columns lie in one group (group_size >= 32)
    const T* low_sz = scale_zeros + (group * rows + low_row) * 2;
    const T* high_sz = scale_zeros + (group * rows + high_row) * 2;
    const __m512i index = _mm512_add_epi32(column_offsets,
                                           _mm512_set1_epi32(static_cast<int>(c * kBlockBytes)));
    const __m512i bytes = _mm512_and_si512(
        _mm512_srl_epi32(_mm512_i32gather_epi32(index, words, 1), shift), _mm512_set1_epi32(0xFF));
    const __m512 eight = _mm512_set1_ps(8.f);
    const __m512 low = _mm512_sub_ps(
        _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), eight);
    const __m512 high = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), eight);
    store16(low_out + c, _mm512_fmadd_ps(low, _mm512_set1_ps(static_cast<float>(low_sz[0])),
                                         _mm512_set1_ps(static_cast<float>(low_sz[1]))));
    store16(high_out + c, _mm512_fmadd_ps(high, _mm512_set1_ps(static_cast<float>(high_sz[0])),
                                          _mm512_set1_ps(static_cast<float>(high_sz[1]))));
  }
}
#endif

template <typename T>
void dequantize_block_scalar(const uint8_t* bytes, const T* scale_zeros, T* out,
                             int64_t first_row, int64_t rows, int64_t columns,
                             int64_t group_size) {
  for (int64_t c = 0; c < columns; ++c) {
    const int64_t group = c / group_size;
    for (int64_t i = 0; i < kBlockBytes; ++i) {
      const uint8_t byte = bytes[c * kBlockBytes + i];
      const std::pair<int64_t, int> row_codes[] = {{first_row + i, byte & 15},
                                                   {first_row + kBlockBytes + i, byte >> 4}};
      for (const auto& [row, code] : row_codes) {
        const T* sz = scale_zeros + (group * rows + row) * 2;
        out[row * columns + c] = static_cast<T>(
            static_cast<float>(code - 8) * static_cast<float>(sz[0]) + static_cast<float>(sz[1]));
      }
    }
  }
}

template <typename T>
void dequantize_block(const uint8_t* packed, const T* scale_zeros, T* out, int64_t block,
                      int64_t rows, int64_t columns, int64_t group_size) {
  const uint8_t* bytes = packed + block * columns * kBlockBytes;
  const int64_t first_row = block * kRowBlock;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    for (int64_t i = 0; i < kBlockBytes; ++i) {
      dequantize_row_pair(bytes, scale_zeros, out, i, first_row, rows, columns, group_size);
    }
    return;
  }
#endif
  dequantize_block_scalar(bytes, scale_zeros, out, first_row, rows, columns, group_size);
}

void dequantize_int4pack(const at::Tensor& packed, const at::Tensor& scale_zeros,
                         int64_t group_size, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(),
              "surge::dequantize_int4pack: out must be a contiguous [rows, columns] matrix");
  const int64_t rows = out.size(0), columns = out.size(1);
  TORCH_CHECK(rows % kRowBlock == 0 && group_size >= 32 && group_size % 16 == 0 &&
                  columns % group_size == 0,
              "surge::dequantize_int4pack: rows must be a multiple of 64 and columns of the "
              "group size (a multiple of 16, at least 32); got ", rows, "x", columns,
              ", group size ", group_size);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == rows * columns / 2,
              "surge::dequantize_int4pack: packed must hold rows x columns / 2 contiguous bytes");
  TORCH_CHECK(scale_zeros.scalar_type() == out.scalar_type() && scale_zeros.is_contiguous() &&
                  scale_zeros.dim() == 3 && scale_zeros.size(0) == columns / group_size &&
                  scale_zeros.size(1) == rows && scale_zeros.size(2) == 2,
              "surge::dequantize_int4pack: scale_zeros must be [groups, rows, 2] in out's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_int4pack", [&] {
    const uint8_t* bytes = packed.data_ptr<uint8_t>();
    const scalar_t* sz = scale_zeros.data_ptr<scalar_t>();
    scalar_t* dense = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows / kRowBlock, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        dequantize_block(bytes, sz, dense, block, rows, columns, group_size);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surge, m) {
  m.def("dequantize_int4pack(Tensor packed, Tensor scale_zeros, int group_size, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(surge, CPU, m) {
  m.impl("dequantize_int4pack", &dequantize_int4pack);
}
