"""Trace files: round trips, the pinned format, and refusing bad files."""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import attnhook as ah
from attnhook.errors import AttnHookWarning, RecordingError, TraceFileError
from attnhook.grid import Grid
from attnhook.tracefile import VERSION
from captioners import BOS, TransformerCaptioner, images
from golden import GOLDEN, golden_trace
from test_record import assert_clean

ROOT = Path(__file__).parents[1]


def assert_same(a: ah.Trace, b: ah.Trace):
    assert a.sites == b.sites and a.sequences == b.sequences and a.cut == b.cut and a.meta == b.meta
    for seq in range(a.sequences):
        for site in a.sites:
            for f in ("weights", "positions", "key_lengths"):
                x, y = getattr(a, f)(site, seq), getattr(b, f)(site, seq)
                assert x.dtype == y.dtype and torch.equal(x, y), (site.name, seq, f)


def recorded() -> ah.Trace:
    model = TransformerCaptioner()
    with ah.record(model, dtype=torch.float16) as trace:  # self rows grow, cross rows don't; two runs
        t1, _ = model.greedy(images(seed=1), steps=4)
        t2, _ = model.greedy(images(seed=2), steps=3)
    trace.meta.update(tokens=[t1.tolist(), t2.tolist()], image_size=[32, 48], grid=Grid(4, 6, rule="given"))
    return trace


def test_round_trip_keeps_every_row_site_sequence_and_meta(tmp_path):
    trace = recorded()
    assert trace.sequences == 2 and len(trace.sites) == 4
    path = trace.save(tmp_path / "sub" / "run.safetensors")
    again = ah.load(path)
    assert_same(trace, again)
    assert again.meta["grid"].rows == 4 and again.meta["tokens"][1][0][0] == BOS
    assert [p.name for p in path.parent.iterdir()] == ["run.safetensors"]  # no temporary file left


def test_the_golden_file_pins_the_format(tmp_path):
    """A change in what save() writes fails here: change the format on purpose, bump VERSION, keep reading
    the old version, and regenerate with `python tests/golden.py`."""
    golden = ah.load(GOLDEN)
    assert_same(golden, golden_trace())
    written = GOLDEN.read_bytes()
    fresh = golden_trace().save(tmp_path / "fresh.safetensors").read_bytes()
    a, b = _header_of(written), _header_of(fresh)
    a.pop("attnhook_version"), b.pop("attnhook_version")
    assert a == b
    old, new = st_load(written), st_load(fresh)
    assert old.keys() == new.keys()
    assert all(old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]) for k in old)
    assert VERSION == 1


def test_the_metadata_follows_the_published_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "trace-format.schema.json").read_text())
    jsonschema.validate(_header_of(GOLDEN.read_bytes()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**_header_of(GOLDEN.read_bytes()), "format_version": 2}, schema)


def _header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["attnhook"])


def _rewrite(tmp_path, edit_header=None, edit_tensors=None, name="bad.safetensors") -> Path:
    data = GOLDEN.read_bytes()
    header, tensors = _header_of(data), dict(st_load(data))
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    path = tmp_path / name
    path.write_bytes(st_save(tensors, metadata={"attnhook": json.dumps(header)}))
    return path


def _set(d, key, value):
    d[key] = value


