"""Random-weight checkpoints: real shapes and names, same bytes per seed, load in transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from surge.testing import make_model
from surge.testing.make_model import (
    FILES,
    PRESETS,
    ensure_demo_model,
    train_tokenizer,
    write_checkpoint,
)

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2"]
BIG = ["smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "gpt2"]
# Parameter counts of the public models (tied embeddings counted once).
PUBLIC_PARAMS = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "llama-3.2-1b": 1_235_814_400,
    "gpt2": 124_439_808,
}
TEXT = "Hello world, the café in 東京 serves 日本語 menus 🚀 for $12.50 ... ok ."


def _digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_presets_are_the_documented_ones() -> None:
    # The encoder and vision presets are tested in test_pool_presets.py.
    pool = {"tiny-bert", "tiny-resnet", "tiny-vit", "resnet-50", "vit-base"}
    assert set(PRESETS) == set(TINY) | set(BIG) | pool


def test_unknown_preset_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-llama") as info:
        write_checkpoint("tiny-llamaa", tmp_path / "x")
    assert all(name in str(info.value) for name in PRESETS)
    with pytest.raises(ValueError, match="smollm2-135m"):
        ensure_demo_model("nope")
    assert not (tmp_path / "x").exists()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_checkpoint("tiny-llama", tmp_path / "a", seed=3)
    b = write_checkpoint("tiny-llama", tmp_path / "b", seed=3)
    c = write_checkpoint("tiny-llama", tmp_path / "c", seed=4)
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    assert _digests(a) == _digests(b)
    digests_a, digests_c = _digests(a), _digests(c)
    assert digests_a["model.safetensors"] != digests_c["model.safetensors"]
    # The tokenizer and configs depend on the vocabulary, not the seed.
    assert {k: v for k, v in digests_a.items() if k != "model.safetensors"} == {
        k: v for k, v in digests_c.items() if k != "model.safetensors"}
    ta, tc = _tensors(a), _tensors(c)
    assert all(not (ta[name] == tc[name]).all() for name in ta)


def test_weight_statistics_and_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = write_checkpoint("tiny-qwen2", tmp_path / "m") / "model.safetensors"
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = _tensors(path.parent)
    emb = tensors["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.01
    bias = tensors["model.layers.0.self_attn.q_proj.bias"]
    assert bias.abs().max().item() > 0  # nonzero, so a loader that drops biases is caught


@pytest.mark.parametrize("name", TINY + BIG)
def test_tensor_names_and_param_counts_match_transformers(name: str, tmp_path: Path) -> None:
    """Built on the meta device from our config.json: no weights are written."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    preset = PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(preset.config))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == preset.config["architectures"][0]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if preset.config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")  # tied checkpoints do not store the head
    assert {s.name: s.shape for s in preset.tensor_specs()} == expected
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == preset.num_params
    if name in PUBLIC_PARAMS:
        assert num_params == PUBLIC_PARAMS[name]


def test_big_presets_keep_public_config_features() -> None:
    smollm = PRESETS["smollm2-135m"].config
    assert (smollm["hidden_size"], smollm["num_hidden_layers"], smollm["rope_theta"]) == (
        576, 30, 100000.0)
    llama = PRESETS["llama-3.2-1b"].config
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    assert llama["max_position_embeddings"] == 131072
    for name in BIG:
        config = PRESETS[name].config
        assert config["tie_word_embeddings"] is True
        assert config["torch_dtype"] == config["dtype"] == (
            "float32" if name == "gpt2" else "bfloat16")


