"""The trace file: one safetensors file, rows as tensors, everything else as JSON metadata.

Specified in docs/trace-format.md. Tensors are named `{site}/{sequence}/{position}`, each one row
`(batch, heads, keys)`. The metadata key `attnhook` holds a JSON object (see `_validate`; its `meta` is checked
by `_tracemeta`). Plain tensors and JSON only: nothing in a trace file can run code when it is loaded.

`load()` is untrusted-input parsing in three steps, each bounded by what the previous one checked: read and
check the header (its length against the file size and `MAX_HEADER`, its nesting against `MAX_DEPTH`) ->
validate the attnhook metadata, every documented meta key, and the tensor table (names, dtypes, shapes,
offsets) against it -> read the tensor bytes and build the Trace (`_build`, the only place rows enter it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import struct
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import _tracemeta
from ._types import PathLike
from .errors import RecordingError, TraceFileError

if TYPE_CHECKING:
    from .trace import Trace

FORMAT = "attnhook-trace"
VERSION = 1
READS = (1,)  # format versions this attnhook can load
_META_KEY = "attnhook"
#: Largest JSON header read, in bytes (safetensors' own limit).
MAX_HEADER = 100_000_000
#: Deepest JSON nesting accepted (a trace needs 6; free meta values get the rest).
MAX_DEPTH = 64
_MAX_POSITION = (1 << 31) - 1
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4,
          "U32": 4, "I64": 8, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8",
                "U8": "uint8", "BOOL": "bool", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
                "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def save(trace, path) -> Path:
    """Write `trace` to `path` atomically (a temporary file in the same folder, then a rename).

    The file gets the permissions any new file gets (`0o666` less the umask), or keeps those of the file it
    replaces. `trace.meta` is checked as `load()` checks it, so a trace that saves also loads.
    """
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
                tensors[_tensor_name(site.name, seq, position, call)] = row.contiguous()
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
        "sites": [{k: v for k, v in asdict(s).items() if k != "at"} for s in trace.sites],  # `at`: recording only
        "sequences": sequences,
        "meta": _to_json(trace.meta, "trace.meta"),
    }
    try:
        _tracemeta.check(json.loads(json.dumps(header["meta"])), _limits(header))
    except _tracemeta.Bad as e:
        raise TraceFileError(f"Cannot save {path}: trace.{e.field} {e.what}. docs/trace-format.md says what "
                             "each meta key holds; fix it, or store it under another key.") from None
    data = to_bytes(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, data)
    except OSError as e:
        raise TraceFileError(f"{path}: cannot write the trace ({e.strerror or e}). Choose a writable path.") from None
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    """A new file beside `path` (mode 0o666 less the umask, as open() gives; the old file's mode if one is
    replaced), filled and flushed, then renamed over `path`."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: PathLike) -> Trace:
    """Read a trace file written by `Trace.save()`.

    The file is untrusted input: its header is read and checked before any tensor (a file that is not a
    trace costs at most its first 8 bytes and `MAX_HEADER`), every documented meta key's type and range is
    checked, each site holds one floating dtype, and anything else raises `TraceFileError` naming the file
    and the field: missing, truncated, not safetensors, not an attnhook trace, an unknown format version,
    JSON nested deeper than `MAX_DEPTH`, missing or unlisted tensors, or shapes that contradict the metadata.

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
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise TraceFileError(f"{path}: {what}, not a trace file. Pass the .safetensors file trace.save() wrote.")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            table, header, n = _read_header(path, f, size)                  # 1. the header, bounded
            _validate(path, header)                                          # 2. attnhook metadata,
            meta = _check_meta(path, header)                                 #    documented meta keys,
            _check_table(path, header, table, size - 8 - n)                  #    the tensor table
            f.seek(0)
            data = f.read(size + 1)                                          # 3. the tensors
    except OSError as e:
        raise TraceFileError(f"{path}: cannot read the trace file ({e.strerror or e}).") from None
    if len(data) != size:
        raise TraceFileError(f"{path}: the file changed while it was read ({size} bytes, then {len(data)}). "
                             "Load it again once it is written.")
    return _build(header, meta, _tensors(path, data))


def _build(header: dict, meta: dict, tensors: dict[str, torch.Tensor]):
    """A Trace from validated parts: every tensor named in `header` exists with the shape it says."""
    from .trace import Site, Trace

    trace = Trace(meta)
    trace.cut = header["cut"]
    trace.notes = list(header.get("notes", []))
    for s in header["sites"]:
        trace.add_site(Site(**s))
    for seq, sequence in enumerate(header["sequences"]):
        if seq:
            trace.new_sequence()
        for name, rows in sequence["rows"].items():
            for position, call in _row_names(rows):
                trace.add_rows(name, position, tensors[_tensor_name(name, seq, position, call)][:, :, None],
                               call=call)
    return trace


def _row_names(rows: dict) -> list[tuple[int, int]]:
    """(position, call) of each listed row; `calls` is there only for sites called several times per step."""
    return list(zip(rows["positions"], rows.get("calls", [0] * len(rows["positions"]))))


def _tensor_name(site: str, seq: int, position: int, call: int) -> str:
    return f"{site}/{seq}/{position}" + (f"/{call}" if call else "")


class _Duplicate(ValueError):
    pass


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _depth(text: str) -> int:
    """Deepest nesting of JSON `text`, without parsing it (strings dropped, brackets counted)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    a = np.frombuffer(brackets, dtype=np.uint8)
    return int(np.cumsum(np.where((a == 91) | (a == 123), 1, -1)).max())


