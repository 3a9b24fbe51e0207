"""The trace file: one safetensors file, rows as tensors, everything else as JSON metadata.

Specified in docs/trace-format.md. Tensors are named `{site}/{sequence}/{position}`, each one row
`(batch, heads, keys)`. The metadata key `attnhook` holds a JSON object (see `_validate`). Plain tensors and
JSON only: nothing in a trace file can run code when it is loaded.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import RecordingError, TraceFileError

FORMAT = "attnhook-trace"
VERSION = 1
READS = (1,)  # format versions this attnhook can load
_META_KEY = "attnhook"


def save(trace, path) -> Path:
    """Write `trace` to `path` atomically (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save as to_bytes

    from . import __version__

    path = Path(path)
    tensors, sequences = {}, []
    for seq in range(trace.sequences):
        rows, batches = {}, set()
        for site in trace.sites:
            try:
                held = trace.rows(site, seq)
            except RecordingError:
                continue  # the site has no rows in this sequence
            listed: dict = {"positions": [], "keys": []}
            for position, call, row in held:
                suffix = f"/{call}" if call else ""
                tensors[f"{site.name}/{seq}/{position}{suffix}"] = row.contiguous()
                listed["positions"].append(position)
                listed["keys"].append(row.shape[-1])
                listed.setdefault("_calls", []).append(call)
                listed.setdefault("_batch", []).append(row.shape[0])
                batches.add(row.shape[0])
            calls, batch = listed.pop("_calls"), listed.pop("_batch")
            if any(calls):
                listed["calls"] = calls
            if len(set(batch)) > 1:
                listed["batch"] = batch
            rows[site.name] = listed
        sequences.append({"batch": max(batches), "rows": rows})
    header = {
        "format": FORMAT,
        "format_version": VERSION,
        "attnhook_version": __version__,
        "cut": bool(trace.cut),
        **({"notes": list(trace.notes)} if trace.notes else {}),
        "sites": [asdict(s) for s in trace.sites],
        "sequences": sequences,
        "meta": _to_json(trace.meta, "trace.meta"),
    }
    data = to_bytes(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise TraceFileError(f"{path}: cannot write the trace ({e.strerror or e}). Choose a writable path.") from None
    return path


def load(path):
    """Read a trace file written by `Trace.save()`.

    Raises `TraceFileError` naming the file and what is wrong: missing, truncated, not safetensors, not an
    attnhook trace, an unknown format version, missing tensors, or shapes that contradict the metadata.

    Example:
        >>> import torch, tempfile, os, attnhook as ah
        >>> layer = torch.nn.TransformerDecoderLayer(16, 2, batch_first=True).eval()
        >>> with ah.record(layer, sites="cross") as trace:
        ...     _ = layer(torch.randn(1, 4, 16), torch.randn(1, 6, 16))
        >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> _ = trace.save(path)
        >>> again = ah.load(path)
        >>> again.weights("multihead_attn").shape, torch.equal(again.weights("multihead_attn"),
        ...                                                    trace.weights("multihead_attn"))
        (torch.Size([1, 4, 2, 6]), True)
    """
    from .trace import Site, Trace

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TraceFileError(f"{path}: cannot read the trace file ({e.strerror or e}).") from None
    header = _header(path, data)
    tensors = _tensors(path, data)
    sites = [Site(**s) for s in header["sites"]]
    try:
        meta = _from_json(header["meta"])
    except TraceFileError as e:
        raise TraceFileError(f"{path}: {e} The file is damaged or was edited.") from None
    trace = Trace(meta)
    trace.cut = header["cut"]
    trace.notes = list(header.get("notes", []))
    for site in sites:
        trace.add_site(site)
    for seq, sequence in enumerate(header["sequences"]):
        if seq:
            trace.new_sequence()
        for name, rows in sequence["rows"].items():
            heads = trace.site(name).heads
            calls = rows.get("calls", [0] * len(rows["positions"]))
            batch = rows.get("batch", [sequence["batch"]] * len(rows["positions"]))
            for position, keys, call, b in zip(rows["positions"], rows["keys"], calls, batch):
                tname = f"{name}/{seq}/{position}" + (f"/{call}" if call else "")
                t = tensors.pop(tname, None)
                if t is None:
                    raise TraceFileError(f"{path}: tensor {tname!r} listed in the metadata is missing. The file is "
                                         "damaged; record and save the trace again.")
                want = (b, heads, keys)
                if tuple(t.shape) != want or not t.is_floating_point():
                    raise TraceFileError(
                        f"{path}: tensor {tname!r} is {t.dtype} {tuple(t.shape)}, but the metadata says a floating "
                        f"row of shape (batch, heads, keys) = {want}. The file is damaged or was edited.")
                trace.add_rows(name, position, t[:, :, None], call=call)
    if tensors:
        raise TraceFileError(f"{path}: tensors not listed in the metadata: {sorted(tensors)[:5]}. The file was "
                             "edited or damaged.")
    return trace


def _header(path: Path, data: bytes) -> dict:
    if len(data) < 8:
        raise TraceFileError(f"{path}: {len(data)} bytes, too short for a safetensors file (8-byte header length "
                             "first). The file is truncated or not a trace.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TraceFileError(f"{path}: the header says {n} bytes of JSON but the file has {len(data) - 8} after "
                             "the length. The file is truncated or not a safetensors file.")
    try:
        raw = json.loads(data[8: 8 + n].decode("utf-8"))
        meta = raw["__metadata__"][_META_KEY]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        raise TraceFileError(f"{path}: the header is not valid safetensors JSON. The file is damaged or not a "
                             "safetensors file.") from None
    except KeyError:
        raise TraceFileError(f"{path}: a safetensors file, but not an attnhook trace (no '{_META_KEY}' entry in "
                             "its metadata). Save traces with trace.save(path).") from None
    try:
        header = json.loads(meta)
    except (TypeError, json.JSONDecodeError):
        raise TraceFileError(f"{path}: the attnhook metadata is not valid JSON. The file is damaged.") from None
    _validate(path, header)
    return header


def _validate(path: Path, h) -> None:
    def need(ok, what):
        if not ok:
            raise TraceFileError(f"{path}: bad trace metadata: {what}. The file is damaged or was edited.")

    need(isinstance(h, dict) and h.get("format") == FORMAT, f"'format' must be {FORMAT!r}")
    version = h.get("format_version")
    need(type(version) is int, "'format_version' must be an integer")
    if version not in READS:
        newer = "a newer attnhook: upgrade attnhook to read it" if version > VERSION else "no released attnhook"
        raise TraceFileError(f"{path}: trace format version {version}, but this attnhook ({READS}) reads versions "
                             f"{', '.join(map(str, READS))}; it was written by {newer}.")
    need(isinstance(h.get("cut"), bool), "'cut' must be true or false")
    notes = h.get("notes", [])
    need(isinstance(notes, list) and all(isinstance(n, str) for n in notes), "'notes' must be a list of strings")
    need(isinstance(h.get("meta"), dict), "'meta' must be an object")
    sites = h.get("sites")
    need(isinstance(sites, list), "'sites' must be a list")
    names = set()
    for s in sites:
        need(isinstance(s, dict) and set(s) == {"name", "family", "kind", "layer", "heads", "cls"},
             "each site needs exactly name, family, kind, layer, heads, cls")
        need(all(isinstance(s[k], str) for k in ("name", "family", "kind", "cls")), "site names must be strings")
        need(s["kind"] in ("self", "cross"), f"site kind must be 'self' or 'cross', not {s['kind']!r}")
        need(s["layer"] is None or type(s["layer"]) is int, "site layer must be an integer or null")
        need(type(s["heads"]) is int and s["heads"] > 0, "site heads must be a positive integer")
        need(s["name"] not in names, f"site {s['name']!r} listed twice")
        names.add(s["name"])
    sequences = h.get("sequences")
    need(isinstance(sequences, list), "'sequences' must be a list")
    for seq in sequences:
        need(isinstance(seq, dict) and type(seq.get("batch")) is int and seq["batch"] > 0,
             "each sequence needs a positive integer 'batch'")
        need(isinstance(seq.get("rows"), dict) and seq["rows"], "each sequence needs non-empty 'rows'")
        for name, rows in seq["rows"].items():
            need(name in names, f"rows for unknown site {name!r}")
            need(isinstance(rows, dict) and isinstance(rows.get("positions"), list)
                 and isinstance(rows.get("keys"), list) and len(rows["positions"]) == len(rows["keys"]) > 0,
                 f"rows of {name!r} need equally long non-empty 'positions' and 'keys'")
            p, k = rows["positions"], rows["keys"]
            need(set(rows) <= {"positions", "keys", "calls", "batch"}, f"rows of {name!r} have unknown fields")
            calls = rows.get("calls", [0] * len(p))
            need(isinstance(calls, list) and len(calls) == len(p) and all(type(c) is int and 0 <= c < 4096
                                                                          for c in calls),
                 f"calls of {name!r} must be one small non-negative integer per row")
            batch = rows.get("batch", [seq["batch"]] * len(p))
            need(isinstance(batch, list) and len(batch) == len(p) and all(type(b) is int and 0 < b <= seq["batch"]
                                                                          for b in batch),
                 f"batch of {name!r} must be one positive integer per row, at most the sequence's batch")
            pairs = list(zip(p, calls))
            need(all(type(x) is int and x >= 0 for x in p) and pairs == sorted(set(pairs)),
                 f"positions of {name!r} must be increasing non-negative integers")
            need(all(type(x) is int and x > 0 for x in k), f"key lengths of {name!r} must be positive integers")


def _tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    try:
        return from_bytes(data)
    except SafetensorError as e:
        raise TraceFileError(f"{path}: the tensor data cannot be read ({e}). The file is truncated or damaged.") from None


def _to_json(value, where: str):
    from .grid import Grid

    if isinstance(value, Grid):
        return {"__grid__": value.to_json()}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TraceFileError(f"{where} has a non-string key; trace metadata must be JSON (string keys).")
        return {k: _to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor):
        return _to_json(value.tolist(), where)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TraceFileError(f"{where} is a {type(value).__name__}; trace metadata must be JSON: strings, numbers, "
                         "lists, dicts (and a Grid). Convert it before saving.")


def _from_json(value):
    from .errors import AttnHookError
    from .grid import Grid

    if isinstance(value, dict):
        if set(value) == {"__grid__"} and isinstance(value["__grid__"], dict):
            g = value["__grid__"]
            try:
                return Grid.from_json(g)
            except AttnHookError as e:
                raise TraceFileError(f"the grid in the trace metadata is not valid ({e}).") from None
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
