// Decode attention over the paged KV cache as one C++ op, for compiled decode steps
// (surge/engine/compiled_decode.py): the same ATen calls as surge.models.attention's Python
// decode path (write K/V at the slots, gather each sequence's blocks, masked SDPA), without
// its ~100 us of Python per layer. The step's slots, block table and mask change shape every
// step, so they are set once per step (set_decode_context) rather than passed in: the graph
// sees only per-layer tensors of fixed shapes and compiles once per batch size.
#include <torch/library.h>
#include <ATen/ATen.h>

namespace {

struct DecodeContext {
  at::Tensor slots;  // [B] cache slot of each row's new token
  at::Tensor table;  // [B, blocks] block ids, padded with block 0
  at::Tensor bias;   // [Hkv * B, 1, blocks * block_size] additive mask, 0 or -inf
};

DecodeContext context;

// The Python path switches from SDPA to two batched matmuls above this batch (bf16 on CPU:
// SDPA wins at small batches, the matmuls at large ones).
constexpr int64_t kSdpaMaxBatch = 16;

void set_decode_context(const at::Tensor& slots, const at::Tensor& table,
                        const at::Tensor& bias) {
  context = DecodeContext{slots, table, bias};
}

void clear_decode_context() { context = DecodeContext{}; }

at::Tensor gather(const at::Tensor& cache, const at::Tensor& ids) {
  // [Hkv, blocks, block_size, D] at ids [B * n] -> [Hkv, B * n * block_size, D]
  const auto heads = cache.size(0), block_size = cache.size(2), dim = cache.size(3);
  return cache.view({heads, cache.size(1), block_size * dim})
      .index_select(1, ids)
      .view({heads, -1, dim});
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, double scale) {
  TORCH_CHECK(context.slots.defined(),
              "surge::decode_attention ran outside a decode context (set_decode_context)");
  const auto batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const auto kv_heads = k_cache.size(0), group = heads / kv_heads;
  k_cache.view({kv_heads, -1, dim}).index_copy_(1, context.slots, k.transpose(0, 1));
  v_cache.view({kv_heads, -1, dim}).index_copy_(1, context.slots, v.transpose(0, 1));
  const auto ids = context.table.reshape(-1);
  // [Hkv * B, L, D]: (KV head, sequence) rows, KV head outermost.
  const auto keys = gather(k_cache, ids).view({kv_heads * batch, -1, dim});
  const auto values = gather(v_cache, ids).view({kv_heads * batch, -1, dim});
  if (batch <= kSdpaMaxBatch) {
    auto per_sequence = [&](const at::Tensor& rows) {
      return rows.view({kv_heads, batch, rows.size(1), rows.size(2)}).transpose(0, 1);
    };
    const auto out = at::scaled_dot_product_attention(
        q.view({batch, kv_heads, group, dim}), per_sequence(keys), per_sequence(values),
        per_sequence(context.bias), 0.0, false, scale);
    return out.reshape({batch, heads * dim});
  }
  const auto grouped =
      q.view({batch, kv_heads, group, dim}).transpose(0, 1).reshape({kv_heads * batch, group, dim});
  const auto scores = at::baddbmm(context.bias, grouped, keys.transpose(1, 2), 1.0, scale);
  const auto probs = at::softmax(scores, -1, at::kFloat).to(values.scalar_type());
  return at::bmm(probs, values)
      .view({kv_heads, batch, group, dim})
      .transpose(0, 1)
      .reshape({batch, heads * dim});
}

}  // namespace

// Called from inductor's C++ wrapper through the dispatcher, no Python. The context setters
// run eagerly around the compiled step (catch-all kernels); the op itself is opaque to
// tracing (CompositeExplicitAutograd, with a fake kernel registered from Python).
TORCH_LIBRARY_FRAGMENT(surge, m) {
  m.def("set_decode_context(Tensor slots, Tensor table, Tensor bias) -> ()",
        &set_decode_context);
  m.def("clear_decode_context() -> ()", &clear_decode_context);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge, CompositeExplicitAutograd, m) {
  m.impl("decode_attention", &decode_attention);
}