def _json(path: Path, text: str, what: str, damaged: str):
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise TraceFileError(f"{path}: {what} is nested {depth} levels deep; a trace needs a handful and at most "
                             f"{MAX_DEPTH} are read. {damaged}")
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except _Duplicate as e:
        raise TraceFileError(f"{path}: {what} names the key {str(e)[:60]!r} twice. {damaged}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise TraceFileError(f"{path}: {what} is not valid JSON ({str(e)[:80]}). {damaged}") from None


def _read_header(path: Path, f, size: int) -> tuple[dict, dict, int]:
    """(safetensors header, attnhook header, header length), reading only the first 8 + length bytes."""
    if size < 8:
        raise TraceFileError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length "
                             "first). The file is truncated or not a trace.")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise TraceFileError(f"{path}: the header says {n} bytes of JSON but the file has {size - 8} after "
                             "the length. The file is truncated or not a safetensors file.")
    if n > MAX_HEADER:
        raise TraceFileError(f"{path}: the header says {n} bytes of JSON, more than the {MAX_HEADER} a "
                             "safetensors reader accepts. The file is not a trace.")
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceFileError(f"{path}: the header is not valid safetensors JSON (not UTF-8). The file is damaged "
                             "or not a safetensors file.") from None
    table = _json(path, text, "the safetensors header", "The file is damaged or not a safetensors file.")
    if not isinstance(table, dict):
        raise TraceFileError(f"{path}: the header is not valid safetensors JSON (not an object). The file is "
                             "damaged or not a safetensors file.")
    meta = table.get("__metadata__")
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise TraceFileError(f"{path}: a safetensors file, but not an attnhook trace (no '{_META_KEY}' entry in "
                             "its metadata). Save traces with trace.save(path).")
    if not isinstance(meta[_META_KEY], str):
        raise TraceFileError(f"{path}: the attnhook metadata is not a JSON string. The file is damaged.")
    header = _json(path, meta[_META_KEY], "the attnhook metadata", "The file is damaged or was edited.")
    return table, header, n


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
    need(isinstance(h.get("attnhook_version"), str), "'attnhook_version' must be a string")
    need(isinstance(h.get("cut"), bool), "'cut' must be true or false")
    notes = h.get("notes", [])
    need(isinstance(notes, list) and all(isinstance(n, str) for n in notes), "'notes' must be a list of strings")
    need(isinstance(h.get("meta"), dict), "'meta' must be an object")
    sites = h.get("sites")
    need(isinstance(sites, list), "'sites' must be a list")
    names = set()
    for i, s in enumerate(sites):
        need(isinstance(s, dict) and set(s) == {"name", "family", "kind", "layer", "heads", "cls"},
             f"sites[{i}] needs exactly name, family, kind, layer, heads, cls")
        for k in ("name", "family", "kind", "cls"):
            need(isinstance(s[k], str), f"sites[{i}].{k} must be a string")
            try:
                s[k].encode("utf-8")
            except UnicodeEncodeError:
                need(False, f"sites[{i}].{k} is not valid Unicode")
        need(s["kind"] in ("self", "cross"), f"site kind must be 'self' or 'cross', not {s['kind']!r}")
        need(s["layer"] is None or (type(s["layer"]) is int and 0 <= s["layer"] <= _MAX_POSITION),
             f"sites[{i}].layer must be null or an integer in [0, {_MAX_POSITION}]")
        need(type(s["heads"]) is int and s["heads"] > 0, f"sites[{i}].heads must be a positive integer")
        need(s["name"] not in names, f"site {s['name']!r} listed twice")
        names.add(s["name"])
    sequences = h.get("sequences")
    need(isinstance(sequences, list), "'sequences' must be a list")
    for i, seq in enumerate(sequences):
        need(isinstance(seq, dict) and set(seq) == {"batch", "rows"} and type(seq["batch"]) is int
             and seq["batch"] > 0, f"sequences[{i}] needs exactly a positive integer 'batch' and 'rows'")
        need(isinstance(seq.get("rows"), dict) and seq["rows"], f"sequences[{i}] needs non-empty 'rows'")
        for name, rows in seq["rows"].items():
            need(name in names, f"rows for unknown site {name!r}")
            need(isinstance(rows, dict) and {"positions", "keys"} <= set(rows) <= {"positions", "keys", "calls", "batch"}
                 and isinstance(rows["positions"], list)
                 and isinstance(rows["keys"], list) and len(rows["positions"]) == len(rows["keys"]) > 0,
                 f"rows of {name!r} need equally long non-empty 'positions' and 'keys'")
            p, k = rows["positions"], rows["keys"]
            calls = rows.get("calls", [0] * len(p))
            need(isinstance(calls, list) and len(calls) == len(p) and all(type(c) is int and 0 <= c < 4096
                                                                          for c in calls),
                 f"calls of {name!r} must be one integer in [0, 4096) per row")
            batch = rows.get("batch", [seq["batch"]] * len(p))
            need(isinstance(batch, list) and len(batch) == len(p) and all(type(b) is int and 0 < b <= seq["batch"]
                                                                          for b in batch),
                 f"batch of {name!r} must be one positive integer per row, at most the sequence's batch")
            pairs = list(zip(p, calls))
            need(all(type(x) is int and 0 <= x <= _MAX_POSITION for x in p) and pairs == sorted(set(pairs)),
                 f"positions of {name!r} must be increasing integers in [0, {_MAX_POSITION}] (per call)")
            need(all(type(x) is int and x > 0 for x in k), f"key lengths of {name!r} must be positive integers")


