"""`surge optimize prune`: masks keep their promise, structured pruning writes a standard
smaller model that Surge and transformers run with the same logits, ratio 0 changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surge.eval.scoring import SequenceScorer
from surge.models.loader import load_model
from surge.optimize.calibration import calibration_text
from surge.optimize.export import open_source, read_tensors
from surge.optimize.prune import mask_weights, plan_prune, prune_checkpoint, structured_shape

TOKENS = [5, 17, 250, 3, 99, 1000, 42, 7, 8, 9, 10, 11, 300, 301, 2000, 64]
CALIBRATION = 512


@pytest.fixture(scope="module")
def text() -> str:
    return calibration_text(None)


def _surge_logits(path: Path) -> torch.Tensor:
    loaded = load_model(path, dtype="float32", device="cpu")
    scorer = SequenceScorer(loaded, 64)
    return loaded.model.compute_logits(scorer.hidden_states(TOKENS)).float()


def _transformers_logits(path: Path) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]


@pytest.mark.parametrize("method", ["structured", "wanda", "magnitude"])
def test_ratio_zero_is_the_identity(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                    text: str, method: str) -> None:
    source = tiny_checkpoint("tiny-llama")
    prune_checkpoint(open_source(str(source)), tmp_path, plan_prune(method, 0.0), text,
                     CALIBRATION, "float32", progress=False)
    before, after = read_tensors(source), read_tensors(tmp_path)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(_surge_logits(source), _surge_logits(tmp_path))


@pytest.mark.parametrize("preset, head_unit", [
    ("tiny-llama", "head"), ("tiny-llama", "kv-group"), ("tiny-qwen2", "head"),
    ("tiny-qwen3", "kv-group")])
def test_structured_model_runs_the_same_in_surge_and_transformers(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path, text: str, preset: str,
        head_unit: str) -> None:
    source = tiny_checkpoint(preset)
    plan = plan_prune("structured", 0.5, head_unit=head_unit)
    prune_checkpoint(open_source(str(source)), tmp_path, plan, text, CALIBRATION, "float32",
                     progress=False)
    before = json.loads((source / "config.json").read_text())
    after = json.loads((tmp_path / "config.json").read_text())
    shape = structured_shape(before, plan)
    assert after["num_attention_heads"] == shape.num_heads < before["num_attention_heads"]
    assert after["num_key_value_heads"] == shape.num_kv_heads
    assert after["intermediate_size"] == shape.intermediate_size == \
        before["intermediate_size"] // 2
    assert after["head_dim"] == before.get("head_dim", before["hidden_size"] //
                                           before["num_attention_heads"])
    assert after["num_attention_heads"] % after["num_key_value_heads"] == 0
    ours, theirs = _surge_logits(tmp_path), _transformers_logits(tmp_path)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, _surge_logits(source))  # it did prune something


def test_kv_group_unit_keeps_whole_groups() -> None:
    config = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
              "intermediate_size": 1536}
    by_group = structured_shape(config, plan_prune("structured", 0.25, head_unit="kv-group"))
    by_head = structured_shape(config, plan_prune("structured", 0.25))
    assert (by_group.num_heads, by_group.num_kv_heads) == (6, 2)
    assert (by_head.num_heads, by_head.num_kv_heads) == (6, 3)
    assert by_head.intermediate_size == 1152 and by_head.head_dim == 64


def test_wanda_masks_each_row_and_two_of_four() -> None:
    torch.manual_seed(0)
    weight, norm = torch.randn(8, 16), torch.rand(16) + 0.1
    mask = mask_weights(weight, plan_prune("wanda", 0.5), norm)
    assert torch.equal(mask.sum(dim=1), torch.full((8,), 8.0))
    score = weight.abs() * norm
    kept_min = torch.where(mask.bool(), score, torch.inf).amin(dim=1)
    dropped_max = torch.where(mask.bool(), -torch.inf, score).amax(dim=1)
    assert torch.all(kept_min >= dropped_max)
    two_four = mask_weights(weight, plan_prune("magnitude", None, "2:4"), None)
    assert torch.equal(two_four.view(8, 4, 4).sum(dim=-1), torch.full((8, 4), 2.0))


def test_masked_checkpoint_keeps_shapes(tiny_checkpoint: Callable[[str], Path],
                                        tmp_path: Path, text: str) -> None:
    source = tiny_checkpoint("tiny-llama")
    summary = prune_checkpoint(open_source(str(source)), tmp_path,
                               plan_prune("wanda", None, "2:4"), text, CALIBRATION, "float32",
                               progress=False)
    assert "50.0%" in summary
    before, after = read_tensors(source), read_tensors(tmp_path)
    assert {n: t.shape for n, t in before.items()} == {n: t.shape for n, t in after.items()}
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert float((after["model.layers.0.mlp.down_proj.weight"] == 0).float().mean()) == 0.5


@pytest.mark.parametrize("kwargs, says", [
    ({"method": "wanda", "sparsity": 1.0}, r"\[0, 1\)"),
    ({"method": "structured", "sparsity": -0.1}, r"\[0, 1\)"),
    ({"method": "structured", "sparsity": 0.2, "head_sparsity": 1.5}, "--head-sparsity"),
    ({"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}, "exactly half"),
    ({"method": "structured", "sparsity": None, "pattern": "2:4"}, "mask pattern"),
    ({"method": "sparsegpt", "sparsity": 0.5}, "allowed is structured, wanda"),
])
def test_bad_plans_are_refused(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        plan_prune(**kwargs)


def test_heads_not_divisible_by_kv_groups_is_refused() -> None:
    config = {"num_attention_heads": 4, "num_key_value_heads": 3, "hidden_size": 128,
              "intermediate_size": 256}
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads=3"):
        structured_shape(config, plan_prune("structured", 0.25))


def test_empty_calibration_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        calibration_text(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        calibration_text(tmp_path / "missing.txt")
