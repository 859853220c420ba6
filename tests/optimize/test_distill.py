"""`surge optimize distill` on tiny random-weight teachers: the trainable model, the student
specs, the loss, training (loss goes down), DDP equivalence, resume, bad input, the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from surge.cli import main as surge_main
from surge.models.checkpoint import open_checkpoint
from surge.optimize.distill import GenerationSettings, distill, prepare_job
from surge.optimize.distill_data import sample_indices
from surge.optimize.distill_loss import distill_loss
from surge.optimize.distill_train import TrainSettings, train
from surge.optimize.student import parse_student_spec
from surge.optimize.trainable import TrainableDecoder

TEXT = ("The server reads a request, finds the model, and streams tokens back to the user. "
        "Each token is sampled from the model's next-token distribution. ") * 40


def _teacher(path: Path) -> TrainableDecoder:
    checkpoint = open_checkpoint(path)
    model = TrainableDecoder(checkpoint.read_config(), "teacher")
    model.load_tensors(checkpoint.iter_tensors())
    return model.eval()


def _settings(**changes: object) -> TrainSettings:
    base = {"steps": 6, "batch_size": 4, "micro_batch": 2, "seq_len": 32, "lr": 2e-3,
            "warmup_steps": 2, "precision": "fp32", "alpha": 0.5, "temperature": 2.0}
    return TrainSettings(**{**base, **changes})  # type: ignore[arg-type]


def _job(teacher: Path, out: Path, text_file: Path, student: str = "layers=2", **kw: object):
    settings = kw.pop("settings", None) or _settings()
    return prepare_job(str(teacher), student, str(out), [str(text_file)], settings,
                       progress=False, device="cpu", **kw)  # type: ignore[arg-type]


def _student_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / ".distill" / "state.pt", weights_only=False)["student"]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# -- the trainable model and the students -------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_trainable_model_matches_surges_serving_model(tiny_checkpoint, preset: str) -> None:
    from surge.eval.scoring import SequenceScorer
    from surge.models.loader import load_model

    path = tiny_checkpoint(preset)
    ids = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = torch.log_softmax(_teacher(path)(ids)[0].float(), dim=-1)
    scorer = SequenceScorer(load_model(str(path), dtype="float32", device="cpu",
                                       max_positions=64), 64)
    served = scorer.log_probs(scorer.hidden_states(ids[0].tolist()))
    torch.testing.assert_close(ours, served, atol=1e-4, rtol=1e-4)


def test_student_specs_pick_layers() -> None:
    assert parse_student_spec("layers=15", 30).layers == (
        0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29)
    assert parse_student_spec("drop:every2", 6).layers == (0, 2, 4)
    assert parse_student_spec("keep:0,3,5", 6).layers == (0, 3, 5)
    plan = parse_student_spec("layers=3,mlp=0.5", 6)
    assert plan.layers == (0, 3, 5)
    assert plan.mlp == 0.5
    for bad in ("layers=0", "layers=7", "drop:every1", "keep:0,9", "mlp=0", "mlp=1.5",
                "wide=2", "", "layers=2,layers=3"):
        with pytest.raises(ValueError, match="--student"):
            parse_student_spec(bad, 6)


def test_student_with_all_teacher_layers_is_the_teacher(tiny_checkpoint) -> None:
    from surge.optimize.student import build_student

    teacher = _teacher(tiny_checkpoint("tiny-llama"))
    ids = torch.randint(0, 2048, (2, 16))
    same = build_student(parse_student_spec("keep:0,1,2,3", 4), teacher, None, 0)
    narrowed = build_student(parse_student_spec("layers=2,mlp=0.5", 4), teacher, None, 0)
    with torch.no_grad():
        torch.testing.assert_close(same(ids), teacher(ids))
        assert narrowed.config.num_layers == 2 and narrowed.config.intermediate_size == 128
        assert narrowed(ids).shape == (2, 16, 2048)
    # The kept layers' attention is the teacher's own.
    torch.testing.assert_close(narrowed.model.layers[1].self_attn.q_proj.weight,
                               teacher.model.layers[3].self_attn.q_proj.weight)


# -- the loss ---------------------------------------------------------------------------------

def test_loss_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    for kind in ("forward", "reverse", "jsd"):
        same = distill_loss(teacher, teacher, ids, mask, 0.0, 2.0, kind)
        assert abs(same.total.item()) < 1e-5  # no divergence from itself
        differ = distill_loss(student, teacher, ids, mask, 0.0, 2.0, kind)
        assert differ.total.item() > 0
        torch.testing.assert_close(differ.total, 4.0 * differ.kd)  # T^2 x KD when alpha = 0
    ce_only = distill_loss(student, teacher, ids, mask, 1.0, 2.0)
    counted = mask[:, 1:].bool()
    expected = torch.nn.functional.cross_entropy(student[:, :-1][counted], ids[:, 1:][counted],
                                                 reduction="sum")
    torch.testing.assert_close(ce_only.total, expected)
    half = distill_loss(student, teacher, ids, mask, 0.25, 2.0, "forward")
    torch.testing.assert_close(half.total, 0.25 * half.ce + 0.75 * 4.0 * half.kd)
    # Forward KL(t || s) by hand, at temperature 2.
    log_s = torch.log_softmax(student[:, :-1][counted] / 2, -1)
    log_t = torch.log_softmax(teacher[:, :-1][counted] / 2, -1)
    torch.testing.assert_close(half.kd, (log_t.exp() * (log_t - log_s)).sum())


def test_samples_are_a_function_of_the_step() -> None:
    first = sample_indices(10, 3, 0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert sample_indices(10, 3, 8, 5) == first[8:13]  # any window, same order


# -- training ---------------------------------------------------------------------------------

@pytest.fixture
def sharp_teacher(tiny_checkpoint, tmp_path: Path) -> Path:
    """tiny-llama with its LM head scaled up: random weights give near-uniform next-token
    distributions, and a student trivially matches those; this teacher has opinions."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "sharp"
    shutil.copytree(tiny_checkpoint("tiny-llama"), path)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 40
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_distillation_loss_decreases(sharp_teacher: Path, tmp_path: Path, text_file: Path,
                                     kind: str) -> None:
    job = _job(sharp_teacher, tmp_path / "out", text_file,
               settings=_settings(steps=16, alpha=0.0, lr=1e-3, warmup_steps=2, kl=kind))
    summary = train(job)
    kd = [record["kd"] for record in summary.losses]
    assert len(kd) == 16
    assert sum(kd[-3:]) / 3 < 0.7 * sum(kd[:3]) / 3, kd


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tiny_checkpoint, tmp_path: Path,
                                            text_file: Path) -> None:
    """gloo on loopback: 2 ranks x micro-batch 2 == 1 process x 2 micro-batches of 2."""
    teacher = tiny_checkpoint("tiny-llama")
    settings = _settings(steps=3, batch_size=4, micro_batch=2)
    one = _job(teacher, tmp_path / "one", text_file, settings=settings)
    two = _job(teacher, tmp_path / "two", text_file, settings=settings, nproc=2)
    distill(one)
    distill(two)
    single, parallel = _student_state(tmp_path / "one"), _student_state(tmp_path / "two")
    initial = _teacher(teacher).state_dict()
    assert not torch.equal(single["model.layers.1.mlp.up_proj.weight"],
                           initial["model.layers.3.mlp.up_proj.weight"])  # it did train
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, atol=2e-5, rtol=1e-4, msg=name)
    summary = json.loads((tmp_path / "two" / "distill_summary.json").read_text())
    assert summary["world"] == 2 and summary["end_step"] == 3