def _limits(header: dict) -> _tracemeta.Limits:
    kinds = {s["name"]: s["kind"] for s in header["sites"]}
    widest = widest_self = 0
    for seq in header["sequences"]:
        for name, rows in seq["rows"].items():
            top = max(rows["keys"], default=0)
            widest = max(widest, top)
            if kinds.get(name) == "self":
                widest_self = max(widest_self, top)
    return _tracemeta.Limits(max_keys=widest, max_self_keys=widest_self)


def _check_meta(path: Path, header: dict) -> dict:
    try:
        return _tracemeta.check(header["meta"], _limits(header))
    except _tracemeta.Bad as e:
        raise TraceFileError(f"{path}: bad trace metadata: {e.field} {e.what}. The file is damaged or was "
                             "edited.") from None


def _check_table(path: Path, header: dict, table: dict, data_bytes: int) -> None:
    """The safetensors tensor table against the attnhook metadata, before a tensor byte is read."""
    def bad(what):
        raise TraceFileError(f"{path}: {what}. The file is damaged or was edited.")

    spans = []
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
                and isinstance(entry["shape"], list) and all(type(d) is int and d >= 0 for d in entry["shape"])
                and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
                and all(type(o) is int and o >= 0 for o in entry["data_offsets"])):
            bad(f"the safetensors entry of tensor {name[:80]!r} is not {{dtype, shape, data_offsets}}")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _SIZES:
            bad(f"tensor {name[:80]!r} has the unknown dtype {str(entry['dtype'])[:20]!r}")
        begin, end = entry["data_offsets"]
        if end - begin != _SIZES[entry["dtype"]] * int(np.prod(entry["shape"], dtype=object)):
            bad(f"tensor {name[:80]!r} spans {end - begin} bytes, not the {entry['dtype']} {entry['shape']} it says")
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            bad(f"the tensor data has a gap or an overlap at byte {covered}")
        covered = end
    if covered != data_bytes:
        raise TraceFileError(f"{path}: the tensor table covers {covered} bytes of data but the file holds "
                             f"{data_bytes}. The file is truncated or damaged.")
    listed: set = set()
    dtypes: dict = {}
    for seq, sequence in enumerate(header["sequences"]):
        for name, rows in sequence["rows"].items():
            heads = next(s["heads"] for s in header["sites"] if s["name"] == name)
            batch = rows.get("batch", [sequence["batch"]] * len(rows["positions"]))
            for (position, call), keys, b in zip(_row_names(rows), rows["keys"], batch):
                tname = _tensor_name(name, seq, position, call)
                listed.add(tname)
                entry = table.get(tname)
                if entry is None:
                    raise TraceFileError(f"{path}: tensor {tname!r} listed in the metadata is missing. The file "
                                         "is damaged; record and save the trace again.")
                want = (b, heads, keys)
                if tuple(entry["shape"]) != want or entry["dtype"] not in _FLOATS:
                    bad(f"tensor {tname!r} is {_TORCH_NAMES[entry['dtype']]} {tuple(entry['shape'])}, but the "
                        f"metadata says a floating row of shape (batch, heads, keys) = {want}")
                first = dtypes.setdefault(name, (entry["dtype"], tname))
                if first[0] != entry["dtype"]:
                    bad(f"site {name!r} mixes dtypes: {first[1]!r} is {_TORCH_NAMES[first[0]]}, {tname!r} is "
                        f"{_TORCH_NAMES[entry['dtype']]}; a site is recorded in one dtype")
    extra = sorted(set(table) - listed - {"__metadata__"})
    if extra:
        raise TraceFileError(f"{path}: tensors not listed in the metadata: {[e[:80] for e in extra[:5]]}. The "
                             "file was edited or damaged.")


def _tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    try:
        return from_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TraceFileError(f"{path}: the tensor data cannot be read ({e}). The file is truncated or damaged.") from None


def _to_json(value, where: str):
    from .grid import Grid, Regions, Views

    if isinstance(value, Grid):
        return {"__grid__": value.to_json()}
    if isinstance(value, Regions):
        return {"__regions__": value.to_json()}
    if isinstance(value, Views):
        return {"__views__": value.to_json()}
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
                         "lists, dicts (and a Grid, Regions or Views layout). Convert it before saving.")
