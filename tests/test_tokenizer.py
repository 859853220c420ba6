"""Tokenizers: built from a GGUF file's metadata, and the chat template wherever a checkpoint keeps
it (transformers-saved directories, GGUF metadata, --chat-template FILE)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from surge.config import EngineConfig
from surge.tokenizer import (
    SUPPORTED_GGUF_PRE_TOKENIZERS,
    eos_token_ids,
    gguf_tokenizer,
    load_tokenizer,
)
from tests.models.tiny_gguf import CHAT_TEMPLATE, TinyGGUF, spm_vocab, vocab_tokens

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyGGUF().write(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _token_id(text: str) -> int:
    return vocab_tokens()[0].index(text)


def test_gguf_merges_apply_in_rank_order(tiny_gguf: Path) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    assert tokenizer.encode(" the") == [_token_id("Ġthe")]
    assert tokenizer.encode("the") == [_token_id("t"), _token_id("he")]
    assert tokenizer.vocab_size == len(vocab_tokens()[0])


def test_gguf_control_and_user_tokens_stay_whole(tiny_gguf: Path) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    ids = tokenizer.encode("<|im_start|>a<think>b<|im_end|>")
    assert ids == [1, _token_id("a"), _token_id("<think>"), _token_id("b"), 2]
    # Control tokens are special (skipped on request); user-defined ones are text.
    assert tokenizer.decode(ids) == "a<think>b"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>a<think>b<|im_end|>"


def test_gguf_round_trips_any_text(tiny_gguf: Path) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    text = "  héllo\n\twörld 😀 2024, 'tis\r\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gguf_smollm_pre_tokenizer_splits_every_digit(tiny_gguf: Path) -> None:
    pieces = load_tokenizer(tiny_gguf).tokenizer.pre_tokenizer.pre_tokenize_str("In 2024   7")
    assert [p for p, _ in pieces] == ["In", "Ġ", "2", "0", "2", "4", "ĠĠĠ", "7"]


def test_gguf_add_bos_flag_is_honoured(tmp_path: Path, tiny_gguf: Path) -> None:
    assert load_tokenizer(tiny_gguf).encode("a") == [_token_id("a")]
    with_bos = TinyGGUF(add_bos=True).write(tmp_path / "bos.gguf")
    tokenizer = load_tokenizer(with_bos)
    assert tokenizer.encode("a") == [1, _token_id("a")]
    assert tokenizer.encode("a", add_special_tokens=False) == [_token_id("a")]


def test_gguf_chat_template_and_eos_come_from_metadata(tiny_gguf: Path) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(MESSAGES) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids == {2}
    assert eos_token_ids(tiny_gguf) == {2}
    assert tokenizer.config["bos_token"] == "<|im_start|>"


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_gguf_other_pre_tokenizers_build(tmp_path: Path, pre: str) -> None:
    tokenizer = load_tokenizer(TinyGGUF(pre=pre).write(tmp_path / "t.gguf"))
    assert tokenizer.decode(tokenizer.encode(" the 12345!\n\n x")) == " the 12345!\n\n x"
    digits = [p for p, _ in tokenizer.tokenizer.pre_tokenizer.pre_tokenize_str("12345")]
    # Llama 3 groups digits by three, Qwen2 splits each, GPT-2 keeps the run.
    assert digits == {"llama-bpe": ["123", "45"], "qwen2": list("12345"),
                      "gpt-2": ["12345"]}[pre]


def test_gguf_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    path = TinyGGUF(pre="made-up").write(tmp_path / "t.gguf")
    with pytest.raises(ValueError, match="'made-up' is not supported") as error:
        load_tokenizer(path)
    assert all(name in str(error.value) for name in SUPPORTED_GGUF_PRE_TOKENIZERS)


def test_gguf_unknown_tokenizer_model_is_refused(tmp_path: Path) -> None:
    from surge.models.gguf import open_vocab

    vocab = open_vocab(TinyGGUF(tokenizer_model="t5").write(tmp_path / "t.gguf"))
    with pytest.raises(ValueError, match=r"tokenizer model 't5' is not supported.*'gpt2'"):
        gguf_tokenizer(vocab)


SPM_TEXTS = ["the cat and the dog.", " the", "hi\nthe  é 😀", "<s>the</s> and<think>c", "",
             "ThE   end ..", "\tand\r\n"]


@pytest.mark.slow  # importing transformers' GGUF tokenizer support takes ~20 s
@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_sentencepiece_vocabulary_matches_transformers(tmp_path: Path,
                                                            add_bos: bool) -> None:
    """Llama 2 / Mistral style: pieces with scores and no merges, bytes as <0xNN>."""
    from transformers import AutoTokenizer

    path = TinyGGUF(tokenizer_model="llama", add_bos=add_bos).write(tmp_path / "spm.gguf")
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert ours.encode(" the") == [1] * add_bos + [spm_vocab()[0].index("▁the")]
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


# -- chat templates of checkpoint directories ----------------------------------------------------

@pytest.fixture
def saved_by_transformers(tmp_path: Path, tiny_gguf: Path) -> Path:
    """A tokenizer directory written by the installed transformers' save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    backend = load_tokenizer(tiny_gguf).tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_template_that_transformers_saves_is_found(saved_by_transformers: Path) -> None:
    tokenizer = load_tokenizer(saved_by_transformers)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(MESSAGES).endswith("<|im_start|>assistant\n")


