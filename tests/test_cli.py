"""The attnhook command as a user runs it: real files in, real files out, one clear line when something is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attnhook as ah
from attnhook import demo
from attnhook.cli import main


def run(*argv, cwd=None):
    done = subprocess.run([sys.executable, "-m", "attnhook", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


def scene_png(tmp_path, name="scene.png", size=(64, 96), index=0):
    scene = demo.make_images(index + 1, seed=11, size=size)[index]
    path = tmp_path / name
    Image.fromarray(scene.image).save(path)
    return path, scene


def test_demo_writes_figures_gifs_viewers_and_traces_and_measures_pointing(tmp_path):
    code, out, err = run("demo", "--out", tmp_path / "demo", "--images", "1", "--check", "20")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    for model in demo.NAMES:
        for size in ("64x64", "64x96"):
            stem = f"{model}-{size}-0"
            assert {f"{stem}-words.png", f"{stem}.gif", f"{stem}.html", f"{stem}.safetensors"} <= set(files)
            assert f"  {size}, 20 fresh images: captions exact" in out
    assert "pointing" in out and "wrote 16 files" in out
    trace = ah.load(tmp_path / "demo" / "transformer-64x96-0.safetensors")
    assert trace.meta["grid"].rows == 8 and trace.meta["grid"].cols == 12 and trace.meta["image_size"] == [64, 96]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind


def test_caption_with_a_bundled_model_points_at_the_named_objects(tmp_path):
    path, scene = scene_png(tmp_path)
    code, out, err = run("caption", path, "--model", "transformer", "--out", tmp_path / "out")
    assert code == 0, err
    assert out.splitlines()[0] == f"{path}: {scene.caption}"
    trace = ah.load(tmp_path / "out" / "scene.safetensors")
    words = trace.meta["words"][0][0]
    assert " ".join(words) == scene.caption
    # the saved trace says where the model looked: the color word's peak lies in its object's box
    grid = trace.meta["grid"]
    from attnhook.maps import upsample

    maps = upsample(ah.attention_maps(trace, grid), grid, (64, 96))[0]
    y, x = np.unravel_index(maps[1].argmax(), (64, 96))  # step 1 produced word 1, the first color
    x0, y0, x1, y1 = scene.objects[0].box
    assert x0 <= x < x1 and y0 <= y < y1


def test_render_redraws_a_saved_trace(tmp_path):
    path, scene = scene_png(tmp_path)
    assert main(["caption", str(path), "--model", "sat", "--out", str(tmp_path / "cap")]) == 0
    code, out, err = run("render", tmp_path / "cap" / "scene.safetensors", "--image", path, "--out", tmp_path / "r")
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "cap" / "scene-words.png"))
    b = np.asarray(Image.open(tmp_path / "r" / "scene-words.png"))
    assert a.shape == b.shape and np.array_equal(a, b)  # the same picture from the file as from the run


def test_inspect_lists_sites_keys_and_grid(tmp_path):
    code, out, err = run("inspect", "transformer", "--image-size", "64x96")
    assert code == 0, err
    assert "decoder.layers.1.multihead_attn" in out and "cross" in out and "96" in out and "8 x 12" in out


def test_caption_and_inspect_a_local_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from test_hf_matrix import V, ved_gpt2

    model = ved_gpt2().model
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    directory = tmp_path / "ved"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    path, _ = scene_png(tmp_path, size=(48, 64))

    code, out, err = run("caption", path, "--model", directory, "--out", tmp_path / "out", "--beams", "2")
    assert code == 0, err
    trace = ah.load(tmp_path / "out" / "scene.safetensors")
    grid = trace.meta["grid"]
    assert (grid.prefix, grid.rows, grid.cols) == (1, 4, 4)  # ViT: CLS + 4 x 4 patches of 8 px on 32 x 32
    assert trace.weights(trace.sites[0]).shape[-1] == 17
    assert len(trace.meta["words"][0][0]) >= 1

    code, out, err = run("inspect", directory, "--image-size", "32x32")
    assert code == 0, err
    assert "crossattention" in out and "1 CLS + 4 x 4" in out


@pytest.mark.parametrize("argv,message", [
    (["caption", "missing.png", "--model", "transformer"], "Could not read an image from 'missing.png': no such file"),
    (["caption", "{bad}", "--model", "transformer"], "Could not read an image"),
    (["caption", "{good}", "--model", "nonsense"], "Unknown model 'nonsense'"),
    (["caption", "{good}", "--model", "{empty}"], "is not a transformers model directory"),
    (["caption", "{good}", "--model", "transformer", "--out", "{good}"], "Cannot write to the output folder"),
    (["caption", "{good}", "--model", "transformer", "--beams", "3"], "--beams needs a transformers model"),
    (["render", "{good}", "--image", "{good}"], "not a safetensors file"),
])
def test_bad_input_is_one_line_on_stderr_and_nothing_is_written(tmp_path, argv, message):
    good, _ = scene_png(tmp_path, "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    names = {"{good}": str(good), "{bad}": str(tmp_path / "bad.png"), "{empty}": str(tmp_path / "empty")}
    argv = [names.get(a, a) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(*argv, "--out", tmp_path / "out") if "--out" not in argv else run(*argv)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half-written output


def test_help_describes_every_command():
    code, out, _ = run("--help")
    assert code == 0
    for command in ("demo", "caption", "inspect", "render", "explain"):
        assert command in out
    code, out, _ = run("caption", "--help")
    assert "--beams" in out and "--layer" in out and "--heads" in out and "--out" in out