@pytest.mark.parametrize("case,damage,expected", [
    ("missing", None, "cannot read"),
    ("empty", lambda p: p.write_bytes(b""), "too short"),
    ("truncated-header", lambda p: p.write_bytes(GOLDEN.read_bytes()[:100]), "truncated"),
    ("truncated-data", lambda p: p.write_bytes(GOLDEN.read_bytes()[:-10]), "truncated or damaged"),
    ("garbage", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "truncated or not"),
    ("not-json", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "header is not valid JSON"),
    ("plain-safetensors", lambda p: p.write_bytes(st_save({"x": torch.ones(2)})), "not an attnhook trace"),
])
def test_unreadable_files_are_refused_with_the_file_named(tmp_path, case, damage, expected):
    path = tmp_path / f"{case}.safetensors"
    if damage:
        damage(path)
    with pytest.raises(TraceFileError) as err:
        ah.load(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("edit,expected", [
    (lambda h: _set(h, "format_version", 2), "version 2.*newer attnhook"),
    (lambda h: _set(h, "format_version", 0), "version 0"),
    (lambda h: _set(h, "format", "other"), "'format' must be"),
    (lambda h: h["sites"][0].update(heads=3), r"metadata says .* = \(1, 3, 1\)"),
    (lambda h: h["sequences"][0]["rows"]["decoder.layers.1.cross_attn"].update(keys=[7, 7, 8]), r"\(1, 2, 8\)"),
    (lambda h: h["sequences"][0]["rows"]["decoder.layers.1.cross_attn"].update(positions=[0, 1, 3]),
     "is missing"),
    (lambda h: h["sites"].pop(), "unknown site"),
    (lambda h: h["sites"][0].update(kind="sideways"), "kind must be"),
    (lambda h: _set(h["meta"], "grid", {"__grid__": {"rows": 2}}), "grid"),
])
def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path, edit, expected):
    with pytest.raises(TraceFileError, match=expected) as err:
        ah.load(_rewrite(tmp_path, edit_header=edit))
    assert "bad.safetensors" in str(err.value)


def test_regions_and_views_layouts_round_trip_and_map_alike(tmp_path):
    from attnhook.grid import Regions, Views

    for layout in (Regions([(0, 0, 10, 8), (5, 4, 48, 32), (0, 16, 20, 32), (30, 0, 48, 10), (1, 1, 2, 2),
                            (40, 20, 47.5, 31.25)], prefix=1, prefix_kind="global feature", rule="given: boxes"),
                   Views([Grid(1, 3), Grid(1, 3, box=(0, -7, 48, 40.5), row_sep=0)], prefix=1, rule="two views")):
        trace = golden_trace()
        trace.meta.update(grid=layout, nested={"again": [layout]})
        loaded = ah.load(trace.save(tmp_path / "layout.safetensors"))
        assert loaded.meta["grid"] == layout and type(loaded.meta["grid"]) is type(layout)
        assert loaded.meta["nested"]["again"][0] == layout
        kw = {"image_size": (32, 48)} if isinstance(layout, Views) else {}
        np.testing.assert_array_equal(ah.attention_maps(trace, layout, **kw),
                                      ah.attention_maps(loaded, loaded.meta["grid"], **kw))


_REGIONS = {"boxes": [[0, 0, 4, 4]] * 6, "prefix": 1, "suffix": 0, "rule": "given", "prefix_kind": "",
            "suffix_kind": ""}
_VIEWS = {"views": [{"rows": 1, "cols": 3}, {"rows": 1, "cols": 3, "box": [0, 0, 24, 32]}], "prefix": 1,
          "suffix": 0, "rule": "given"}


def test_saved_regions_and_views_follow_the_published_json_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from attnhook.grid import Regions, Views

    schema = json.loads((ROOT / "docs" / "trace-format.schema.json").read_text())
    for layout in (Regions([(0, 0, 4, 4)] * 6, prefix=1), Views([Grid(1, 3), Grid(1, 3, box=(0, 0, 24, 32))], 1),
                   Grid(2, 3, prefix=1, row_sep=0), Grid(1, 2, prefix=1, suffix=2, row_sep=1)):
        trace = golden_trace()
        trace.meta["grid"] = layout
        jsonschema.validate(_header_of(trace.save(tmp_path / "s.safetensors").read_bytes()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**_header_of(GOLDEN.read_bytes()), "meta": {"grid": {"__views__": {"prefix": 1}}}},
                            schema)


