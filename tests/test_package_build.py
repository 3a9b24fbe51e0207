"""The package as a user gets it: the sdist holds what its tests need, and the wheel built from that sdist installs
into a fresh venv outside the repository, where `attnhook demo` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def build(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(sdist, its unpacked folder, the wheel built from that folder), through setuptools' own PEP 517 hooks."""
    out = tmp_path / "dist"
    out.mkdir()
    hook = "import sys, setuptools.build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = out / subprocess.run([sys.executable, "-c", hook, "build_sdist", str(out)], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    src = tmp_path / "src" / sdist.name.removesuffix(".tar.gz")
    wheel = out / subprocess.run([sys.executable, "-c", hook, "build_wheel", str(out)], cwd=src, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
    return sdist, src, wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("build"))


def test_the_sdist_holds_every_tracked_file_its_tests_read_and_they_collect_there(built):
    sdist, src, _ = built
    tracked = subprocess.run(["git", "ls-files", "tests", "docs", "examples", "attnhook", "LICENSE", "README.md"],
                             cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    present = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    missing = [f for f in tracked.stdout.split() if (ROOT / f).is_file() and f not in present]
    assert not missing, f"tracked files the sdist lacks: {missing}"
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " error" not in done.stdout.splitlines()[-1], done.stdout[-3000:]


def test_the_wheel_carries_the_license_and_py_typed(built):
    names = zipfile.ZipFile(built[2]).namelist()
    assert "attnhook/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    meta = zipfile.ZipFile(built[2]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_demo(built, tmp_path):
    """The new venv gets the wheel alone (no dependencies fetched); it sees this environment's dependencies through
    a .pth line, after its own site-packages, so the attnhook it imports is the installed wheel's."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--force-reinstall", "--no-index", str(built[2])], check=True, capture_output=True, text=True)
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run([str(python), "-c", "import attnhook; print(attnhook.__file__)"], cwd=away,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    done = subprocess.run([str(bin_dir / "attnhook"), "demo", "--out", "demo", "--images", "1", "--check", "5"],
                          cwd=away, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 16 files" in done.stdout
    assert len(list((away / "demo").glob("*.html"))) == 4

