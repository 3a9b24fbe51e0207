"""attnhook without transformers installed: the bundled models and the command line work, and everything that needs
transformers says so in one line. Each run is a fresh interpreter in which importing transformers fails as it does
when the package is absent (a meta-path finder raises ModuleNotFoundError); scripts/check_floors.sh runs the whole
suite in a venv that really lacks it."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from attnhook import demo

BLOCK = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def run_without_transformers(*argv, code="import runpy; runpy.run_module('attnhook', run_name='__main__')"):
    script = BLOCK + f"sys.argv = ['attnhook', *{[str(a) for a in argv]!r}]\n" + code
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def scene_png(tmp_path):
    scene = demo.make_images(1, seed=11, size=(64, 96))[0]  # the scene tests/test_cli.py captions
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path, scene


def test_the_block_really_hides_transformers():
    code, out, err = run_without_transformers(code="import attnhook.cli\ntry:\n    import transformers\n"
                                                    "except ImportError:\n    print('absent')\n"
                                                    "print('transformers' in sys.modules)")
    assert code == 0, err
    assert out.split() == ["absent", "False"]


def test_caption_with_a_bundled_model_needs_no_transformers(tmp_path):
    path, scene = scene_png(tmp_path)
    code, out, err = run_without_transformers("caption", path, "--model", "transformer", "--out", tmp_path / "out")
    assert code == 0, err
    assert out.splitlines()[0] == f"{path}: {scene.caption}"
    assert (tmp_path / "out" / "scene.safetensors").is_file()


def test_a_model_directory_without_transformers_is_one_line_that_names_the_extra(tmp_path):
    path, _ = scene_png(tmp_path)
    (tmp_path / "model").mkdir()
    code, out, err = run_without_transformers("caption", path, "--model", tmp_path / "model", "--out", tmp_path / "out")
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "attnhook[transformers]" in err, err
    assert not (tmp_path / "out").exists()


def test_an_unknown_name_without_transformers_says_unknown_and_names_the_extra(tmp_path):
    path, _ = scene_png(tmp_path)
    code, out, err = run_without_transformers("caption", path, "--model", "nonsense", "--out", tmp_path / "out")
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Unknown model 'nonsense'" in err and "transformer" in err and "attnhook[transformers]" in err, err
    assert not (tmp_path / "out").exists()


def test_explain_with_a_model_config_without_transformers_is_one_line(tmp_path):
    code, out, err = run_without_transformers("explain", "1,8,12,197", "--model", tmp_path)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "attnhook[transformers]" in err, err