@pytest.mark.parametrize("layout,expected", [
    ({"__regions__": dict(_REGIONS, boxes=[[0, 0, 4, 4]] * 8)}, "1 to 7 boxes"),
    ({"__regions__": dict(_REGIONS, boxes=[[0, 0, 4, 4]] * 5 + [[0, 0, 1e300, 4]])}, r"boxes\[5\] must be"),
    ({"__regions__": dict(_REGIONS, boxes=[[0, 0, 4, 4]] * 5 + [[4, 4, 0, 0]])}, "x0 < x1"),
    ({"__regions__": dict(_REGIONS, boxes=[[0, 0, 4, 4]] * 5 + [[0, 0, "4", 4]])}, r"boxes\[5\]"),
    ({"__regions__": dict(_REGIONS, boxes="all")}, "list of 1 to 7 boxes"),
    ({"__regions__": dict(_REGIONS, prefix=2)}, "lays out 8 keys"),
    ({"__regions__": dict(_REGIONS, prefix=1.0)}, "prefix must be an integer"),
    ({"__regions__": dict(_REGIONS, weights=[1])}, "unknown fields"),
    ({"__regions__": {"prefix": 1}}, "needs 'boxes'"),
    ({"__regions__": dict(_REGIONS, rule=["x"])}, "rule must be a string"),
    ({"__views__": dict(_VIEWS, views=[{"rows": 1, "cols": 1}] * 1025)}, "1 to 1024"),
    ({"__views__": dict(_VIEWS, views=[])}, "1 to 1024"),
    ({"__views__": dict(_VIEWS, views=[{"rows": 1, "cols": 3}, {"rows": 1, "cols": 3, "box": [0, 0, -1, 5]}])},
     r"views\[1\].__grid__.box"),
    ({"__views__": dict(_VIEWS, views=[{"rows": 1, "cols": 3}, {"rows": 9, "cols": 3}])}, "views\\[1\\]"),
    ({"__views__": dict(_VIEWS, views=[{"rows": 1, "cols": 3}, {"rows": 1, "cols": 3, "colour": 1}])},
     "unknown fields"),
    ({"__views__": dict(_VIEWS, suffix=5)}, "lays out 12 keys"),
    ({"__views__": dict(_VIEWS, order="any")}, "unknown fields"),
    ({"__views__": [1, 2]}, "must be an object"),
    ({"__views__": _VIEWS, "__grid__": {"rows": 2, "cols": 3}}, "stored layout"),
])
def test_hostile_stored_layouts_are_refused_with_the_field_named(tmp_path, layout, expected):
    with pytest.raises(TraceFileError, match=expected) as err:
        ah.load(_rewrite(tmp_path, edit_header=lambda h: _set(h["meta"], "grid", layout)))
    assert "bad.safetensors" in str(err.value) and "meta['grid']" in str(err.value)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    with pytest.raises(TraceFileError, match="decoder.layers.1.self_attn/0/2.*missing"):
        ah.load(_rewrite(tmp_path, edit_tensors=lambda t: t.pop("decoder.layers.1.self_attn/0/2")))
    with pytest.raises(TraceFileError, match="not listed"):
        ah.load(_rewrite(tmp_path, edit_tensors=lambda t: t.update(extra=torch.ones(1))))
    with pytest.raises(TraceFileError, match="int64"):
        ah.load(_rewrite(tmp_path, edit_tensors=lambda t: t.update(
            {"decoder.layers.1.cross_attn/1/0": torch.ones(1, 2, 7, dtype=torch.long)})))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bytes_give_a_trace_or_a_trace_file_error(tmp_path, data):
    raw = bytearray(GOLDEN.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        # mostly hit the JSON header, where structure lives; sometimes the length or the tensor bytes
        where = data.draw(st.one_of(st.integers(8, 8 + n - 1), st.integers(0, len(raw) - 1)))
        raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    try:
        trace = ah.load(path)
    except TraceFileError:
        return
    for seq in range(trace.sequences):  # a file that loads is a usable trace
        for site in trace.sites:
            trace.weights(site, seq)


def test_saving_is_atomic(tmp_path):
    path = golden_trace().save(tmp_path / "run.safetensors")
    before = path.read_bytes()
    broken = golden_trace()
    broken.meta["model"] = object()  # not JSON: refused before anything is written
    with pytest.raises(TraceFileError, match=r"trace.meta\['model'\] is a object"):
        broken.save(path)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(TraceFileError, match="cannot write"):
        golden_trace().save(tmp_path / "dir.safetensors")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "run.safetensors"]


def test_no_pickle_anywhere_in_the_package():
    pattern = re.compile(r"\bpickle\b|torch\.load\(|allow_pickle\s*=\s*True|\bdill\b|joblib")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "attnhook").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


