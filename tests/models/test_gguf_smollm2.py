"""The real SmolLM2-135M-Instruct GGUF (Q4_1 linears, Q8_0 embeddings) against transformers' own
GGUF loading: tensors, tokenizer, chat template and next-token log-probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import regex
import torch

from surge import LLM, SamplingParams
from surge.models.gguf import GGUFCheckpoint
from surge.tokenizer import ChatTokenizer, load_tokenizer
from tests.models.test_gguf import assert_reader_agrees_with_gguf_package

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"]
NEW_TOKENS = 32
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "Count to 3."}],
]


def _hf_kwargs(gguf: Path) -> dict[str, str]:
    return {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        **_hf_kwargs(smollm2_gguf), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path) -> object:
    return transformers.AutoTokenizer.from_pretrained(**_hf_kwargs(smollm2_gguf))


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> ChatTokenizer:
    return load_tokenizer(smollm2_gguf)


def test_config(smollm2_gguf: Path) -> None:
    config = GGUFCheckpoint(smollm2_gguf).read_config()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == [2]  # <|im_end|>


def test_reader_agrees_with_gguf_package(smollm2_gguf: Path) -> None:
    assert_reader_agrees_with_gguf_package(smollm2_gguf)


@pytest.mark.timeout(900)  # includes loading transformers' model (module fixture)
def test_tensors_equal_what_transformers_loads(smollm2_gguf: Path,
                                               hf_model: torch.nn.Module) -> None:
    checkpoint = GGUFCheckpoint(smollm2_gguf)
    types = {checkpoint.raw_tensor(name).ggml_type for name in checkpoint.tensor_names()}
    assert types == {"F32", "Q4_1", "Q8_0"}
    ours = dict(checkpoint.iter_tensors())
    theirs = hf_model.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def _pydoc_lines() -> list[str]:
    """Real English text that ships with Python: the help topics, as lines."""
    from pydoc_data.topics import topics

    return [line for text in topics.values() for line in text.splitlines()]


# llama.cpp's pre-tokenizer for `tokenizer.ggml.pre = smollm` (llama-vocab.cpp): each regex
# splits every piece further, keeping the text between matches as pieces too.
_SMOLLM_REGEXES = (r"\p{N}",
                   r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


def _llama_cpp_split(text: str) -> list[str]:
    pieces = [text]
    for pattern in _SMOLLM_REGEXES:
        split = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                split += [piece[start:match.start()]] if match.start() > start else []
                split.append(match.group())
                start = match.end()
            split += [piece[start:]] if start < len(piece) else []
        pieces = split
    return pieces


def _pieces(backend: object, text: str) -> list[str]:
    return [text[start:end] for _, (start, end) in backend.pre_tokenizer.pre_tokenize_str(text)]


def test_tokenizer_matches_transformers_on_python_docs(tokenizer: ChatTokenizer,
                                                       hf_tokenizer: object) -> None:
    lines = _pydoc_lines()
    assert len(lines) > 5000
    compared = 0
    for line in lines:
        ids = tokenizer.encode(line)
        assert _pieces(tokenizer.tokenizer, line) == _llama_cpp_split(line), line
        assert tokenizer.decode(ids) == line
        # transformers has no "smollm" pre-tokenizer and falls back to GPT-2's regex. On this
        # vocabulary (no merges of digits) that gives the same ids except where a run of
        # whitespace meets a digit: "   2" is "  ", " 2" there, "   ", "2" for llama.cpp (and
        # SmolLM2's own tokenizer.json, which splits digits first).
        if not regex.search(r"\s{2,}\p{N}", line):
            assert ids == hf_tokenizer(line)["input_ids"], line
            compared += 1
    assert compared > 0.99 * len(lines)


def test_special_tokens_match_transformers(tokenizer: ChatTokenizer,
                                           hf_tokenizer: object) -> None:
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|><|endoftext|>"
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.eos_token_ids == {hf_tokenizer.eos_token_id}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_renders_as_transformers(tokenizer: ChatTokenizer, hf_tokenizer: object,
                                               conversation: list[dict[str, str]]) -> None:
    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                add_generation_prompt=True)
    assert tokenizer.apply_chat_template(conversation) == expected


def _greedy(gguf: Path, dtype: str, prompts: list[str]
            ) -> list[tuple[list[int], list[int], list[dict[int, float]]]]:
    llm = LLM(gguf, dtype=dtype, max_num_seqs=4, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(out.prompt_token_ids, out.outputs[0].token_ids,
             [entry.top for entry in out.outputs[0].logprobs]) for out in outs]


def _reference_logprobs(model: torch.nn.Module, prompt: list[int],
                        generated: list[int]) -> torch.Tensor:
    """transformers' next-token log-probabilities along the same tokens (one forward pass)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]


@pytest.mark.timeout(900)  # float32 on a shared 2-core machine
def test_float32_logits_equal_transformers(smollm2_gguf: Path, hf_model: torch.nn.Module) -> None:
    # Two prompts suffice for the exact check; the bf16 test below covers all of them.
    for prompt, generated, tops in _greedy(smollm2_gguf, "float32", PROMPTS[:2]):
        reference = _reference_logprobs(hf_model, prompt, generated)
        assert generated == reference.argmax(dim=-1).tolist()  # the same 32 greedy tokens
        for step, top in enumerate(tops):
            for token_id, logprob in top.items():
                assert logprob == pytest.approx(reference[step, token_id].item(), abs=1e-3)


@pytest.mark.timeout(900)
def test_bfloat16_logits_are_within_bf16_tolerance(smollm2_gguf: Path,
                                                   hf_model: torch.nn.Module) -> None:
    # bf16 keeps 8 bits of mantissa: logits of ~20 round by ~0.1 at the head alone, and 30
    # layers of bf16 activations add to it (observed worst: 0.37). A greedy step may pick a
    # token the float32 reference ranks second only when the two are that close.
    tolerance = 0.5
    for prompt, generated, tops in _greedy(smollm2_gguf, "bfloat16", PROMPTS):
        reference = _reference_logprobs(hf_model, prompt, generated)
        for step, top in enumerate(tops):
            best = reference[step].max().item()
            assert best - reference[step, generated[step]].item() < tolerance, step
            for token_id, logprob in top.items():
                assert logprob == pytest.approx(reference[step, token_id].item(),
                                                abs=tolerance), (step, token_id)


def test_chat_answers_the_capital_of_france(smollm2_gguf: Path) -> None:
    llm = LLM(smollm2_gguf, max_num_seqs=1, max_model_len=256)  # auto: bfloat16
    [out] = llm.chat(CONVERSATIONS[0], SamplingParams(temperature=0.0, max_tokens=32),
                     use_tqdm=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended at <|im_end|>, the GGUF's EOS