def test_resume_continues_at_the_checkpoint_step(tiny_checkpoint, tmp_path: Path,
                                                 text_file: Path) -> None:
    teacher = tiny_checkpoint("tiny-llama")
    settings = _settings(steps=6)
    whole = _job(teacher, tmp_path / "whole", text_file, settings=settings, checkpoint_every=3)
    train(whole)

    cut = _job(teacher, tmp_path / "cut", text_file, settings=settings, checkpoint_every=3)

    def interrupt(step: int) -> None:
        if step == 4:  # after the step-3 checkpoint, before the next
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=interrupt)
    state = torch.load(tmp_path / "cut" / ".distill" / "state.pt", weights_only=False)
    assert state["step"] == 3 and state["samples_seen"] == 12
    resumed = _job(teacher, tmp_path / "cut", text_file, settings=settings, checkpoint_every=3,
                   resume=True)
    summary = train(resumed)
    assert (summary.start_step, summary.end_step) == (3, 6)
    assert [r["step"] for r in summary.losses] == [4, 5, 6]
    for name, value in _student_state(tmp_path / "whole").items():
        torch.testing.assert_close(_student_state(tmp_path / "cut")[name], value, atol=1e-6,
                                   rtol=1e-5, msg=name)


def test_interrupted_checkpoint_write_keeps_the_last_one(tiny_checkpoint, tmp_path: Path,
                                                         text_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tiny_checkpoint("tiny-llama"), tmp_path / "out", text_file,
               settings=_settings(steps=4), checkpoint_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: half written, then the process dies
            f.write(b"partial")  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(job)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(tmp_path / "out" / ".distill" / "state.pt", weights_only=False)
    assert state["step"] == 2


def test_max_minutes_stops_early_with_a_checkpoint_and_a_student(
        tiny_checkpoint, tmp_path: Path, text_file: Path) -> None:
    job = _job(tiny_checkpoint("tiny-llama"), tmp_path / "out", text_file,
               settings=_settings(steps=50), checkpoint_every=40, max_minutes=1e-4)
    summary = train(job)
    assert summary.stopped_by_time and summary.end_step == 1
    state = torch.load(tmp_path / "out" / ".distill" / "state.pt", weights_only=False)
    assert state["step"] == 1  # saved at the stop although 1 is not a multiple of 40
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- bad input --------------------------------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return ["optimize", "distill", *args]


@pytest.mark.parametrize(("extra", "message"), [
    (["--alpha", "1.5"], "--alpha 1.5 is invalid: allowed is 0 to 1"),
    (["--alpha", "-0.1"], "--alpha -0.1 is invalid"),
    (["--temperature", "0"], "--temperature 0.0 is invalid: allowed is a number > 0"),
    (["--temperature", "-1"], "--temperature -1.0 is invalid"),
    (["--student", "preset:tiny-mistral"], "vocabulary of 1024 tokens, the teacher 2048"),
    (["--batch-size", "3"], "--batch-size 3 must split"),
    (["--student", "layers=9"], "layers=9 is invalid"),
])
def test_bad_settings_fail_before_training(tiny_checkpoint, tmp_path: Path, text_file: Path,
                                           capsys: pytest.CaptureFixture, extra: list[str],
                                           message: str) -> None:
    out = tmp_path / "out"
    args = ["--teacher", str(tiny_checkpoint("tiny-llama")), "--student", "layers=2",
            "--out", str(out), "--data", str(text_file), "--no-eval", *extra]
    assert surge_main(_cli(*args)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was prepared, let alone trained


def test_student_directory_of_another_vocabulary_is_refused(
        tiny_checkpoint, tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["--teacher", str(tiny_checkpoint("tiny-llama")), "--student",
            str(tiny_checkpoint("tiny-mistral")), "--out", str(out), "--data", str(text_file),
            "--no-eval"]
    assert surge_main(_cli(*args)) == 2
    assert "must share the teacher's vocabulary" in capsys.readouterr().err
    assert not out.exists()


def test_teacher_that_is_not_a_causal_lm_is_refused(tiny_checkpoint, tmp_path: Path,
                                                    text_file: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    args = ["--teacher", str(tiny_checkpoint("tiny-bert")), "--student", "layers=1",
            "--out", str(tmp_path / "out"), "--data", str(text_file), "--no-eval"]
    assert surge_main(_cli(*args)) == 2
    assert "is not a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "name", "message"), [
    ("", "empty.txt", "is empty: there is nothing to train on"),
    ("  \n\n", "blank.jsonl", "is empty: there is nothing to train on"),
    ('{"prompt": ""}\n', "bad.jsonl", 'line 1 needs a non-empty "prompt"'),
    ("not json\n", "broken.jsonl", "line 1 is not JSON"),
])
def test_bad_data_fails_before_training(tiny_checkpoint, tmp_path: Path,
                                        capsys: pytest.CaptureFixture, content: str, name: str,
                                        message: str) -> None:
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    args = ["--teacher", str(tiny_checkpoint("tiny-llama")), "--student", "layers=2",
            "--out", str(out), "--data", str(data), "--no-eval"]
    assert surge_main(_cli(*args)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_needs_resume(tiny_checkpoint, tmp_path: Path, text_file: Path) -> None:
    teacher = tiny_checkpoint("tiny-llama")
    train(_job(teacher, tmp_path / "out", text_file, settings=_settings(steps=1)))
    with pytest.raises(FileExistsError, match="pass --resume"):
        _job(teacher, tmp_path / "out", text_file)
    with pytest.raises(ValueError, match="other settings"):
        _job(teacher, tmp_path / "out", text_file, resume=True,
             settings=_settings(steps=1, lr=1.0))
    with pytest.raises(FileNotFoundError, match="no distillation to resume"):
        _job(teacher, tmp_path / "new", text_file, resume=True)


# -- data from the teacher, and the written student --------------------------------------------

def test_prompts_are_answered_by_the_teacher(tiny_checkpoint, tmp_path: Path) -> None:
    from surge import LLM
    from surge.sampling_params import SamplingParams
    from surge.tokenizer import load_tokenizer

    teacher = tiny_checkpoint("tiny-llama")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is a token?"}\n'
                       '{"prompt": "Say hi", "chat": false}\n'
                       '{"prompt": "Given", "response": " an answer"}\n', encoding="utf-8")
    job = _job(teacher, tmp_path / "out", prompts, settings=_settings(seq_len=64),
               generation=GenerationSettings(max_tokens=12))
    examples = torch.load(tmp_path / "out" / ".distill" / "data.pt", weights_only=False)
    assert job.world == 1 and len(examples) == 3
    tokenizer = load_tokenizer(teacher)
    chat = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a token?"}]), add_special_tokens=False)
    llm = LLM(str(teacher), device="cpu", max_model_len=128)
    greedy = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=12),
                          use_tqdm=False)[0].outputs[0].token_ids
    first = examples[0]
    assert first.ids == chat + list(greedy)
    assert first.mask == [0] * len(chat) + [1] * len(greedy)  # only the answer counts
    given = examples[2]
    assert given.ids[-given.targets:] == tokenizer.encode(" an answer", add_special_tokens=False)