# --- a memory budget for recording ----------------------------------------------------------------------
def test_max_bytes_stops_recording_with_a_warning_and_the_trace_says_it_was_cut(tmp_path):
    model = TransformerCaptioner()
    tokens0, _ = model.greedy(images(), steps=8)
    with ah.record(model, sites="cross") as full:
        model.greedy(images(), steps=8)
    budget = full.nbytes // 3
    with pytest.warns(AttnHookWarning, match="max_bytes"):
        with ah.record(model, sites="cross", max_bytes=budget) as trace:
            tokens, _ = model.greedy(images(), steps=8)
    assert torch.equal(tokens, tokens0)  # the model runs on
    assert trace.cut and 0 < trace.nbytes <= budget
    site = trace.sites[0]
    kept = trace.weights(site).shape[1]
    assert 0 < kept < 8
    assert torch.equal(trace.weights(site), full.weights(site)[:, :kept])
    again = ah.load(trace.save(tmp_path / "cut.safetensors"))
    assert again.cut and "cut" in repr(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ah.record(model, sites="cross", max_bytes=full.nbytes) as whole:
            model.greedy(images(), steps=8)
    assert not whole.cut


def test_max_bytes_can_raise_instead(tmp_path):
    model = TransformerCaptioner()
    with pytest.raises(RecordingError, match="max_bytes=100"):
        with ah.record(model, sites="cross", max_bytes=100, on_limit="raise") as trace:
            model.greedy(images(), steps=8)
    assert trace.cut
    assert_clean(model)
    with pytest.raises(RecordingError, match="on_limit"):
        ah.record(model, max_bytes=10, on_limit="ignore")


def test_a_loaded_trace_renders_exactly_like_the_fresh_one(tmp_path):
    """Identical map arrays, identical overlay and figure pixels (invariant: the renderer knows nothing of
    where a trace came from)."""
    import numpy as np

    from attnhook.render import overlay, plot_words

    model = TransformerCaptioner()
    x = images(1, (32, 48), seed=7)
    with ah.record(model, sites="cross") as fresh:
        tokens, _ = model.greedy(x, steps=4)
    grid = Grid(4, 6, rule="given")
    fresh.meta.update(grid=grid, words=[[[str(t) for t in tokens[0, 1:].tolist()]]])
    loaded = ah.load(fresh.save(tmp_path / "run.safetensors"))
    a = ah.attention_maps(fresh, fresh.meta["grid"])
    b = ah.attention_maps(loaded, loaded.meta["grid"])
    assert a.shape == (1, 4, 4, 6) and np.array_equal(a, b)
    image = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(overlay(image, a[0, 2], grid=grid)),
                          np.asarray(overlay(image, b[0, 2], grid=loaded.meta["grid"])))

    def pixels(trace):
        fig = plot_words(image, trace.meta["words"][0][0], ah.attention_maps(trace, trace.meta["grid"])[0],
                         grid=trace.meta["grid"])
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())

    assert np.array_equal(pixels(fresh), pixels(loaded))


# --- hostile files: bounded reading, every documented key checked (issue 12, point 4) -------------------
def test_a_huge_file_that_is_not_a_trace_is_refused_without_being_read(tmp_path):
    """3 GiB (sparse): refused from its first 8 bytes, or its bounded header, with a few KiB allocated."""
    import tracemalloc

    cases = {
        "claims-2GiB-header": struct.pack("<Q", 2 * 2**30),   # within the file, beyond MAX_HEADER
        "claims-more-than-file": struct.pack("<Q", 2**62),
        "zeros": b"",                                          # length 0: an empty header, not JSON
        "text": struct.pack("<Q", 64) + b"[" * 64,
    }
    for name, start in cases.items():
        path = tmp_path / f"{name}.bin"
        with open(path, "wb") as f:
            f.write(start)
            f.truncate(3 * 2**30)
        tracemalloc.start()
        try:
            with pytest.raises(TraceFileError) as err:
                ah.load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(path) in str(err.value), name
        assert peak < 2**20, (name, peak)


