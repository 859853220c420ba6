"""Prompt suites: parsing with clear errors, scoring, and greedy answers through `LLM`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM
from surge.eval import EvalOptions, ModelSpec, evaluate, load_suite, parse_suite
from surge.eval.prompts import PromptCase, is_correct, normalize

PROMPTS = ["Hello world, the", "Once upon a time", "1 2 3 4", "The capital of"]


def case(expected: str | list[str], match: str = "contains") -> PromptCase:
    options = (expected,) if isinstance(expected, str) else tuple(expected)
    return PromptCase("q", options, match)  # type: ignore[arg-type]


def test_matching_ignores_case_space_and_final_punctuation() -> None:
    assert normalize('  "The   answer is Paris." ') == "the answer is paris"
    assert is_correct(case("Paris", "exact"), "paris!")
    assert not is_correct(case("Paris", "exact"), "It is Paris.")
    assert is_correct(case("Paris"), "It is   PARIS.")
    assert is_correct(case(["7", "seven"]), "A week has seven days.")
    # Whole words only: "7" is not in "1.275", "Rome" is not in "Romeo".
    assert not is_correct(case("7"), "about 1.275 km")
    assert not is_correct(case("Rome"), "Romeo and Juliet")
    assert is_correct(case("carbon dioxide"), "Plants absorb carbon dioxide (CO2).")


def test_builtin_suite_loads() -> None:
    name, cases = load_suite(None)
    assert name == "builtin:default_prompts.jsonl"
    assert 20 <= len(cases) <= 40
    assert {c.match for c in cases} == {"contains", "exact"}
    assert any(c.chat for c in cases) and any(not c.chat for c in cases)


@pytest.mark.parametrize(("lines", "message"), [
    ('{"prompt": "a", "expected": "b"}\n{"prompt": "a", "expected": "b"\n',
     r"suite.jsonl, line 2: not valid JSON"),
    ('# comment\n\n{"prompt": "a"}\n', r"line 3: 'expected' must be"),
    ('{"prompt": "", "expected": "b"}\n', r"line 1: 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "expected": "b", "match": "regex"}\n', r"line 1: 'match' is 'regex'"),
    ('{"prompt": "a", "expected": "b", "chat": "yes"}\n', r"line 1: 'chat' must be true"),
    ('{"prompt": "a", "expected": "b", "max_tokens": 0}\n', r"line 1: 'max_tokens' must be"),
    ('{"prompt": "a", "expected": "b", "answer": "c"}\n', r"line 1: unknown key\(s\) \['answer'\]"),
    ('{"prompt": "a", "expected": "..."}\n', r"line 1: 'expected' must be"),
    ('["a", "b"]\n', r"line 1: expected a JSON object"),
    ("# only a comment\n\n", r"has no prompts"),
])
def test_malformed_suites_name_the_line(lines: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_suite(lines, "suite.jsonl")


def test_missing_suite_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*not found"):
        load_suite(tmp_path / "nope.jsonl")


def greedy_answers(model_dir: Path, prompts: list[str], chat: bool) -> list[str]:
    from surge import SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    if chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [out.outputs[0].text for out in outs]


def write_suite(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_suite_of_the_models_own_answers_scores_one_and_wrong_ones_zero(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tiny_checkpoint("tiny-llama")
    items, answers = [], []
    for chat in (True, False):
        for prompt, answer in zip(PROMPTS, greedy_answers(model_dir, PROMPTS, chat),
                                  strict=True):
            assert normalize(answer), answer  # a word to match, not only punctuation
            items.append({"prompt": prompt, "expected": answer, "match": "exact", "chat": chat,
                          "max_tokens": 6})
            items.append({"prompt": prompt, "expected": answer.split()[0], "chat": chat,
                          "max_tokens": 6})
            answers += [answer, answer]
    right = write_suite(tmp_path / "right.jsonl", items)
    wrong = write_suite(tmp_path / "wrong.jsonl",
                        [{**item, "expected": "zebra crossing"} for item in items])
    spec = ModelSpec(str(model_dir), "float32", "cpu")
    for suite, accuracy in [(right, 1.0), (wrong, 0.0)]:
        options = EvalOptions(perplexity=False, prompt_file=suite, progress=False)
        result = evaluate(spec, options=options).model.prompts
        assert result.num_prompts == len(items)
        assert result.accuracy == accuracy, result.items
        assert [item["answer"] for item in result.items] == answers
