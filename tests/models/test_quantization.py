"""Weight-only int8/int4 linear methods: accuracy against their own dequantized weights on both
kernel paths, the rounding error the docstring promises, GGUF blocks kept exactly, a quantized
tiny model's greedy answers independent of batching, and clear errors where it cannot run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from surge import LLM, SamplingParams
from surge.config import EngineConfig, add_engine_args
from surge.models.gguf import GGUFCheckpoint
from surge.models.linear import Linear, UnquantizedLinearMethod
from surge.models.loader import build_model, load_model, resident_weight_bytes
from surge.models.quantization import (
    Int4LinearMethod,
    Int8Embedding,
    Int8LinearMethod,
    WeightOnlyLinearMethod,
    dequantized_weight,
    quantization_method,
    unpack_int4,
)
from tests.models.tiny_gguf import TinyGGUF, hf_weights

ALWAYS_KERNEL, ALWAYS_DENSE = 1 << 20, 1  # thresholds that force one path
METHODS = {
    "int8": lambda threshold: Int8LinearMethod(threshold),
    "int4-g32": lambda threshold: Int4LinearMethod(32, threshold),
    "int4-g64": lambda threshold: Int4LinearMethod(64, threshold),
    "int4-g128": lambda threshold: Int4LinearMethod(128, threshold),
}


def quantized_layer(method: WeightOnlyLinearMethod, weight: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype,
                    output_sizes: list[int]) -> Linear:
    """A layer built as the loader builds it (meta, serving dtype), loaded shard by shard."""
    layer = build_model(lambda _: Linear(weight.shape[1], output_sizes, bias is not None, method),
                        None, dtype, torch.device("cpu"))
    start = 0
    for shard, rows in enumerate(output_sizes):
        layer.weight_loaders["weight"](layer, weight[start:start + rows], shard)
        start += rows
    if bias is not None:
        layer.weight_loaders["bias"](layer, bias, None)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("path", ["kernel", "dense"])
@pytest.mark.parametrize("name", list(METHODS))
def test_quantized_linear_equals_its_dequantized_reference(name: str, path: str,
                                                           dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # q/k/v-like shards; 48 + 16 + 16 = 80 rows is not a multiple of the int4 layout's 64.
    output_sizes, columns = [48, 16, 16], 256
    weight, bias = torch.randn(80, columns) * 0.05, torch.randn(80)
    threshold = ALWAYS_KERNEL if path == "kernel" else ALWAYS_DENSE
    layer = quantized_layer(METHODS[name](threshold), weight, bias, dtype, output_sizes)
    reference_weight = dequantized_weight(layer)
    for tokens in (1, 37):
        x = torch.randn(tokens, columns).to(dtype)
        expected = x.float() @ reference_weight.T + bias
        out = layer(x)
        assert out.dtype == dtype and out.shape == (tokens, 80)
        scale = expected.abs().max().item()
        # float32: the same products, summed in another order; bfloat16: the output's rounding
        # (and, on the dense path, the dequantized weight's rounding to bfloat16).
        tolerance = 1e-5 * scale if dtype == torch.float32 else 2e-2 * scale
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_dequantize_in_cpp_equals_the_torch_ops_bit_for_bit(group: int) -> None:
    from surge.models.native_attention import load_native_ops

    if not load_native_ops():
        pytest.skip("Surge's C++ CPU ops did not build here")
    torch.manual_seed(2)
    # 200 rows: four row blocks of the int4 layout, the last padded; 512 columns: 4-16 groups.
    weight = torch.randn(200, 512) * 0.05
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        method = Int4LinearMethod(group, ALWAYS_KERNEL)
        layer = quantized_layer(method, weight, None, torch.float32, [200])
        layer.scale_zeros = layer.scale_zeros.to(dtype)
        # The torch ops in float64 (exact: 4-bit codes times scales of <= 24 bits, plus zeros),
        # then one rounding to dtype; the C++ op rounds its float FMA once, to nearest even.
        exact = torch.empty(method.stored_rows(layer), 512, dtype=torch.float64)
        method.dequantize_into(layer, exact)
        out = torch.full_like(exact, float("nan"), dtype=dtype)
        method.dequantize_into(layer, out)
        assert torch.equal(out, exact.to(dtype)), dtype
        assert torch.equal(out.float()[:200], dequantized_weight(layer).to(dtype).float())


def test_rounding_error_is_within_the_documented_bound() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 256) * 0.05
    int8 = quantized_layer(Int8LinearMethod(ALWAYS_KERNEL), weight, None, torch.float32, [64])
    row_step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((dequantized_weight(int8) - weight).abs() <= row_step / 2 * (1 + 1e-5)).all()
    for group in (32, 64, 128):
        int4 = quantized_layer(Int4LinearMethod(group, ALWAYS_KERNEL), weight, None,
                               torch.float32, [64])
        grouped = weight.view(64, -1, group)
        step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / 15
        error = (dequantized_weight(int4).view(64, -1, group) - grouped).abs()
        assert (error <= step / 2 * (1 + 1e-5)).all(), group
    # Smaller groups, smaller error; int8 beats every int4.
    errors = [(dequantized_weight(quantized_layer(Int4LinearMethod(g, ALWAYS_KERNEL), weight,
                                                  None, torch.float32, [64])) - weight)
              .abs().mean().item() for g in (32, 64, 128)]
    assert errors == sorted(errors)
    assert (dequantized_weight(int8) - weight).abs().mean().item() < errors[0] / 4


def test_threshold_is_measured_once_per_shape() -> None:
    weight = torch.randn(128, 256) * 0.05
    first = quantized_layer(Int8LinearMethod(), weight, None, torch.bfloat16, [128])
    second = quantized_layer(Int8LinearMethod(), weight, None, torch.bfloat16, [128])
    assert first.kernel_threshold == second.kernel_threshold >= 1
    fixed = quantized_layer(Int8LinearMethod(threshold=5), weight, None, torch.bfloat16, [128])
    assert fixed.kernel_threshold == 5


def test_resident_weights_shrink() -> None:
    weight = torch.randn(576, 1536)
    plain = build_model(lambda _: Linear(1536, 576, False), None, torch.bfloat16,
                        torch.device("cpu"))
    plain.weight.data.copy_(weight)
    plain.method.process_weights_after_loading(plain)
    int8 = quantized_layer(Int8LinearMethod(ALWAYS_KERNEL), weight, None, torch.bfloat16, [576])
    int4 = quantized_layer(Int4LinearMethod(32, ALWAYS_KERNEL), weight, None, torch.bfloat16,
                           [576])
    assert int8.weight_bytes() <= 0.51 * plain.weight_bytes()
    assert int4.weight_bytes() <= 0.32 * plain.weight_bytes()


# -- GGUF blocks -------------------------------------------------------------------------------

def gguf_reference(checkpoint: GGUFCheckpoint, names: list[str]) -> torch.Tensor:
    """llama.cpp's own dequantization of the stored blocks, shards stacked as the layer is."""
    return torch.cat([checkpoint.raw_tensor(name).dequantize() for name in names])


