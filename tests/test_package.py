"""The package's face: light to import, every public name documented with an example."""

import subprocess
import sys

import attnhook as ah


def test_import_loads_torch_and_numpy_but_nothing_heavy():
    code = ("import sys, attnhook; heavy = {'matplotlib', 'transformers', 'scipy', 'safetensors', 'jsonschema'}; "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_has_a_docstring_with_an_example():
    missing = [name for name in ah.__all__
               if name not in ("AttnHookError", "Site") and "Example" not in (getattr(ah, name).__doc__ or "")]
    assert not missing, f"public names without an Example: {missing}"


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "attnhook", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "explain" in done.stdout