def test_tiny_presets_cover_the_features_of_their_siblings() -> None:
    llama, qwen2, qwen3 = (PRESETS[n].config for n in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"))
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    assert llama["tie_word_embeddings"] is False
    assert qwen2["tie_word_embeddings"] is True
    assert qwen3["head_dim"] != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert PRESETS["tiny-mistral"].config["sliding_window"] is None
    for name in TINY:
        preset = PRESETS[name]
        assert preset.dtype == "float32"
        assert preset.max_position_embeddings >= 512
        assert preset.num_params < 5_000_000
        if preset.family == "llama":
            assert preset.config["num_key_value_heads"] < preset.config["num_attention_heads"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_load_with_transformers(name: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint(name, tmp_path / name)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert model.dtype == torch.float32
    stored = _tensors(path)
    assert ("lm_head.weight" in stored) != model.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator())
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_hf_tokenizer_round_trips_and_renders_chat(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint(name, tmp_path / name)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == PRESETS[name].vocab_size
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert max(ids) < PRESETS[name].vocab_size
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("assistant\n")
    chat_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.decode(chat_ids) == text


def test_special_token_ids_agree_across_files(tmp_path: Path) -> None:
    path = write_checkpoint("tiny-qwen3", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    specials = {t["content"]: t["id"]
                for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
    assert specials == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert config["eos_token_id"] == generation["eos_token_id"] == [2, 0]
    assert config["bos_token_id"] == generation["bos_token_id"] == specials[tok_config["bos_token"]]
    assert specials[tok_config["eos_token"]] == config["eos_token_id"][0]
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" in tok_config
    assert max(vocab.values()) == config["vocab_size"] - 1


def test_tokenizer_has_multibyte_merges_and_exact_size() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(train_tokenizer(2048))
    assert tok.get_vocab_size() == 2048
    assert tok.decode(tok.encode(TEXT).ids) == TEXT
    # Some learned token holds bytes >= 0x80, i.e. part of a multi-byte character.
    byte_level_high = "".join(chr(c) for c in range(0x100, 0x144))  # ByteLevel's remapped bytes
    assert any(len(t) > 1 and any(ch in byte_level_high for ch in t) for t in tok.get_vocab())


def test_tokenizer_training_is_deterministic_across_processes_and_threads() -> None:
    code = ("import hashlib; from surge.testing.make_model import train_tokenizer; "
            "print(hashlib.sha256(train_tokenizer(1024).encode()).hexdigest())")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(train_tokenizer(1024).encode()).hexdigest()


def test_write_into_existing_dirs(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    assert write_checkpoint("tiny-gpt2", target) == target  # an existing empty directory is fine
    before = _digests(target)["model.safetensors"]
    write_checkpoint("tiny-gpt2", target, seed=1)  # a checkpoint is replaced
    assert _digests(target)["model.safetensors"] != before
    other = tmp_path / "data"
    other.mkdir()
    (other / "notes.py").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        write_checkpoint("tiny-gpt2", other)
    assert (other / "notes.py").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m"]  # no temporaries left


def test_a_crash_leaves_no_partial_checkpoint(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(make_model, "generate_weights", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint("tiny-llama", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_ensure_demo_model_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path / "cache"))
    path = ensure_demo_model("tiny-mistral")
    assert path == tmp_path / "cache" / "models" / "tiny-mistral-seed0"
    assert _digests(path) == _digests(write_checkpoint("tiny-mistral", tmp_path / "ref"))
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(make_model, "generate_weights", None)  # a rewrite would fail
    assert ensure_demo_model("tiny-mistral") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cache_dir_falls_back_to_xdg_then_home(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SURGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert make_model.cache_dir() == tmp_path / "xdg" / "surge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert make_model.cache_dir() == tmp_path / "home" / ".cache" / "surge"


def test_ensure_demo_model_race_keeps_one_copy(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers finish their temporary copies before either renames; one copy wins."""
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path))
    barrier = threading.Barrier(2, timeout=30)
    write_temp = make_model._write_temp

    def synchronised(*args: object) -> Path:
        tmp = write_temp(*args)
        barrier.wait()
        return tmp

    monkeypatch.setattr(make_model, "_write_temp", synchronised)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_model("tiny-gpt2")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    models = tmp_path / "models"
    assert results == [models / "tiny-gpt2-seed0"] * 2
    assert [p.name for p in models.iterdir()] == ["tiny-gpt2-seed0"]
    assert sorted(p.name for p in results[0].iterdir()) == sorted(FILES)


def test_cli_make_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from surge.cli import main

    out = tmp_path / "cli-model"
    assert main(["make-model", "--preset", "tiny-llama", "--out", str(out), "--seed", "7"]) == 0
    assert str(out) in capsys.readouterr().out
    assert _digests(out) == _digests(write_checkpoint("tiny-llama", tmp_path / "ref", seed=7))


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [49152, 50257, 128256, 151936])
def test_big_vocabularies_are_reached_exactly(vocab_size: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(train_tokenizer(vocab_size))
    assert tok.get_vocab_size() == vocab_size
    assert tok.decode(tok.encode(TEXT).ids) == TEXT


@pytest.mark.slow
def test_smollm2_checkpoint_loads_in_bf16(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint("smollm2-135m", tmp_path / "smollm2")
    size = (path / "model.safetensors").stat().st_size
    assert abs(size - 2 * PUBLIC_PARAMS["smollm2-135m"]) < 1_000_000  # bf16, head not stored
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.bfloat16)
    assert not any(info.values()), info
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits.float()).all()