def _without_template(directory: Path) -> Path:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    (directory / "chat_template.json").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return directory


def test_template_in_chat_template_json(saved_by_transformers: Path) -> None:
    directory = _without_template(saved_by_transformers)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "JSON {{ 1 }}"}))
    assert load_tokenizer(directory).chat_template == "JSON {{ 1 }}"


def test_named_templates_in_tokenizer_config_use_default(saved_by_transformers: Path) -> None:
    directory = _without_template(saved_by_transformers)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "DEFAULT"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(directory).chat_template == "DEFAULT"


def test_checkpoint_without_template_says_how_to_supply_one(saved_by_transformers: Path,
                                                            tmp_path: Path) -> None:
    directory = _without_template(saved_by_transformers)
    with pytest.raises(ValueError, match="--chat-template FILE"):
        load_tokenizer(directory).apply_chat_template(MESSAGES)
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(directory, template).apply_chat_template(MESSAGES) == "[hi]"


def test_chat_template_file_replaces_the_shipped_one(tiny_gguf: Path, tmp_path: Path) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text("MINE")
    assert load_tokenizer(tiny_gguf, template).apply_chat_template(MESSAGES) == "MINE"


def test_chat_template_file_errors(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--chat-template takes a Jinja file"):
        load_tokenizer(tiny_gguf, tmp_path / "absent.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(tiny_gguf, tmp_path / "empty.jinja")
    with pytest.raises(ValueError, match=r"chat_template=.*existing Jinja file"):
        EngineConfig(chat_template=str(tmp_path / "absent.jinja"))


def test_templates_may_use_what_transformers_offers(tiny_gguf: Path, tmp_path: Path) -> None:
    # Llama 3.x templates print the date with strftime_now; others stop loops with break.
    template = tmp_path / "llama3ish.jinja"
    template.write_text("{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}"
                        "{% if loop.first %}{% break %}{% endif %}{% endfor %}")
    messages = [*MESSAGES, {"role": "assistant", "content": "unseen"}]
    rendered = load_tokenizer(tiny_gguf, template).apply_chat_template(messages)
    assert rendered == f"{datetime.date.today().year}hi"


def test_template_errors_are_value_errors(tiny_gguf: Path, tmp_path: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template error: roles must alternate"):
        load_tokenizer(tiny_gguf, template).apply_chat_template(MESSAGES)
