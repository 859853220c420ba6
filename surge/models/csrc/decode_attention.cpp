// Decode attention over the paged KV cache as one C++ op, for compiled decode steps
// (surge/engine/compiled_decode.py): it writes the new K/V at their slots and attends each
// row's query to its sequence's keys straight from the cache blocks. The Python decode path
// (surge.models.attention) gathers the blocks into a contiguous copy and runs SDPA; at decode
// sizes that costs far more than the arithmetic (SmolLM2, batch 1, 256 positions: ~90 us a
// layer, a quarter of a compiled int4 step, against a few us of multiply-adds). The step's
// slots, block table and lengths change shape every step, so they are set once per step
// (set_decode_context) rather than passed in: the graph sees only per-layer tensors of fixed
// shapes and compiles once per batch size.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && !defined(CPU_CAPABILITY_AVX512)
// ATen's 16-float vectors (their fast exp): built for this CPU, as inductor's kernels are.
#define CPU_CAPABILITY_AVX512
#endif
#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/cpu/vec/vec.h>
#endif

namespace {

struct DecodeContext {
  at::Tensor slots;    // [B] cache slot of each row's new token
  at::Tensor table;    // [B, blocks] block ids, padded with block 0
  at::Tensor lengths;  // [B] positions each row's query sees: 0 .. length - 1
  int64_t window = 0;  // sliding window (the last `window` positions), 0: none
  // The cache shape (blocks, block size) the context was last checked against: every layer of
  // a step has the same, so the check runs once a step, not once a layer.
  int64_t checked_blocks = -1;
  int64_t checked_block_size = -1;
};

DecodeContext context;

void set_decode_context(const at::Tensor& slots, const at::Tensor& table,
                        const at::Tensor& lengths, int64_t window) {
  TORCH_CHECK(table.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "surge::set_decode_context: block table and lengths must be int64");
  context = DecodeContext{slots, table.contiguous(), lengths.contiguous(), window};
}

void clear_decode_context() { context = DecodeContext{}; }

#if defined(__AVX512F__)
// Sixteen floats from sixteen elements of a KV cache row.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// q . k in float. With AVX-512 the accumulator stays in a register and is reduced once per
// dot product; compiled without it (or for the last dim % 16 elements) a plain loop serves.
// (The compiler's own vectorization of this loop reduced through memory, in a chain of 16
// dependent adds per dot product: most of the kernel's time.)
template <typename T>
float dot(const float* q, const T* k, int64_t dim) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; d < dim; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum;
}

// s[t] = exp(s[t] - top), t < count: the softmax's numerators (ATen's exp_u20 where built
// for AVX-512, the one flash attention's CPU kernel uses; scalar exp elsewhere).
void exp_shifted(float* s, int64_t count, float top) {
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  using Floats = at::vec::Vectorized<float>;
  const Floats shift(top);
  for (; t + Floats::size() <= count; t += Floats::size()) {
    (Floats::loadu(s + t) - shift).exp_u20().store(s + t);
  }
#endif
  for (; t < count; ++t) s[t] = std::exp(s[t] - top);
}

template <typename T>
void add_scaled(float* out, float weight, const T* v, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<float>(v[d]);
}

// One (sequence, KV head) pair: its `group` query heads share each key and value row read.
template <typename T>
struct Attend {
  const T* q;        // [B, H, D]
  const T* k_cache;  // [Hkv, cache_blocks, block_size, D]
  const T* v_cache;
  const int64_t* table;
  const int64_t* lengths;
  T* out;  // [B, H, D]
  int64_t kv_heads, group, dim, cache_blocks, block_size, table_width, window;
  float scale;

  // Calls visit(t, row) for positions first + t, t in [0, count), block by block.
  template <typename Visit>
  void for_each_row(const T* cache, int64_t head, int64_t seq, int64_t first, int64_t count,
                    Visit visit) const {
    const int64_t* blocks = table + seq * table_width;
    for (int64_t position = first; position < first + count;) {
      const int64_t offset = position % block_size;
      const int64_t run = std::min(block_size - offset, first + count - position);
      const T* rows = cache + ((head * cache_blocks + blocks[position / block_size]) * block_size
                               + offset) * dim;
      for (int64_t i = 0; i < run; ++i) visit(position - first + i, rows + i * dim);
      position += run;
    }
  }

