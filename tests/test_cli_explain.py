"""`attnhook explain`: output, errors as one line on stderr, loading a local config, the console script."""

import shutil
import subprocess

import pytest

from attnhook.cli import main


def test_explain_prints_the_diagnosis(capsys):
    assert main(["explain", "1,8,12,197", "--image-size", "224x224"]) == 0
    out = capsys.readouterr().out
    assert "keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px" in out
    assert "heads not reduced" in out


def test_grid_prefix_and_an_image_file(capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (640, 480)).save(tmp_path / "photo.png")  # PIL size is (W, H)
    assert main(["explain", "1x1201", "--image", str(tmp_path / "photo.png"), "--stride", "16"]) == 0
    assert "1201 = 1 CLS + 30 x 40 patches of 16 px on 480 x 640 px" in capsys.readouterr().out
    assert main(["explain", "200", "--grid", "14x14", "--prefix", "1"]) == 0
    assert "200 = 1 prefix + 14 x 14 patches + 3 suffix" in capsys.readouterr().out


def test_model_config_from_a_local_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.ViTConfig(image_size=384, patch_size=16).save_pretrained(tmp_path)
    assert main(["explain", "1,12,5,577", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "577 = 1 CLS + 24 x 24 patches" in out and "rule: config: ViTConfig" in out


@pytest.mark.parametrize("argv,match", [
    (["explain", "1,8", "--image-size", "22x"], "--image-size must be HxW"),
    (["explain", "1,0,3"], "empty or negative"),
    (["explain", "197", "--grid", "15x15"], "needs 225 keys"),
    (["explain", "197", "--image", "/nonexistent/photo.png"], "Could not read an image"),
])
def test_user_errors_are_one_line_on_stderr(capsys, argv, match):
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnhook explain: error:") and match in lines[0]
    assert "Traceback" not in captured.err


def test_usage_errors_exit_2(capsys):
    assert main(["explain"]) == 2
    assert "required: shape" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 2


def test_console_script():
    exe = shutil.which("attnhook")
    if exe is None:
        pytest.skip("the attnhook console script is not installed")
    done = subprocess.run([exe, "explain", "1,0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("attnhook explain: error:") and done.stderr.count("\n") == 1
