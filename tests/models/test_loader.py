"""The one loader: the registry, the checkpoint seam, the linear-layer seam and bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from surge.models.checkpoint import HFCheckpoint, open_checkpoint, read_config
from surge.models.linear import Linear, LinearMethod, UnquantizedLinearMethod, can_pack
from surge.models.loader import load_model, resolve_dtype
from surge.models.registry import (
    ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    Architecture,
    find_architecture,
    register,
)
from surge.models.tasks import detect_task
from surge.testing.make_model import write_checkpoint


class TransposedLinearMethod(LinearMethod):
    """Stores W transposed: a layout no model file knows about, loaded through the seam."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight_t = torch.nn.Parameter(torch.empty(layer.input_size, layer.output_size),
                                            requires_grad=False)
        layer.bias = None
        layer.weight_loaders["weight"] = self.load_weight
        assert not layer.has_bias, "tiny-llama's projections have no bias"

    @staticmethod
    def load_weight(layer: torch.nn.Module, tensor: torch.Tensor, shard: int | None) -> None:
        assert isinstance(layer, Linear)
        layer.weight_t.data[:, layer.shard_rows(shard)] = tensor.t()

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.processed = True

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ layer.weight_t


def test_a_linear_method_replaces_storage_without_a_new_model_file(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    directory = tiny_checkpoint("tiny-llama")
    custom = load_model(directory, "float32", "cpu", linear_method=TransposedLinearMethod()).model
    plain = load_model(directory, "float32", "cpu").model
    plain_layers = dict(plain.named_modules())
    checked = 0
    for name, layer in custom.named_modules():
        if not isinstance(layer, Linear):
            continue
        reference = plain_layers[name]
        if name == "lm_head":  # the head stays unquantized
            assert isinstance(layer.method, UnquantizedLinearMethod)
            continue
        assert isinstance(layer.method, TransposedLinearMethod) and layer.processed
        x = torch.randn(3, layer.input_size)
        torch.testing.assert_close(layer(x), reference(x))
        checked += 1
    assert checked == 4 * 4  # qkv, o, gate_up, down in each of 4 layers


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN weight prepacking unavailable")
def test_unquantized_method_prepacks_on_cpu_with_identical_results() -> None:
    layer = Linear(64, [32, 16], bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    layer = layer.to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    layer.method.process_weights_after_loading(layer)
    assert layer.weight is None and layer.packed_weight is not None  # one copy in memory
    assert torch.equal(layer(x), F.linear(x, weight, bias))
    assert layer.weight_bytes() == 2 * 48 * 64 + bias.nbytes


def test_model_type_stands_in_for_missing_architectures(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    for preset, task in (("tiny-qwen3", "generate"), ("tiny-bert", "embed"),
                         ("tiny-vit", "classify")):
        directory = tmp_path / preset
        shutil.copytree(tiny_checkpoint(preset), directory)
        config = json.loads((directory / "config.json").read_text())
        expected = ARCHITECTURES[config.pop("architectures")[0]]
        (directory / "config.json").write_text(json.dumps(config))
        assert detect_task(directory) == task
        loaded = load_model(directory, "float32", "cpu", task=None)
        assert loaded.architecture == expected


def test_the_registry_names_what_is_supported() -> None:
    with pytest.raises(ValueError, match="not supported") as info:
        find_architecture({"architectures": ["PhiForCausalLM"], "model_type": "phi"},
                          "generate")
    assert all(name in str(info.value) for name in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="serves task 'embed', not 'classify'"):
        find_architecture({"model_type": "bert"}, "classify")
    assert find_architecture({"model_type": "resnet"}).task == "classify"
    with pytest.raises(ValueError, match="already registered"):
        register(ARCHITECTURES["BertModel"])
    with pytest.raises(ValueError, match="task='translate' is invalid"):
        register(Architecture("T5", "translate", torch.nn.Module, dict))  # type: ignore[arg-type]


def test_one_dtype_rule() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", cpu, "float16") == torch.bfloat16  # native on CPU, same size
    assert resolve_dtype("float32", cpu, "bfloat16") == torch.float32
    with pytest.raises(ValueError, match="dtype='float64' is invalid: allowed is one of auto"):
        resolve_dtype("float64", cpu)
    with pytest.raises(ValueError, match="float16' is slow or unsupported on CPU"):
        resolve_dtype("float16", cpu)


def test_pool_models_serve_float32_by_default(tmp_path: Path) -> None:
    directory = write_checkpoint("tiny-bert", tmp_path / "bert", seed=0)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert load_model(directory, "auto", "cpu", task="embed").dtype == torch.float32


def test_open_checkpoint_dispatches_on_the_path(tmp_path: Path,
                                                tiny_checkpoint: Callable[[str], Path]) -> None:
    assert isinstance(open_checkpoint(tiny_checkpoint("tiny-gpt2")), HFCheckpoint)
    with pytest.raises(FileNotFoundError, match=r"single \.gguf file"):
        open_checkpoint(tmp_path / "absent.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Hugging Face layout .* or a \.gguf file"):
        open_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        read_config(tmp_path)


def _edited_weights(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop("model.norm.weight"), r"missing 1 tensors, e.g. \['model.norm.weight'\]"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}),
     "'model.extra.weight' does not belong to LlamaForCausalLM"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 128)}),
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(3, 128\), the model "
     r"expects \(64, 128\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(7)}),
     r"tensor 'model.norm.weight' has shape \(7,\), the model expects \(128,\)"),
], ids=["missing", "unknown", "shard-shape", "shape"])
def test_bad_checkpoints_are_refused_with_the_tensor_named(
        edit: Callable[[dict], None], message: str, tiny_checkpoint: Callable[[str], Path],
        tmp_path: Path) -> None:
    directory = _edited_weights(tiny_checkpoint("tiny-llama"), tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load_model(directory, "float32", "cpu")