@pytest.mark.slow
def test_cli_writes_a_student_that_serves_and_loads_in_transformers(
        tiny_checkpoint, tmp_path: Path, text_file: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surge import LLM
    from surge.sampling_params import SamplingParams

    teacher = tiny_checkpoint("tiny-qwen2")
    out = tmp_path / "student"
    code = surge_main(_cli("--teacher", str(teacher), "--student", "drop:every2,mlp=0.5",
                           "--out", str(out), "--data", str(text_file), "--steps", "3",
                           "--batch-size", "2", "--micro-batch", "2", "--seq-len", "32",
                           "--no-progress", "--quick", "--no-speed"))
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 160
    assert (out / "optimize_report.json").is_file()
    assert (out / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
    # Transformers and Surge's trainable model give the same logits for the written student.
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("The server reads", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, _teacher(out)(ids), atol=1e-4,
                                   rtol=1e-4)
    # And Surge's engine serves it.
    llm = LLM(str(out), device="cpu", max_model_len=64)
    answer = llm.generate(["The server"], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert len(answer.outputs[0].token_ids) == 4


@pytest.mark.slow
def test_torchrun_ranks_equal_one_process(tiny_checkpoint, tmp_path: Path,
                                          text_file: Path) -> None:
    """`torchrun --nproc-per-node 2 -m surge.optimize.distill_cli` (gloo, loopback)."""
    import subprocess
    import sys

    teacher = tiny_checkpoint("tiny-llama")
    flags = ["--teacher", str(teacher), "--student", "layers=2", "--data", str(text_file),
             "--steps", "2", "--batch-size", "4", "--micro-batch", "2", "--seq-len", "32",
             "--precision", "fp32", "--lr", "2e-3", "--warmup-steps", "2", "--device", "cpu",
             "--no-eval", "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "surge.optimize.distill_cli", *flags, "--out", str(tmp_path / "ranks")],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert surge_main(_cli(*flags, "--out", str(tmp_path / "one"))) == 0
    assert json.loads((tmp_path / "ranks" / "distill_summary.json").read_text())["world"] == 2
    single, ranks = _student_state(tmp_path / "one"), _student_state(tmp_path / "ranks")
    for name, value in single.items():
        torch.testing.assert_close(ranks[name], value, atol=2e-5, rtol=1e-4, msg=name)