def test_a_folder_or_a_device_is_refused_without_opening_it(tmp_path):
    with pytest.raises(TraceFileError, match="a folder"):
        ah.load(tmp_path)
    if Path("/dev/zero").exists():
        with pytest.raises(TraceFileError, match="not a regular file"):
            ah.load("/dev/zero")


def _deep(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def test_deeply_nested_json_is_refused_without_recursion(tmp_path):
    text = json.dumps(_header_of(GOLDEN.read_bytes())).replace('"model": "GoldenCaptioner"',
                                                                  f'"model": "x", "free": {_deep(200_000)}')
    path = tmp_path / "deep.safetensors"
    path.write_bytes(st_save(dict(st_load(GOLDEN.read_bytes())), metadata={"attnhook": text}))
    with pytest.raises(TraceFileError, match="attnhook metadata is nested 200002 levels deep"):
        ah.load(path)
    outer = f'{{"__metadata__": {{"attnhook": "{{}}"}}, "x": {_deep(100_000)}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(outer)) + outer)
    with pytest.raises(TraceFileError, match="safetensors header is nested"):
        ah.load(path)
    # free meta values may nest, within the bound
    fine = json.dumps(_header_of(GOLDEN.read_bytes())).replace('"model": "GoldenCaptioner"',
                                                                f'"model": "x", "free": {_deep(40)}')
    path.write_bytes(st_save(dict(st_load(GOLDEN.read_bytes())), metadata={"attnhook": fine}))
    assert ah.load(path).meta["free"][0][0][0] is not None


def _grid_of(h):
    return h["meta"]["grid"]["__grid__"]


# Edits of a real trace's documented meta keys (the 12 probes and more): each one is refused by load()
# naming the file and the field, before anything is allocated for it.
@pytest.mark.parametrize("edit,field", [
    (lambda h: _grid_of(h).update(box=["a", "b", "c", "d"]), r"meta\['grid'\].__grid__.box"),
    (lambda h: _grid_of(h).update(box=[0, 0, 1e12, 1e12]), r"meta\['grid'\].__grid__.box .*within"),
    (lambda h: _grid_of(h).update(box=[0, 0, float("nan"), 1]), r"__grid__.box"),
    (lambda h: _grid_of(h).update(box=[5, 0, 1, 1]), r"__grid__.box needs x0 < x1"),
    (lambda h: _grid_of(h).update(rows=10**9, cols=10**9), r"__grid__.rows must be an integer in \[1, 7\]"),
    (lambda h: _grid_of(h).update(rows=3, cols=3), r"__grid__ lays out 10 keys, but no row .* more than 7"),
    (lambda h: _grid_of(h).update(prefix=-1), r"__grid__.prefix"),
    (lambda h: _grid_of(h).update(tiles=[4, 4]), r"__grid__.tiles"),
    (lambda h: _grid_of(h).update(rule=["x"]), r"__grid__.rule must be a string"),
    (lambda h: _grid_of(h).update(extra=1), r"__grid__ has unknown fields \['extra'\]"),
    (lambda h: _set(h["meta"], "grid", [2, 3]), r"meta\['grid'\] must be a stored layout"),
    (lambda h: _set(h["meta"], "image_size", [100000, 100000]), r"meta\['image_size'\] must be \[height, width\]"),
    (lambda h: _set(h["meta"], "image_size", [60000, 60000]), r"meta\['image_size'\] names 60000 x 60000 pixels"),
    (lambda h: _set(h["meta"], "image_size", [0, 5]), r"meta\['image_size'\]"),
    (lambda h: _set(h["meta"], "image_size", ["32", "48"]), r"meta\['image_size'\]"),
    (lambda h: _set(h["meta"], "image_size", [32.5, 48]), r"meta\['image_size'\]"),
    (lambda h: _set(h["meta"], "words", "a red circle"), r"meta\['words'\] must be a list \(per sequence\)"),
    (lambda h: _set(h["meta"], "words", [["a", "red"]]), r"meta\['words'\]\[0\]\[0\] must be a list of words"),
    (lambda h: _set(h["meta"], "words", [[["a", 7]]]), r"meta\['words'\]\[0\]\[0\]\[1\] must be a string"),
    (lambda h: _set(h["meta"], "words", [[["x" * 5000]]]), r"meta\['words'\]\[0\]\[0\]\[0\] must be at most 1000"),
    (lambda h: _set(h["meta"], "words", [[["\ud800"]]]), r"meta\['words'\]\[0\]\[0\]\[0\] is not valid Unicode"),
    (lambda h: _set(h["meta"], "tokens", [[["1"]]]), r"meta\['tokens'\]\[0\]\[0\]\[0\] must be an integer"),
    (lambda h: _set(h["meta"], "image_keys", [[0, 1], [2]]), r"meta\['image_keys'\] lists \[1, 2\] image keys"),
    (lambda h: _set(h["meta"], "image_keys", [[0, 99]]), r"meta\['image_keys'\]\[0\]\[1\] must be an integer in \[0, 2\]"),
    (lambda h: _set(h["meta"], "image_keys", [[3, 1]]), r"meta\['image_keys'\]\[0\]"),
    (lambda h: _set(h["meta"], "image_keys_spatial", "no"), r"meta\['image_keys_spatial'\] must be true or false"),
    (lambda h: _set(h["meta"], "image_keys_source", "guess"), r"meta\['image_keys_source'\] must be one of"),
    (lambda h: _set(h["meta"], "image_grid", [[[2]]]), r"meta\['image_grid'\]\[0\]\[0\] must be \[rows, cols\]"),
    (lambda h: _set(h["meta"], "keys", [0, 5, 0]), r"meta\['keys'\] must be null or \[start, stop, step\]"),
    (lambda h: _set(h["meta"], "lengths", [-1]), r"meta\['lengths'\]\[0\]"),
    (lambda h: _set(h["meta"], "model", {"name": "x"}), r"meta\['model'\] must be a string"),
    (lambda h: _set(h["meta"], "transformers", {"sites": {"a": 1}}), r"meta\['transformers'\]\['sites'\]\['a'\]"),
    (lambda h: _set(h["meta"], "transformers", {"merged": "a"}), r"meta\['transformers'\]\['merged'\] must be an object"),
    (lambda h: _set(h["meta"], "transformers", {"merged": {"a": {"encoder": 3, "at": "middle"}}}),
     r"meta\['transformers'\]\['merged'\]\['a'\] must be"),
    (lambda h: _set(h["meta"], "transformers", {"sinks": "a"}), r"meta\['transformers'\]\['sinks'\] must be a list"),
    (lambda h: _set(h["meta"], "nested", {"__grid__": {"rows": "2", "cols": 3}}), r"meta\['nested'\].__grid__.rows"),
    (lambda h: h["sites"][0].update(layer=2**70), r"sites\[0\].layer"),
    (lambda h: h["sequences"][0]["rows"]["decoder.layers.1.cross_attn"].update(positions=[0, 1, 2**40]),
     r"positions of 'decoder.layers.1.cross_attn' must be increasing integers in \[0, 2147483647\]"),
    (lambda h: h["sequences"][0].update(extra=1), r"sequences\[0\] needs exactly"),
    (lambda h: _set(h, "attnhook_version", 1), "'attnhook_version' must be a string"),
])
def test_every_documented_meta_key_is_checked_and_named(tmp_path, edit, field):
    path = _rewrite(tmp_path, edit_header=edit)
    with pytest.raises(TraceFileError, match=field) as err:
        ah.load(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_one_dtype_per_site(tmp_path):
    mixed = _rewrite(tmp_path, edit_tensors=lambda t: t.update(
        {"decoder.layers.1.cross_attn/1/0": t["decoder.layers.1.cross_attn/1/0"].float()}))
    with pytest.raises(TraceFileError, match=r"site 'decoder.layers.1.cross_attn' mixes dtypes: "
                                             r"'decoder.layers.1.cross_attn/0/0' is float16, .*/1/0' is float32"):
        ah.load(mixed)
    # sites may differ from each other (the golden file has a float32 and a float16 site)
    golden = ah.load(GOLDEN)
    assert {golden.weights(s).dtype for s in golden.sites} == {torch.float32, torch.float16}


def test_the_tensor_table_is_checked_before_any_tensor_is_read(tmp_path):
    data = GOLDEN.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8:8 + n])

    def write(edit):
        t = json.loads(json.dumps(table))
        edit(t)
        raw = json.dumps(t).encode()
        path = tmp_path / "table.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        return path

    first = "decoder.layers.1.self_attn/0/0"
    for edit, message in [
        (lambda t: t[first].update(dtype={"x": 1}), "unknown dtype"),
        (lambda t: t[first].update(dtype="Q4"), "unknown dtype 'Q4'"),
        (lambda t: t[first].update(shape=[1, 2, 10**12]), "spans 8 bytes, not the F32"),
        (lambda t: t[first].update(data_offsets=[0, 2**60]), "spans"),
        (lambda t: t[first].update(data_offsets=[8, 16], shape=[1, 2, 1]), "gap or an overlap"),
        (lambda t: t[first].update(shape="x"), "is not {dtype, shape, data_offsets}"),
    ]:
        with pytest.raises(TraceFileError, match=re.escape(message)):
            ah.load(write(edit))
    raw = data[8:8 + n].decode()
    dup = raw.rstrip()[:-1] + ', "__metadata__": {"attnhook": "{}"}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + data[8 + n:])
    with pytest.raises(TraceFileError, match="names the key '__metadata__' twice"):
        ah.load(path)