  void operator()(int64_t seq, int64_t head, std::vector<float>& scores,
                  std::vector<float>& query, std::vector<float>& acc) const {
    const int64_t length = lengths[seq];
    const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
    const int64_t count = length - first;
    scores.resize(group * count);
    query.resize(group * dim);
    acc.assign(group * dim, 0.f);
    const T* q_heads = q + (seq * kv_heads + head) * group * dim;
    for (int64_t i = 0; i < group * dim; ++i) query[i] = static_cast<float>(q_heads[i]) * scale;
    for_each_row(k_cache, head, seq, first, count, [&](int64_t t, const T* key) {
      for (int64_t g = 0; g < group; ++g) scores[g * count + t] = dot(&query[g * dim], key, dim);
    });
    for (int64_t g = 0; g < group; ++g) {  // softmax, in place
      float* s = &scores[g * count];
      const float top = *std::max_element(s, s + count);
      exp_shifted(s, count, top);
      float total = 0.f;
      for (int64_t t = 0; t < count; ++t) total += s[t];
      const float inverse = 1.f / total;
      for (int64_t t = 0; t < count; ++t) s[t] *= inverse;
    }
    for_each_row(v_cache, head, seq, first, count, [&](int64_t t, const T* value) {
      for (int64_t g = 0; g < group; ++g) add_scaled(&acc[g * dim], scores[g * count + t], value, dim);
    });
    T* out_heads = out + (seq * kv_heads + head) * group * dim;
    for (int64_t i = 0; i < group * dim; ++i) out_heads[i] = static_cast<T>(acc[i]);
  }
};

// cache[h].view(-1, D)[slots[b]] = rows[b, h] for every row b and KV head h: one small copy
// each (index_copy_ cost ~5 us a call, two calls a layer, for a few hundred bytes).
void write_rows(at::Tensor& cache, const at::Tensor& rows, const at::Tensor& slots) {
  const auto slot_ids = slots.contiguous();
  const int64_t* slot = slot_ids.data_ptr<int64_t>();
  const int64_t batch = rows.size(0), kv_heads = rows.size(1), dim = rows.size(2);
  const int64_t slots_per_head = cache.size(1) * cache.size(2);
  const int64_t row_bytes = dim * static_cast<int64_t>(cache.element_size());
  auto* base = static_cast<char*>(cache.data_ptr());
  const auto* source = static_cast<const char*>(rows.data_ptr());
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < slots_per_head,
                "surge::decode_attention: slot ", slot[b], " is outside the KV cache");
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(base + (h * slots_per_head + slot[b]) * row_bytes,
                  source + (b * kv_heads + h) * row_bytes, row_bytes);
    }
  }
}

// The kernel reads the cache through raw pointers: a block id or length out of range would
// read outside it, so the step's context is checked first (B x blocks integers), once per
// cache shape.
void check_context(int64_t batch, int64_t cache_blocks, int64_t block_size) {
  TORCH_CHECK(context.table.size(0) == batch && context.lengths.numel() == batch &&
                  context.slots.numel() == batch,
              "surge::decode_attention: the decode context has ", context.table.size(0),
              " rows; the step has ", batch);
  if (cache_blocks == context.checked_blocks && block_size == context.checked_block_size) return;
  const int64_t width = context.table.size(1);
  const int64_t* table = context.table.data_ptr<int64_t>();
  const int64_t* lengths = context.lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= width * block_size,
                "surge::decode_attention: length ", lengths[b], " of row ", b,
                " is outside 1..", width * block_size);
  }
  for (int64_t i = 0; i < batch * width; ++i) {
    TORCH_CHECK(table[i] >= 0 && table[i] < cache_blocks, "surge::decode_attention: block ",
                table[i], " is outside the KV cache's ", cache_blocks, " blocks");
  }
  context.checked_blocks = cache_blocks;
  context.checked_block_size = block_size;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, double scale) {
  TORCH_CHECK(context.slots.defined(),
              "surge::decode_attention ran outside a decode context (set_decode_context)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "surge::decode_attention: the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type()
                  && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "surge::decode_attention: q, k, v and the KV cache must have one dtype");
  TORCH_CHECK(context.slots.scalar_type() == at::kLong,
              "surge::decode_attention: slots must be int64");
  const auto batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const auto kv_heads = k_cache.size(0);
  check_context(batch, k_cache.size(1), k_cache.size(2));
  write_rows(k_cache, k.contiguous(), context.slots);
  write_rows(v_cache, v.contiguous(), context.slots);
  const auto query = q.contiguous();
  auto out = at::empty({batch, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const Attend<scalar_t> attend{
        query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        context.table.data_ptr<int64_t>(), context.lengths.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), kv_heads, heads / kv_heads, dim, k_cache.size(1),
        k_cache.size(2), context.table.size(1), context.window, static_cast<float>(scale)};
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, query_row, acc;
      for (int64_t task = begin; task < end; ++task) {
        attend(task / kv_heads, task % kv_heads, scores, query_row, acc);
      }
    });
  });
  return out.view({batch, heads * dim});
}

}  // namespace

// Called from inductor's C++ wrapper through the dispatcher, no Python. The context setters
// run eagerly around the compiled step (catch-all kernels); the op itself is opaque to
// tracing (CompositeExplicitAutograd, with a fake kernel registered from Python).
TORCH_LIBRARY_FRAGMENT(surge, m) {
  m.def("set_decode_context(Tensor slots, Tensor table, Tensor lengths, int window) -> ()",
        &set_decode_context);
  m.def("clear_decode_context() -> ()", &clear_decode_context);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge, CompositeExplicitAutograd, m) {
  m.impl("decode_attention", &decode_attention);
}
