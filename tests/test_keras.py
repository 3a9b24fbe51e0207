"""Keras 3 captioners on each installed backend: tests/keras/ once per backend, each in its own process (Keras
fixes its backend when it is first imported). A backend whose package is not installed is skipped, saying so."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# backend -> the distributions it needs besides keras (tensorflow: either build)
BACKENDS = {"torch": ("torch",), "jax": ("jax",), "tensorflow": ("tensorflow", "tensorflow-cpu")}


def _installed(*names: str) -> bool:
    # by installed distribution, not importlib.util.find_spec: with tests/ on sys.path, tests/keras/ is found as
    # a namespace package named keras where Keras is not installed
    for name in names:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keras_backend(backend):
    missing = [p[0] for p in (("keras",), BACKENDS[backend]) if not _installed(*p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[keras]' (tensorflow-cpu for the "
                    "TensorFlow backend, see docs/keras.md)")
    env = {**os.environ, "KERAS_BACKEND": backend, "ATTNHOOK_KERAS_CASES": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / "keras")],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=HERE.parent)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def test_importing_attnhook_imports_no_keras_jax_or_tensorflow():
    code = "import sys, attnhook; print(sorted(m for m in ('keras', 'jax', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