def test_save_refuses_the_meta_that_load_would_refuse(tmp_path):
    trace = golden_trace()
    trace.meta["image_size"] = (10**6, 10**6)
    with pytest.raises(TraceFileError, match=r"Cannot save .*trace.meta\['image_size'\] must be \[height, width\]"):
        trace.save(tmp_path / "x.safetensors")
    trace.meta["image_size"] = [32, 48]
    trace.meta["words"] = [["a", "red", "circle"]]  # missing the batch level
    with pytest.raises(TraceFileError, match=r"trace.meta\['words'\]\[0\]\[0\] must be a list of words"):
        trace.save(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_saved_trace_gets_the_permissions_of_any_new_file(tmp_path):
    import os
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = golden_trace().save(tmp_path / "run.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    os.chmod(path, 0o600)
    golden_trace().save(path)  # replacing a file keeps its mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_structured_fuzzing_of_real_traces_gives_renders_or_attnhook_errors(tmp_path):
    """CI budget: fuzz_traces.CI_CASES cases (seed 0) through load() and the whole `attnhook render`; the long
    run is `python tests/fuzz_traces.py --cases N` (docs/trace-format.md gives its count)."""
    from fuzz_traces import CI_CASES, fuzz

    outcomes, failures = fuzz(CI_CASES, 0, tmp_path)
    assert failures == []
    assert sum(outcomes.values()) == CI_CASES and outcomes["refused"] > 0 and outcomes["rendered"] > 0


def test_a_call_axis_and_beam_batches_survive_a_round_trip(tmp_path):
    """Sites called several times per step (the call axis) and beams whose batch changes per step."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from loops import MeshedCaptioner
    from captioners import images as pictures

    model = MeshedCaptioner()
    with ah.record(model, sites="cross") as trace:
        model.greedy(pictures(2, seed=1), 3)
    beams = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    memory = torch.randn(1, 5, 8)
    with ah.record(beams) as beam_trace:
        for rows in (1, 3, 2):
            beams(torch.randn(rows, 1, 8), memory.expand(rows, -1, -1), memory.expand(rows, -1, -1))
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "trace-format.schema.json").read_text())
    for original in (trace, beam_trace):
        path = original.save(tmp_path / "t.safetensors")
        jsonschema.validate(_header_of(path.read_bytes()), schema)
        again = ah.load(path)
        for site in original.sites:
            assert again.calls(site) == original.calls(site)
            assert again.batch_sizes(site) == original.batch_sizes(site)
            for (p, c, r), (p2, c2, r2) in zip(original.rows(site), again.rows(site)):
                assert (p, c) == (p2, c2) and torch.equal(r, r2)
    assert trace.calls("layers.1.enc_att") == 3 and beam_trace.batch_sizes(beam_trace.sites[0]) == [1, 3, 2]
