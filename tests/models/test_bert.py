"""BERT encoder + sentence-transformers pooling: parity with transformers and
sentence-transformers, batch independence, and real semantic similarity with all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from surge.hub import resolve_model
from surge.models.bert import Pooling, read_pooling
from surge.models.pooling_models import TextEmbedder
from surge.models.tasks import detect_task

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome!", "The stock market fell sharply on Tuesday.",
             "ok", "Serving many users at once needs batching and admission control."]


@pytest.fixture(scope="module")
def minilm() -> TextEmbedder:
    return TextEmbedder(resolve_model("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def tiny_bert(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-bert")


def test_token_vectors_match_transformers_bert_model(tiny_bert: Path) -> None:
    from transformers import BertModel

    reference = BertModel.from_pretrained(tiny_bert).eval()
    ours = TextEmbedder(tiny_bert)
    ids = ours.tokenize(["the engine serves requests", "a"])
    longest = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [0] * (longest - len(i)) for i in ids])
    mask = input_ids != 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    got = ours.model(input_ids, mask)
    # Padded positions are not compared: nothing reads them.
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm: TextEmbedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.model_dir), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_numpy=True)
    got = np.stack(minilm.embed_batch(minilm.tokenize(SENTENCES)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_batched_vectors_equal_single_ones(minilm: TextEmbedder) -> None:
    ids = minilm.tokenize(SENTENCES)  # different lengths: the batch is padded
    batched = np.stack(minilm.embed_batch(ids))
    single = np.stack([minilm.embed_batch([i])[0] for i in ids])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm: TextEmbedder) -> None:
    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("How do I reset my password?", "I forgot my password, how can I change it?"),
             ("The cat sits on the mat.", "A cat is sitting on a rug.")]
    unrelated = "The stock market fell sharply on Tuesday."
    for first, paraphrase in pairs:
        a, b, c = minilm.embed_batch(minilm.tokenize([first, paraphrase, unrelated]))
        assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)  # the Normalize module
        assert float(a @ b) > float(a @ c) + 0.3, (first, float(a @ b), float(a @ c))


def test_minilm_layout_is_read_from_the_package(minilm: TextEmbedder) -> None:
    assert detect_task(minilm.model_dir) == "embed"
    assert minilm.pooling == Pooling("mean", normalize=True)
    assert minilm.dim == 384
    assert minilm.max_tokens == 256  # sentence_bert_config.json, not the 512 positions
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == minilm.model_dir


def test_truncation_keeps_the_closing_separator(minilm: TextEmbedder) -> None:
    ids = minilm.tokenize(["word " * 50])[0]
    cut = minilm.truncate(ids, 10)
    assert len(cut) == 10 and cut[0] == ids[0] and cut[-1] == ids[-1] == minilm.sep_id


def test_pooling_modes_ignore_padding() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert Pooling("mean")(hidden, mask).tolist() == [[2.0, 2.0]]
    assert Pooling("cls")(hidden, mask).tolist() == [[1.0, 0.0]]
    assert Pooling("max")(hidden, mask).tolist() == [[3.0, 4.0]]
    assert torch.allclose(Pooling("mean_sqrt_len")(hidden, mask), torch.tensor([[4.0, 4.0]])
                          / 2 ** 0.5)
    assert torch.allclose(Pooling("cls", normalize=True)(hidden * 3, mask),
                          torch.tensor([[1.0, 0.0]]))


def test_cls_pooling_and_no_normalize_are_read(tiny_bert: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bert, tmp_path / "bert")
    config = json.loads((copy / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(config))
    modules = json.loads((copy / "modules.json").read_text())[:2]  # drop Normalize
    (copy / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(copy) == Pooling("cls", normalize=False)


def test_unsupported_pooling_is_refused_clearly(tiny_bert: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bert, tmp_path / "bert")
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ValueError, match="not supported: allowed is exactly one of"):
        read_pooling(copy)


def test_a_plain_bert_model_without_modules_json_uses_mean_pooling(
        tiny_bert: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bert, tmp_path / "bert")
    (copy / "modules.json").unlink()
    assert read_pooling(copy) == Pooling("mean", normalize=False)
