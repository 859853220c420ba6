"""lm-evaluation-harness's ``local-completions`` runs a multiple-choice task (a JSON dataset
written here) to the end against a real `surge serve`, and every loglikelihood it gets equals
the offline engine's prompt logprobs for the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from tests.server._helpers import ServerProcess

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Cats like to", "choices": ["sleep", "fly", "swim", "code"], "answer": 0},
]


def _task_dir(root: Path) -> Path:
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "surge_mc.yaml").write_text(
        "task: surge_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    return root


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_completions_multiple_choice_matches_offline_loglikelihoods(
        server: ServerProcess, model_dir: Path, tmp_path: Path) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="tiny",
                             tokenizer_backend="huggingface", tokenizer=str(model_dir),
                             tokenized_requests=True, max_retries=1)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["surge_mc"], task_manager=TaskManager(include_path=str(
            _task_dir(tmp_path))), log_samples=True, random_seed=0)
    assert 0 <= results["results"]["surge_mc"]["acc,none"] <= 1
    samples = results["samples"]["surge_mc"]
    assert len(samples) == len(QUESTIONS)

    offline = LLM(model_dir)
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"],
                                                     strict=True):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            entries = offline.generate(
                [context_ids + continuation_ids],
                SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
            )[0].prompt_logprobs
            expected = sum(e.logprob for e in entries[len(context_ids):])
            assert float(response[0][0]) == pytest.approx(expected, abs=1e-3)