def stored_codes(checkpoint: GGUFCheckpoint, names: list[str]) -> torch.Tensor:
    """The 4-bit codes as stored in the file's Q4 blocks."""
    rows = []
    for name in names:
        raw = checkpoint.raw_tensor(name)
        block_bytes = 18 if raw.ggml_type == "Q4_0" else 20
        blocks = raw.data.reshape(raw.shape[0], -1, block_bytes)[..., block_bytes - 16:]
        rows.append(np.concatenate((blocks & 15, blocks >> 4), -1).reshape(raw.shape))
    return torch.from_numpy(np.concatenate(rows))


SHARDS = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          "self_attn.o_proj": ["self_attn.o_proj"],
          "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
          "mlp.down_proj": ["mlp.down_proj"]}


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1], ids=["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_are_repacked_exactly(tmp_path: Path, kind: Q) -> None:
    path = TinyGGUF(tensor_type=kind).write(tmp_path / "tiny.gguf")
    checkpoint = GGUFCheckpoint(path)
    model = load_model(path, "float32", "cpu", quantization="int4").model
    for module, shards in SHARDS.items():
        layer = model.get_submodule(f"model.layers.0.{module}")
        names = [f"model.layers.0.{shard}.weight" for shard in shards]
        rows = layer.method.stored_rows(layer)
        codes = unpack_int4(layer.qweight, rows, layer.input_size)[:layer.output_size]
        assert torch.equal(codes, stored_codes(checkpoint, names)), module
        ours, theirs = dequantized_weight(layer), gguf_reference(checkpoint, names)
        if kind == Q.Q4_0:  # (q - 8) * d on both sides: bit for bit
            assert torch.equal(ours, theirs), module
        else:  # q * d + m against (q - 8) * d + (m + 8 d): the same value, rounded once more
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def random_q4_k(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K super-blocks (gguf has no K-quant quantizer) with sane fp16 d and dmin."""
    blocks = rng.integers(0, 256, (rows * columns // 256, 144), dtype=np.uint8)
    for offset in (0, 2):
        scales = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_gguf_q4_k_sub_blocks_are_repacked_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weights = hf_weights()
    raw = {name: (random_q4_k(*tensor.shape, rng), Q.Q4_K) for name, tensor in weights.items()
           if name.startswith("model.layers.0.") and tensor.ndim == 2}
    path = TinyGGUF(raw=raw).write(tmp_path / "tiny.gguf", weights)
    checkpoint = GGUFCheckpoint(path)
    model = load_model(path, "float32", "cpu", quantization="int4").model
    for module, shards in SHARDS.items():
        layer = model.get_submodule(f"model.layers.0.{module}")
        theirs = gguf_reference(checkpoint, [f"model.layers.0.{s}.weight" for s in shards])
        assert theirs.abs().max() > 0
        # d sc q - dmin m against (q - 8) (d sc) + (8 d sc - dmin m): one more rounding.
        torch.testing.assert_close(dequantized_weight(layer), theirs, atol=1e-6, rtol=1e-6)


def test_gguf_q8_0_is_requantized_per_row(tmp_path: Path) -> None:
    path = TinyGGUF(tensor_type=Q.Q8_0).write(tmp_path / "tiny.gguf")
    checkpoint = GGUFCheckpoint(path)
    model = load_model(path, "float32", "cpu", quantization="int8").model
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    theirs = gguf_reference(checkpoint, ["model.layers.0.mlp.down_proj.weight"])
    step = theirs.abs().amax(dim=1, keepdim=True) / 127
    assert ((dequantized_weight(layer) - theirs).abs() <= step / 2 * (1 + 1e-5)).all()


def test_gguf_q4_under_int8_or_other_groups_loads_through_floats(tmp_path: Path) -> None:
    path = TinyGGUF(tensor_type=Q.Q4_1).write(tmp_path / "tiny.gguf")
    reference = gguf_reference(GGUFCheckpoint(path), ["model.layers.0.mlp.down_proj.weight"])
    for options in ({"quantization": "int8"},
                    {"quantization": "int4", "quantization_group_size": 64}):
        layer = load_model(path, "float32", "cpu", **options).model.get_submodule(
            "model.layers.0.mlp.down_proj")
        error = (dequantized_weight(layer) - reference).abs().max().item()
        assert 0 < error < 0.1 * reference.abs().max().item(), options


@pytest.mark.slow
def test_int4_of_a_q4_0_gguf_answers_like_the_dequantized_file(tmp_path: Path) -> None:
    """Q4_0 weights kept as blocks are the file's weights: float32 greedy answers agree (with
    the head in float32 as in the file, not re-quantized to int8)."""
    path = TinyGGUF(tensor_type=Q.Q4_0).write(tmp_path / "tiny.gguf")
    prompts = [[p % 260 for p in prompt] for prompt in PROMPTS]
    assert (greedy(path, prompts, quantization="int4", quantize_lm_head=False)
            == greedy(path, prompts))


# -- a whole model ---------------------------------------------------------------------------

PROMPTS = [[17, 99, 402, 8, 51, 3, 77, 1000, 12, 5, 65, 320, 43],
           [250, 251, 7], [9, 9, 9, 9, 400, 500, 600, 700, 31, 2, 88]]


def greedy(model_dir: Path, prompts: list[list[int]], **engine_args: object) -> list[list[int]]:
    # CPU: the weight-only kernels are PyTorch's CPU ones (a GPU machine must not pick cuda).
    llm = LLM(model_dir, **({"dtype": "float32", "device": "cpu", "seed": 0} | engine_args))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_greedy_is_stable_across_batching(
        tiny_checkpoint: Callable[[str], Path], quantization: str) -> None:
    model_dir = tiny_checkpoint("tiny-llama")
    together = greedy(model_dir, PROMPTS, quantization=quantization)
    alone = [greedy(model_dir, [prompt], quantization=quantization)[0] for prompt in PROMPTS]
    chunked = greedy(model_dir, PROMPTS, quantization=quantization, max_num_batched_tokens=5,
                     block_size=4)
    assert together == alone == chunked
    llm = LLM(model_dir, dtype="float32", device="cpu", quantization=quantization)
    layers = [m for m in llm.engine.core.loaded.model.modules() if isinstance(m, Linear)]
    assert not any(isinstance(m.method, UnquantizedLinearMethod) for m in layers)


# -- the LM head -------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_int8_head_shares_its_codes_with_a_tied_embedding(
        tiny_checkpoint: Callable[[str], Path], quantization: str) -> None:
    model_dir = tiny_checkpoint("tiny-qwen2")  # tied
    plain = load_model(model_dir, "bfloat16", "cpu").model
    model = load_model(model_dir, "bfloat16", "cpu", quantization=quantization,
                       quantize_lm_head=True).model
    head, embedding = model.lm_head, model.input_embedding()
    assert isinstance(head.method, Int8LinearMethod) and isinstance(embedding, Int8Embedding)
    assert embedding.qweight.data_ptr() == head.qweight.data_ptr()  # one copy of the codes
    reference = plain.input_embedding().weight.float()
    dequantized = dequantized_weight(head).float()
    # Each weight within half a step of its row's scale (max |row| / 127).
    step = reference.abs().amax(dim=1, keepdim=True) / 127
    assert ((dequantized - reference).abs() <= step * 0.51 + 1e-3).all()
    ids = torch.tensor([0, 5, 2047, 5])
    torch.testing.assert_close(embedding(ids).float(), dequantized[ids], rtol=1e-2, atol=1e-3)
    hidden = torch.randn(3, 128, dtype=torch.bfloat16)
    for tokens in (1, 3):  # the weight-only kernel, then dequantize + GEMM
        head.kernel_threshold = 2
        torch.testing.assert_close(model.compute_logits(hidden[:tokens]).float(),
                                   hidden[:tokens].float() @ dequantized.t(),
                                   rtol=2e-2, atol=2e-2)


def test_an_untied_head_is_quantized_alone_and_the_flag_turns_it_off(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = tiny_checkpoint("tiny-llama")  # untied
    model = load_model(model_dir, "bfloat16", "cpu", quantization="int8",
                       quantize_lm_head=True).model
    assert isinstance(model.lm_head.method, Int8LinearMethod)
    assert type(model.input_embedding()) is torch.nn.Embedding
    kept = load_model(model_dir, "bfloat16", "cpu", quantization="int8",
                      quantize_lm_head=False).model
    assert isinstance(kept.lm_head.method, UnquantizedLinearMethod)
    unquantized = load_model(model_dir, "bfloat16", "cpu", quantize_lm_head=True).model
    assert isinstance(unquantized.lm_head.method, UnquantizedLinearMethod)  # needs int8/int4


def test_the_int8_head_shrinks_a_tied_model_and_keeps_its_answers(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = tiny_checkpoint("tiny-qwen2")
    tokens = {head: greedy(model_dir, PROMPTS, dtype="bfloat16", quantization="int8",
                           quantize_lm_head=head) for head in (False, True)}
    assert tokens[True] == tokens[False]
    sizes = {head: resident_weight_bytes(load_model(
        model_dir, "bfloat16", "cpu", quantization="int8", quantize_lm_head=head).model)
        for head in (False, True)}
    # The bf16 embedding and the head's packed copy (2 x 2 bytes a weight) become one int8
    # copy and a bf16 scale per row.
    vocab, hidden = 2048, 128
    assert sizes[False] - sizes[True] == 3 * vocab * hidden - 2 * vocab


def test_flags_reach_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = EngineConfig.from_args(parser.parse_args(
        ["--quantization", "int4", "--quantization-group-size", "64", "--no-quantize-lm-head"]))
    assert (config.quantization, config.quantization_group_size) == ("int4", 64)
    assert config.quantize_lm_head is False
    defaults = EngineConfig.from_args(parser.parse_args([]))
    assert (defaults.quantization, defaults.quantization_group_size) == ("none", 32)
    assert defaults.quantize_lm_head is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int2"])


# -- bad input ---------------------------------------------------------------------------------

def test_unsupported_settings_are_clear_errors() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"runs on CPU only.*allowed is quantization='none'"):
        quantization_method("int8", 32, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="needs dtype bfloat16 or float32, not float16"):
        quantization_method("int4", 32, cpu, torch.float16)
    with pytest.raises(ValueError, match="quantization='int3' is invalid: allowed is one of "
                                         "none, int8, int4"):
        quantization_method("int3", 32, cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="quantization_group_size=48 is invalid"):
        quantization_method("int4", 48, cpu, torch.bfloat16)
    assert quantization_method("none", 32, torch.device("cuda"), torch.float16) is None
    with pytest.raises(ValueError, match="quantization='fp8' is invalid"):
        EngineConfig(quantization="fp8")
    with pytest.raises(ValueError, match="quantization_group_size=16 is invalid"):
        EngineConfig(quantization="int4", quantization_group_size=16)
    with pytest.raises(ValueError, match="group size 128 does not divide the layer's input "
                                         "size 96"):
        build_model(lambda _: Linear(96, 64, False, Int4LinearMethod(128)), None,
                    torch.bfloat16, cpu)


def test_quantization_on_a_float16_model_is_refused(tiny_checkpoint: Callable[[str], Path]
                                                    ) -> None:
    weight = torch.randn(64, 64)
    with pytest.raises(ValueError, match="needs dtype bfloat16 or float32, not float16"):
        quantized_layer(Int8LinearMethod(), weight, None, torch.float16, [64])
    with pytest.raises(ValueError, match="quantization='int8' runs on CPU only"):
        load_model(tiny_checkpoint("tiny-llama"), "float32", "meta", quantization="int8")


def test_unquantized_layers_are_unchanged_by_default(tiny_checkpoint: Callable[[str], Path]
                                                     ) -> None:
    model = load_model(tiny_checkpoint("tiny-llama"), "bfloat16", "cpu").model
    assert all(isinstance(m.method, UnquantizedLinearMethod) for m in model.modules()
               if isinstance(m, Linear))
