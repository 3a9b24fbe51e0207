"""Keras 3 captioners on each installed backend: tests/keras/ once per backend, each in its own process (Keras
fixes its backend when it is first imported). A backend whose package is not installed is skipped, saying so."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# backend -> the package it needs besides keras
BACKENDS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keras_backend(backend):
    missing = [p for p in ("keras", BACKENDS[backend]) if importlib.util.find_spec(p) is None]
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
