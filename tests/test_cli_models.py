"""`attnhook caption` on decoder-only VLMs and cached Hub names, `render --words` checks, progress on a terminal,
and every subcommand's --help ending with two usage examples (issue 15, point 6)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from PIL import Image

import attnhook as ah
from attnhook.cli import build_parser, main
from test_cli import hf_dir, one_line, scene_png


def run(*argv, env=None, stderr_tty=False, cwd=None):
    """The command in a fresh process; with `stderr_tty`, its stderr is a pseudo-terminal, read back whole."""
    full = {**os.environ, **(env or {})}
    command = [sys.executable, "-m", "attnhook", *map(str, argv)]
    if not stderr_tty:
        done = subprocess.run(command, capture_output=True, text=True, env=full, cwd=cwd, timeout=300)
        return done.returncode, done.stdout, done.stderr
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, text=True, env=full, cwd=cwd)
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read()
    proc.wait(timeout=300)
    os.close(leader)
    return proc.returncode, out, err.decode(errors="replace")


def test_every_subcommand_help_ends_with_two_usage_examples():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "caption", "inspect", "render", "explain"}
    for name, sub in commands.items():
        lines = sub.format_help().rstrip().splitlines()
        assert lines[-3] == "examples:", (name, lines[-4:])
        for line in lines[-2:]:
            assert f"{line} ".startswith(f"  attnhook {name} "), (name, line)
            argv = shlex.split(line)[1:]
            sub_args = parser.parse_args(argv)  # each example is a valid command line
            assert sub_args.command == name


def test_render_refuses_words_that_do_not_fit_the_trace(tmp_path, capsys):
    path, scene = scene_png(tmp_path)
    assert main(["caption", str(path), "--model", "transformer", "--out", str(tmp_path / "cap")]) == 0
    trace_file = tmp_path / "cap" / "scene.safetensors"
    steps = ah.load(trace_file).weights("decoder.layers.0.multihead_attn").shape[1]
    capsys.readouterr()
    for words, message in [("a,b", f"--words gives 2 word(s) but {trace_file} holds {steps} decoding step(s)"),
                           ("a,,b", "has an empty word at position 1"), ("a,b,", "has an empty word at position 2")]:
        assert main(["render", str(trace_file), "--image", str(path), "--words", words,
                     "--out", str(tmp_path / "r")]) == 1
        assert message in one_line(capsys.readouterr().err)
        assert not (tmp_path / "r").exists()
    words = ",".join(f"w{i}" for i in range(steps - 1))  # one per step but the end token's
    assert main(["render", str(trace_file), "--image", str(path), "--words", words, "--out", str(tmp_path / "r")]) == 0
    assert ah.load(tmp_path / "r" / "scene.safetensors").meta["words"] == [[words.split(",")]]


def test_progress_is_a_tqdm_bar_on_a_terminal_and_result_lines_stay_whole(tmp_path):
    paths = [scene_png(tmp_path, f"s{i}.png", index=i)[0] for i in range(3)]
    code, out, err = run("caption", *paths, "--model", "transformer", "--out", tmp_path / "out", stderr_tty=True)
    assert code == 0, err
    assert "caption:" in err and "3/3" in err and "image" in err  # tqdm's bar: description, count, unit
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [str(p) for p in paths] and lines[3].startswith("wrote 12")
    code, out, err = run("caption", *paths, "--model", "transformer", "--out", tmp_path / "out2")
    assert code == 0 and err == ""  # not a terminal: no bar at all


def test_demo_shows_progress_on_a_terminal(tmp_path):
    code, out, err = run("demo", "--out", tmp_path / "demo", "--images", "1", "--check", "2", stderr_tty=True)
    assert code == 0, err
    assert "demo:" in err and "12/12" in err  # 2 models x 2 sizes x (1 drawn + 2 measured)
    assert "wrote 16 files" in out


# --- transformers models: decoder-only VLMs, the local cache ------------------------------------------------------
def llava_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_matrix import llava
    from test_quick import llava_processor

    directory = tmp_path / "llava"
    llava(batch=1).model.save_pretrained(directory)
    llava_processor(transformers).save_pretrained(directory)
    return directory


def test_caption_runs_a_decoder_only_vlm_through_its_processor_and_chat_template(tmp_path, capsys):
    directory = llava_dir(tmp_path)
    path, _ = scene_png(tmp_path, size=(48, 64))
    capsys.readouterr()
    assert main(["caption", str(path), "--model", str(directory), "--prompt", "w7 w8", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: w") and captured.err == ""
    trace = ah.load(tmp_path / "out" / "scene.safetensors")
    assert all(s.name.startswith("model.language_model.") for s in trace.sites)
    assert len(trace.meta["image_keys"][0]) == 16 and (trace.meta["grid"].rows, trace.meta["grid"].cols) == (4, 4)
    assert 1 <= len(trace.meta["words"][0][0]) <= 4
    code = main(["caption", str(path), "--model", str(directory), "--sites", "all", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "all")])  # the vision tower recorded too: maps still from the decoder
    assert code == 0, capsys.readouterr().err
    assert "vision_tower" in " ".join(s.name for s in ah.load(tmp_path / "all" / "scene.safetensors").sites)
    capsys.readouterr()
    assert main(["inspect", str(directory), "--image-size", "32x32"]) == 0
    out = capsys.readouterr().out
    assert "model.language_model.layers.1.self_attn" in out and "vision_tower" in out


def cache_with(tmp_path, directory, repo="tiny-org/tiny-ved"):
    """A Hugging Face hub cache holding `directory` as the snapshot of `repo` (the layout the hub client writes)."""
    import shutil

    cache = tmp_path / "hub"
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(directory, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return cache


def test_a_hub_name_in_the_local_cache_is_used_offline_and_a_missing_one_is_one_line(tmp_path):
    directory = hf_dir(tmp_path)
    cache = cache_with(tmp_path, directory)
    path, _ = scene_png(tmp_path, size=(48, 64))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}  # offline is the command's own doing
    code, out, err = run("caption", path, "--model", "tiny-org/tiny-ved", "--out", tmp_path / "out", env=env)
    assert code == 0, err
    assert err == ""  # transformers' own loading bars and warnings are silenced
    assert (ah.load(tmp_path / "out" / "scene.safetensors").meta["grid"].rows, ) == (4, )
    code, out, err = run("caption", path, "--model", "tiny-org/absent", "--out", tmp_path / "out2", env=env)
    assert code == 1
    line = one_line(err)
    assert "Unknown model 'tiny-org/absent'" in line and "not in the local Hugging Face cache" in line
    assert str(cache) in line and "huggingface-cli download tiny-org/absent" in line
    assert not (tmp_path / "out2").exists()


def test_ctrl_c_while_loading_a_model_is_one_line_exit_130_and_nothing_written(tmp_path):
    import signal
    import time

    directory = llava_dir(tmp_path)
    path, _ = scene_png(tmp_path, size=(48, 64))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "attnhook", "caption", str(path), str(path), "--model",
                             str(directory), "--max-new-tokens", "20", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # until transformers is being imported
        try:
            if "tokenizers" in open(maps).read():
                break
        except OSError:
            pass
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by Ctrl-C" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    Image.open(path).verify()
