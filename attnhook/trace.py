"""`Site` (one attention module) and `Trace` (the rows recorded at each site, per sequence and query position)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ._types import PathLike
from .errors import RecordingError, SelectionError


@dataclass(frozen=True)
class Site:
    """One attention module of a model.

    Attributes:
        name: qualified module name, as in `model.named_modules()`.
        family: name of the `AttentionSpec` that matched it.
        kind: `"self"`, `"cross"`, or `"auto"` when only the actual call can tell (resolved in a trace).
        layer: the index of its layer in the name (`decoder.layers.3.cross_attn` -> 3), or None: the last
            integer that differs between the sites named alike (T5's `decoder.block.3.layer.1.EncDecAttention`
            -> 3: `layer.1` is the same in every block), else the last integer.
        heads: number of heads, when the spec can read it from the module.
        cls: the module's class name.
    """

    name: str
    family: str
    kind: str
    layer: int | None = None
    heads: int | None = None
    cls: str = ""
    at: int | None = field(default=None, repr=False, compare=False)  # which part of the name is `layer`

    @property
    def stack(self) -> str:
        """The name with its layer index starred (`decoder.layers.*.cross_attn`): negative layer indices
        count from the end of each stack."""
        parts = self.name.split(".")
        if self.layer is None:
            return self.name
        at = self.at if self.at is not None else max(i for i, p in enumerate(parts) if p.isdigit())
        return ".".join(parts[:at] + ["*"] + parts[at + 1:])

    def __str__(self) -> str:
        where = "" if self.layer is None else f" layer {self.layer}"
        heads = "" if self.heads is None else f", {self.heads} heads"
        return f"{self.name} ({self.family}, {self.kind}{where}{heads})"


def layer_of(name: str) -> int | None:
    digits = [p for p in name.split(".") if p.isdigit()]
    return int(digits[-1]) if digits else None


def layer_parts(named: list[tuple[str, str]]) -> dict[str, int | None]:
    """For each `(name, class name)`, which of the name's dotted parts is the layer index: among the sites of
    the same class and pattern (integers starred), the last integer part that differs between them; else (one
    site, or none differs) the last integer part; None without one."""
    groups: dict[tuple, list[list[str]]] = {}
    for name, cls in named:
        parts = name.split(".")
        groups.setdefault((cls, *("*" if p.isdigit() else p for p in parts)), []).append(parts)
    out: dict[str, int | None] = {}
    for (_, *pattern), members in groups.items():
        digits = [i for i, p in enumerate(pattern) if p == "*"]
        varying = [i for i in digits if len({m[i] for m in members}) > 1]
        at = max(varying) if varying else max(digits) if digits else None
        for m in members:
            out[".".join(m)] = at
    return out


def select(sites: list[Site], which="all", layers=None) -> list[Site]:
    """Pick sites by kind (`"all"`, `"self"`, `"cross"`), name glob, `Site`, or a list of those; then by
    layer index (negative counts from the end of each stack). Sites of kind `"auto"` pass a kind selector
    and are dropped later if their actual call says otherwise."""
    chosen = _by_which(sites, which)
    if layers is not None:
        chosen = _by_layer(chosen, layers)
    return chosen


def _by_which(sites: list[Site], which) -> list[Site]:
    items = which if isinstance(which, (list, tuple, set)) else [which]
    names = [s.name for s in sites]
    picked: dict[str, Site] = {}
    for item in items:
        if isinstance(item, Site):
            item = item.name
        if not isinstance(item, str):
            raise SelectionError(
                f"A site selector must be 'all', 'self', 'cross', a name glob or a Site, got {item!r}."
            )
        if item == "all":
            hits = sites
        elif item in ("self", "cross"):
            hits = [s for s in sites if s.kind in (item, "auto")]
        else:
            hits = [s for s in sites if fnmatch.fnmatchcase(s.name, item)]
        if not hits:
            raise SelectionError(
                f"Site selector {item!r} matched nothing. Available sites: "
                + "; ".join(str(s) for s in sites)
                + ". Select by kind ('self', 'cross', 'all'), by one of these names, or by a glob such as "
                f"'*{names[0].rsplit('.', 1)[-1]}'."
            )
        picked.update((s.name, s) for s in hits)
    return [s for s in sites if s.name in picked]


def _by_layer(sites: list[Site], layers) -> list[Site]:
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted or not all(isinstance(i, int) for i in wanted):
        raise SelectionError(f"layers must be an int or a list of ints (negative from the end), got {layers!r}.")
    stacks: dict[str, list[int]] = {}
    for s in sites:
        if s.layer is not None:
            stacks.setdefault(s.stack, []).append(s.layer)
    chosen = []
    for s in sites:
        if s.layer is None:
            continue
        present = sorted(set(stacks[s.stack]))
        resolved = set()
        for i in wanted:
            if i < 0 and -len(present) <= i:
                resolved.add(present[i])
            elif i >= 0:
                resolved.add(i)
        if s.layer in resolved:
            chosen.append(s)
    if not chosen:
        have = sorted({s.layer for s in sites if s.layer is not None})
        raise SelectionError(
            f"layers={layers!r} matched none of the selected sites; their layer indices are {have or 'none'}. "
            "Use one of those, or -1 for the last layer of each stack."
        )
    return chosen


@dataclass
class _Chunk:
    """Consecutive query positions of one site, one call index, one run: `rows` is (batch, heads, n, keys)."""

    start: int
    call: int
    rows: torch.Tensor
    # the same rows where they were computed, while rows are being copied off a GPU: what the recorder compares
    # a recomputed row with, without waiting for the copy (kept for the site's last chunk only)
    near: torch.Tensor | None = None


class Trace:
    """Attention rows recorded inside `attnhook.record()`.

    One row per query position, per site, per sequence (one decoding run). Rows are `(batch, heads, keys)`;
    `weights(site)` stacks them into `(batch, steps, heads, keys)`. A site called several times per step
    (one cross-attention module per encoder level) has a `call` axis: `(batch, steps, calls, heads, keys)`.

    Example:
        >>> import torch, attnhook as ah
        >>> layer = torch.nn.TransformerDecoderLayer(16, 2, batch_first=True).eval()
        >>> with ah.record(layer, sites="cross") as trace:
        ...     _ = layer(torch.randn(1, 5, 16), torch.randn(1, 9, 16))   # teacher-forced: 5 queries
        >>> site = trace.sites[0]
        >>> site.name, site.kind
        ('multihead_attn', 'cross')
        >>> trace.weights(site).shape                                       # (batch, steps, heads, keys)
        torch.Size([1, 5, 2, 9])
    """

    def __init__(self, meta: dict | None = None):
        self._sites: dict[str, Site] = {}
        self._chunks: dict[tuple[str, int], list[_Chunk]] = {}
        self._seq = 0  # index of the sequence rows go to
        self._epoch = 0  # bumped at every sequence boundary, even one with no rows before it
        self.meta: dict = dict(meta or {})
        self.cut = False
        self.notes: list[str] = []  # what recording decided on weak evidence, or could not decide
        self._inflight: list = []  # CUDA events of rows still being copied to pinned host memory
        self._near: dict[str, _Chunk] = {}  # site -> its last chunk, while that keeps its rows on the device

    # --- reading -------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """The recorded sites, in the order the model first called them."""
        return list(self._sites.values())

    def site(self, which: Site | str) -> Site:
        """A recorded site by `Site` or name."""
        name = which.name if isinstance(which, Site) else which
        if name not in self._sites:
            names = ", ".join(self._sites) or "none"
            raise RecordingError(
                f"No site named {name!r} in this trace. Recorded sites: {names}. "
                "Pass one of those names, or one of trace.sites."
            )
        return self._sites[name]

    def _settle(self) -> None:
        """Wait for rows still being copied from a GPU (non-blocking copies): before anything reads them."""
        if self._inflight:
            for event in self._inflight:
                event.synchronize()
            self._inflight.clear()

    def _release(self) -> None:
        """Drop the rows kept on the device for comparisons (`held(near=True)`): the recording or the sequence
        ended."""
        for chunk in self._near.values():
            chunk.near = None
        self._near.clear()

    def _chunks_of(self, which: Site | str, sequence: int) -> list[_Chunk]:
        self._settle()
        site = self.site(which)
        if type(sequence) is not int or not 0 <= sequence < max(self.sequences, 1):
            raise RecordingError(
                f"sequence must be an int in [0, {self.sequences}), got {sequence!r}: this trace holds "
                f"{self.sequences} sequence(s)."
            )
        chunks = self._chunks.get((site.name, sequence))
        if not chunks:
            raise RecordingError(
                f"Site {site.name!r} has no rows in sequence {sequence}. It was not called during that "
                "run, or its inputs equalled those of the previous run and it was taken for a recomputation: "
                "call trace.new_sequence() between runs to keep them apart."
            )
        return chunks

    def rows(self, site: Site | str, sequence: int = 0) -> list[tuple[int, int, torch.Tensor]]:
        """Every row of one site in one sequence as `(position, call, row)`, `row` `(batch, heads, keys)`,
        ordered by position then call. The batch may change from step to step (beam search in your own loop)."""
        out = [(c.start + i, c.call, c.rows[:, :, i]) for c in self._chunks_of(site, sequence)
               for i in range(c.rows.shape[2])]
        return sorted(out, key=lambda r: (r[0], r[1]))

    def calls(self, site: Site | str, sequence: int = 0) -> int:
        """How many times the site was called per step (1 for most sites)."""
        return 1 + max(c.call for c in self._chunks_of(site, sequence))

    def batch_sizes(self, site: Site | str, sequence: int = 0) -> list[int]:
        """The batch of each step of `weights(site, sequence)`: constant, except for beams in a user loop."""
        return [row.shape[0] for _, call, row in self.rows(site, sequence) if call == 0]

    def weights(self, site: Site | str, sequence: int = 0, call: int | None = None) -> torch.Tensor:
        """Attention rows of one site in one sequence, `(batch, steps, heads, keys)`.

        A step is one query position (row i is what query position i attended to, the row that produced
        token i + 1). Rows whose key length grows (self-attention) are right-padded with zeros to a common
        length; `key_lengths()` gives each row's valid length. A site called several times per step gives
        `(batch, steps, calls, heads, keys)`, or one call's rows with `call=k`.
        """
        rows = self.rows(site, sequence)
        calls = 1 + max(r[1] for r in rows)
        if call is not None and (type(call) is not int or not 0 <= call < calls):
            raise RecordingError(f"call must be an int in [0, {calls}) for site {self.site(site).name!r}, got "
                                 f"{call!r}.")
        batches = sorted({r[2].shape[0] for r in rows})
        if len(batches) > 1:
            raise RecordingError(
                f"Site {self.site(site).name!r} holds beam hypotheses in sequence {sequence}: the batch changes "
                f"from step to step ({', '.join(map(str, self.batch_sizes(site, sequence)))}), so its rows do "
                "not stack into (batch, steps, heads, keys). Pick each returned sequence's rows with "
                "attnhook.beams.follow(trace, parents) and the back-pointers your loop keeps, or replay the "
                "returned sequence teacher-forced inside record() (docs/recording.md, 'Beams').")
        width = max(r[2].shape[-1] for r in rows)
        picked = [call] if call is not None else range(calls)
        stacks = []
        for k in picked:
            these = [torch.nn.functional.pad(r[2], (0, width - r[2].shape[-1])) for r in rows if r[1] == k]
            stacks.append(torch.stack(these, dim=1))  # (batch, steps, heads, keys)
        if len(stacks) == 1:
            return stacks[0]
        if len({s.shape[1] for s in stacks}) != 1:
            raise RecordingError(f"Site {self.site(site).name!r} was not called the same number of times at every "
                                 "step; read one call with weights(site, call=k).")
        return torch.stack(stacks, dim=2)

    def key_lengths(self, site: Site | str, sequence: int = 0) -> torch.Tensor:
        """Valid key length of each row of `weights(site, sequence)`, `(steps,)`."""
        return torch.tensor([row.shape[-1] for _, call, row in self.rows(site, sequence) if call == 0])

    def positions(self, site: Site | str, sequence: int = 0) -> torch.Tensor:
        """Query position of each row of `weights(site, sequence)`, `(steps,)`."""
        return torch.tensor([p for p, call, _ in self.rows(site, sequence) if call == 0], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded rows."""
        return sum(c.rows.nbytes for chunks in self._chunks.values() for c in chunks)

    @property
    def sequences(self) -> int:
        """Number of sequences (decoding runs) that hold rows."""
        return self._seq + 1 if self._has_rows(self._seq) else self._seq

    def new_sequence(self) -> None:
        """Start a new sequence: rows recorded from now on belong to the next decoding run.

        Recording finds most boundaries by itself; call this between runs where it cannot, e.g. a recurrent
        decoder whose spec gives nothing to compare, or the same input run twice.
        """
        self._epoch += 1
        if self._has_rows(self._seq):
            self._seq += 1
            self._release()  # nothing compares with the rows of an ended sequence

    def _has_rows(self, seq: int) -> bool:
        return any(k[1] == seq and c for k, c in self._chunks.items())

    def save(self, path: PathLike) -> Path:
        """Write the trace to one safetensors file (atomically); read it back with `attnhook.load(path)`.

        Rows are tensors named `{site}/{sequence}/{position}`; sites, sequences and `trace.meta` (tokens, words,
        grid, image size, ...; JSON only) go into the metadata. Format: docs/trace-format.md.

        Example:
            >>> import torch, tempfile, os, attnhook as ah
            >>> layer = torch.nn.TransformerDecoderLayer(16, 2, batch_first=True).eval()
            >>> with ah.record(layer, sites="cross") as trace:
            ...     _ = layer(torch.randn(2, 3, 16), torch.randn(2, 6, 16))
            >>> trace.meta["words"] = [[["a", "red", "circle"], ["a", "blue", "square"]]]  # per sequence, per row
            >>> path = trace.save(os.path.join(tempfile.mkdtemp(), "run.safetensors"))
            >>> ah.load(path).meta["words"][0][1]
            ['a', 'blue', 'square']
        """
        from .tracefile import save

        return save(self, path)

    def _repr_html_(self) -> str:
        """A notebook shows the sites, and the viewer when `meta` holds words, grid and image size."""
        from .html import trace_html

        return trace_html(self)

    def __repr__(self) -> str:
        return (f"Trace({len(self._sites)} sites, {self.sequences} sequence(s), "
                f"{self.nbytes / 2**20:.2f} MiB{', cut' if self.cut else ''})")

    # --- writing: the only way rows get in (recording, trace files, beams) ---------------------------
    def add_site(self, site: Site) -> None:
        """Declare a site (its kind resolved); rows for it can then be added."""
        self._sites[site.name] = site

    def add_rows(self, site: Site | str, start: int, rows: torch.Tensor, call: int = 0,
                 ready: torch.cuda.Event | None = None) -> None:
        """Append rows `(batch, heads, n, keys)` for query positions `start .. start + n - 1` of the current
        sequence (`call`: which call of the step, for a site called several times per step; `ready`: a CUDA
        event recorded after a non-blocking copy into `rows`, waited for before the rows are read)."""
        name = self.site(site).name
        if not (isinstance(rows, torch.Tensor) and rows.dim() == 4):
            raise RecordingError(f"add_rows() takes rows of shape (batch, heads, n, keys), got "
                                 f"{getattr(rows, 'shape', type(rows).__name__)}.")
        self._append(name, int(start), int(call), rows, ready)

    def _append(self, name: str, start: int, call: int, rows: torch.Tensor,
                ready: torch.cuda.Event | None = None, near: torch.Tensor | None = None) -> None:
        """`add_rows` for the recorder, whose site, ints and rows are already checked (`near`: the same rows
        where they were computed, see `held`)."""
        key = (name, self._seq)
        chunks = self._chunks.get(key)
        if chunks is None:
            chunks = self._chunks[key] = []
        chunk = _Chunk(start, call, rows, near)
        chunks.append(chunk)
        last = self._near.pop(name, None)
        if last is not None:
            last.near = None  # only the last chunk of a site keeps its rows on the device
        if near is not None:
            self._near[name] = chunk
        if ready is not None:
            self._inflight.append(ready)

    @property
    def epoch(self) -> int:
        """Counts sequence boundaries (`new_sequence()` calls), including ones with no rows before them."""
        return self._epoch

    def has_site(self, name: str) -> bool:
        """Whether a site of that name has been added."""
        return name in self._sites

    def held(self, site: Site | str, position: int, call: int = 0, near: bool = False) -> torch.Tensor | None:
        """The row held at `position` of the current sequence, `(batch, heads, keys)`, or None. `near=True`: from
        the device the row was computed on when the trace still has it there (the site's last chunk, while its
        copy off a GPU may be under way), so that comparing it with a new row waits for nothing."""
        name = site.name if isinstance(site, Site) else site
        if name not in self._sites:
            return None
        for c in reversed(self._chunks.get((name, self._seq), [])):
            if c.call == call and c.start <= position < c.start + c.rows.shape[2]:
                if near and c.near is not None:
                    return c.near[:, :, position - c.start]
                self._settle()
                return c.rows[:, :, position - c.start]
        return None

    def note(self, message: str) -> None:
        """Keep a line saying what recording decided on weak evidence (saved with the trace)."""
        if message not in self.notes:
            self.notes.append(message)

    def _resolve_kind(self, name: str, kind: str) -> None:
        self._sites[name] = replace(self._sites[name], kind=kind)
