"""`Site` (one attention module) and `Trace` (the rows recorded at each site, per sequence and query position)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch

from .errors import RecordingError, SelectionError


@dataclass(frozen=True)
class Site:
    """One attention module of a model.

    Attributes:
        name: qualified module name, as in `model.named_modules()`.
        family: name of the `AttentionSpec` that matched it.
        kind: `"self"`, `"cross"`, or `"auto"` when only the actual call can tell (resolved in a trace).
        layer: the last integer in the name (`decoder.layers.3.cross_attn` -> 3), or None.
        heads: number of heads, when the spec can read it from the module.
        cls: the module's class name.
    """

    name: str
    family: str
    kind: str
    layer: int | None = None
    heads: int | None = None
    cls: str = ""

    @property
    def stack(self) -> str:
        """The name with its layer index starred (`decoder.layers.*.cross_attn`): negative layer indices
        count from the end of each stack."""
        parts = self.name.split(".")
        if self.layer is None:
            return self.name
        last = max(i for i, p in enumerate(parts) if p.isdigit())
        return ".".join(parts[:last] + ["*"] + parts[last + 1:])

    def __str__(self) -> str:
        where = "" if self.layer is None else f" layer {self.layer}"
        heads = "" if self.heads is None else f", {self.heads} heads"
        return f"{self.name} ({self.family}, {self.kind}{where}{heads})"


def layer_of(name: str) -> int | None:
    digits = [p for p in name.split(".") if p.isdigit()]
    return int(digits[-1]) if digits else None


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
class _Rows:
    """Rows of one site in one sequence: chunks of consecutive query positions."""

    starts: list[int] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)  # each (batch, heads, rows, keys)

    @property
    def end(self) -> int:
        return self.starts[-1] + self.chunks[-1].shape[2] if self.chunks else 0

    def last_row(self) -> torch.Tensor:
        return self.chunks[-1][:, :, -1]


class Trace:
    """Attention rows recorded inside `attnhook.record()`.

    One row per query position, per site, per sequence (one decoding run). Rows are `(batch, heads, keys)`;
    `weights(site)` stacks them into `(batch, steps, heads, keys)`.

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
        self._rows: dict[tuple[str, int], _Rows] = {}
        self._seq = 0  # index of the sequence rows go to
        self._epoch = 0  # bumped at every sequence boundary, even one with no rows before it
        self.meta: dict = dict(meta or {})
        self.cut = False

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

    def _rows_of(self, which: Site | str, sequence: int) -> _Rows:
        site = self.site(which)
        if not isinstance(sequence, int) or not 0 <= sequence < max(self.sequences, 1):
            raise RecordingError(
                f"sequence must be an int in [0, {self.sequences}), got {sequence!r}: this trace holds "
                f"{self.sequences} sequence(s)."
            )
        rows = self._rows.get((site.name, sequence))
        if rows is None or not rows.chunks:
            raise RecordingError(
                f"Site {site.name!r} has no rows in sequence {sequence}. It was not called during that "
                "run, or its inputs equalled those of the previous run and it was taken for a recomputation: "
                "call trace.new_sequence() between runs to keep them apart."
            )
        return rows

    def weights(self, site: Site | str, sequence: int = 0) -> torch.Tensor:
        """Attention rows of one site in one sequence, `(batch, steps, heads, keys)`.

        A step is one query position (row i is what query position i attended to, the row that produced
        token i + 1). Rows whose key length grows (self-attention) are right-padded with zeros to a common
        length; `key_lengths()` gives each row's valid length.
        """
        rows = self._rows_of(site, sequence)
        width = max(c.shape[-1] for c in rows.chunks)
        padded = [torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in rows.chunks]
        return torch.cat(padded, dim=2).permute(0, 2, 1, 3)

    def key_lengths(self, site: Site | str, sequence: int = 0) -> torch.Tensor:
        """Valid key length of each row of `weights(site, sequence)`, `(steps,)`."""
        rows = self._rows_of(site, sequence)
        return torch.cat([torch.full((c.shape[2],), c.shape[-1]) for c in rows.chunks])

    def positions(self, site: Site | str, sequence: int = 0) -> torch.Tensor:
        """Query position of each row of `weights(site, sequence)`, `(steps,)`."""
        rows = self._rows_of(site, sequence)
        return torch.cat([torch.arange(s, s + c.shape[2]) for s, c in zip(rows.starts, rows.chunks)])

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded rows."""
        return sum(c.nbytes for rows in self._rows.values() for c in rows.chunks)

    @property
    def sequences(self) -> int:
        """Number of sequences (decoding runs) that hold rows."""
        return self._seq + 1 if self._has_rows(self._seq) else self._seq

    def new_sequence(self) -> None:
        """Start a new sequence: rows recorded from now on belong to the next decoding run.

        Recording finds most boundaries by itself; call this between runs where it cannot, e.g. a recurrent
        decoder with no self-attention, or the same input run twice.
        """
        self._epoch += 1
        if self._has_rows(self._seq):
            self._seq += 1

    def _has_rows(self, seq: int) -> bool:
        return any(k[1] == seq and r.chunks for k, r in self._rows.items())

    def save(self, path):
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

    def __repr__(self) -> str:
        return (f"Trace({len(self._sites)} sites, {self.sequences} sequence(s), "
                f"{self.nbytes / 2**20:.2f} MiB{', cut' if self.cut else ''})")

    # --- filled by the recorder ----------------------------------------------------------------------
    def _add_site(self, site: Site) -> None:
        self._sites[site.name] = site

    def _resolve_kind(self, name: str, kind: str) -> None:
        self._sites[name] = replace(self._sites[name], kind=kind)

    _advance = new_sequence

    def _current(self, name: str) -> _Rows:
        return self._rows.setdefault((name, self._seq), _Rows())

    def _append(self, name: str, start: int, chunk: torch.Tensor) -> None:
        rows = self._current(name)
        rows.starts.append(start)
        rows.chunks.append(chunk)
