"""make-model's encoder and vision presets: deterministic files in the layouts our loaders and
transformers read, readable labels, and a WordPiece tokenizer trained locally."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from surge.models.tasks import detect_task
from surge.testing.make_model import PRESETS, write_checkpoint
from surge.testing.pool_checkpoints import image_labels

TINY_POOL = ["tiny-bert", "tiny-resnet", "tiny-vit"]


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("preset", TINY_POOL)
def test_same_seed_same_bytes_other_seed_other_weights(preset: str, tmp_path: Path) -> None:
    first = _digests(write_checkpoint(preset, tmp_path / "a", seed=0))
    assert first == _digests(write_checkpoint(preset, tmp_path / "b", seed=0))
    other = _digests(write_checkpoint(preset, tmp_path / "c", seed=1))
    assert other["model.safetensors"] != first["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in first.items() if k != "model.safetensors"}


def test_bert_preset_has_the_sentence_transformers_layout(tmp_path: Path) -> None:
    directory = write_checkpoint("tiny-bert", tmp_path / "bert")
    modules = json.loads((directory / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling",
                                                               "Normalize"]
    assert json.loads((directory / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_mean_tokens"]
    assert detect_task(directory) == "embed"
    # Rewriting over an existing sentence-transformers checkpoint (with its folder) works.
    write_checkpoint("tiny-bert", directory, seed=2)


def test_bert_tokenizer_is_an_uncased_wordpiece_with_bert_specials(tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    directory = write_checkpoint("tiny-bert", tmp_path / "bert")
    tokenizer = BertTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    assert len(tokenizer) == PRESETS["tiny-bert"].config["vocab_size"]
    ids = tokenizer("The Engine serves")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("[CLS]") == 2
    assert ids[-1] == tokenizer.convert_tokens_to_ids("[SEP]") == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the engine serves"


@pytest.mark.parametrize("preset", ["tiny-resnet", "tiny-vit"])
def test_vision_presets_carry_labels_and_preprocessing(preset: str, tmp_path: Path) -> None:
    directory = write_checkpoint(preset, tmp_path / preset)
    config = json.loads((directory / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(image_labels(10))}
    assert config["label2id"]["red fox"] == 0
    assert (directory / "preprocessor_config.json").is_file()
    assert detect_task(directory) == "classify"


def test_made_up_labels_are_distinct_and_readable() -> None:
    labels = image_labels(1000)
    assert len(set(labels)) == 1000
    assert all(label.replace(" ", "").replace("-", "").isalpha() for label in labels)
    with pytest.raises(ValueError, match="at most 1000"):
        image_labels(1001)
