"""The position tracker: which query positions each attention call covers, and where one run ends.

A pure state machine. The recorder feeds it one `Event` per attention call (recorded or only watched) and one
`step()` per step boundary it is told about; for each recorded call it answers with a `Placement`: the run
the rows belong to, the absolute position of the first row to keep, which rows of the call to keep, and which
call of the step this is. It holds no tensors and imports no torch: the rows themselves stay with the
recorder, which the tracker asks, through `compare`, whether recomputed rows equal the ones already held.

Evidence, strongest first (docs/recording.md, "How positions are decided"):

1. what the user says: `trace.new_sequence()` (a new run) and `record(step=module)` (each call ends a step);
2. an explicit start: a cache position or cache length the spec reads from the call;
3. a fixed-slot template: the self-attention's key padding mask says how many slots hold real tokens;
4. step boundaries: a step event, else, for cross-attention, a self-attention call in between;
5. shapes last: keys before the queries (self-attention), a recomputed prefix, the next position.

Every rule that decides with weak evidence leaves a `Note` (the recorder warns once per code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

Verdict = Literal["same", "mapped", "different"]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs microseconds per call, and
class Event:             # nothing changes an Event once made
    """One attention call, as the tracker sees it.

    Attributes:
        site: the site's name.
        kind: `"self"` or `"cross"`.
        batch, queries, keys: the call's sizes.
        start: the absolute position of the first query when the call says it (a cache position), else None.
        valid: query slots holding real tokens, counted from the call's first slot, when the caller masks the
            rest (a fixed-slot template); None when every query is real.
        same_query: True when the queries are the very tensor of this site's previous call, False when they
            are not, None when the spec cannot tell.
        memory: one fingerprint per batch row of what the queries attend over (cross-attention), or None.
        recorded: False for a call that is only watched to follow the position (no rows to place).
        fresh: True when the call says it is the first of its run (its cache was empty), whatever rows of it
            are kept (a prompt kept to its last row starts where the last run may have ended).
    """

    site: str
    kind: str
    batch: int
    queries: int
    keys: int
    start: int | None = None
    valid: int | None = None
    same_query: bool | None = None
    memory: tuple | None = None
    recorded: bool = True
    fresh: bool = False


@dataclass(slots=True)  # not frozen, as Event
class Placement:
    """Where the rows of one recorded call go.

    Rows `lo:hi` of the call's query axis are positions `first .. first + hi - lo - 1` of the run; `call` is
    the index of this call within its step (0 unless the site is called several times per step); `keys` is
    the key width to keep (None: all). `new_run` is True when this call started a new run; `replay` asks the
    recorder to place again the calls it was told to hold (`Placement.hold`) since the last step.
    """

    first: int
    lo: int
    hi: int
    call: int = 0
    keys: int | None = None
    new_run: bool = False
    hold: bool = False

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo


@dataclass(frozen=True)
class Note:
    """Something decided on weak evidence, or evidence that contradicts itself: said once per `code`."""

    code: str
    site: str
    message: str


@dataclass
class _Clock:
    """The latest self-attention call of the run: the pass that cross-attention calls belong to."""

    batch: int
    queries: int
    start: int
    valid: int | None


@dataclass
class _Site:
    end: int = 0  # next position: positions [0, end) are covered in this run
    batch: int = -1
    queries: int = -1
    keys: int = -1
    extra: int = 0  # self-attention keys that are not positions (memory slots, registers)
    token: object = None  # what marked this site's last pass (a step count or a self-attention serial)
    calls: int = 0  # calls of the site in its current pass
    last: Placement | None = None
    memory: frozenset = frozenset()
    rows: bool = False  # holds rows in this run


@dataclass
class Tracker:
    """Positions and run boundaries for one `record()` block (see the module docstring)."""

    sites: dict[str, _Site] = field(default_factory=dict)
    clock: _Clock | None = None
    serial: int = 0  # self-attention calls seen in this run
    steps: int = 0  # explicit step events seen in this run
    stepping: bool = False  # step events are in use
    notes: list[Note] = field(default_factory=list)
    seen: set = field(default_factory=set)  # cross sites called at least once in the block
    leading: set = field(default_factory=set)  # cross sites that run before the self-attention of their pass
    # the current run began because a call's recomputed rows differed from the held ones (no other evidence)
    rows_broke: bool = False

    # --- what the recorder tells it ---------------------------------------------------------------------
    def step(self) -> None:
        """A step boundary: the next call of every site belongs to a new pass."""
        self.steps += 1
        self.stepping = True

    def new_run(self) -> None:
        """Forget every position: the next call starts a run from nothing (`trace.new_sequence()`)."""
        self.sites.clear()
        self.clock = None
        self.serial = 0
        self.steps = 0
        self.rows_broke = False

    def wants_memory(self, kind: str) -> bool:
        """Whether a fingerprint of the keys would decide anything: cross-attention with no self-attention
        seen in this run (nothing else marks where a run starts)."""
        return kind == "cross" and self.serial == 0

    # --- the decision ---------------------------------------------------------------------------------
    def place(self, e: Event, compare: Callable[[int, int], Verdict] | None = None) -> Placement:
        """Decide where the call `e` goes (a watched call gets an empty placement that may start a run).

        `compare(position, row)` says whether row `row` of this call equals the row held at `position`
        (`"same"`), equals one of the held rows of a differently ordered batch (`"mapped"`: beams reordered),
        or neither (`"different"`). It is asked only for a recorded call that recomputes held positions.
        """
        st = self.sites.setdefault(e.site, _Site())
        if e.kind == "cross" and e.site not in self.seen:
            self.seen.add(e.site)
            c = self.clock
            if c is None or (c.batch, c.queries) != (e.batch, e.queries):
                self.leading.add(e.site)  # no self-attention of its pass before it (Idefics' gated layers)
        again = self._same_pass(st, e)
        if again is not None:
            return again
        start, valid = self._start(st, e)
        why = self._breaks_run(st, e, start, valid, compare)
        new_run = bool(why)
        if new_run:
            self.new_run()
            self.rows_broke = why == "rows"
            st = self.sites.setdefault(e.site, _Site())
            start, valid = self._start(st, e)
        real = e.queries if valid is None else max(0, min(valid, e.queries))
        first = max(start, st.end)
        last = start + real
        if e.kind == "self":
            self.serial += 1
            self.clock = _Clock(e.batch, e.queries, start, valid)
        token = self.steps if self.stepping else self.serial
        st.token, st.calls = token, 0
        st.batch, st.queries, st.keys = e.batch, e.queries, e.keys
        if e.memory is not None:
            st.memory = frozenset(e.memory)
        st.end = max(st.end, last)
        if not e.recorded:
            st.last = None
            return Placement(first, 0, 0, 0, None, new_run, hold=False)
        keys = start + real if e.kind == "self" and valid is not None else None
        lo, hi = first - start, max(first, last) - start
        placement = Placement(first, lo, hi, 0, keys, new_run, hold=hi <= lo)
        st.last = placement
        st.rows = st.rows or not placement.empty
        return placement

    # --- rules ------------------------------------------------------------------------------------------
    def _same_pass(self, st: _Site, e: Event) -> Placement | None:
        """Another call of the site within the pass it was last called in: the call axis, not a position."""
        if st.last is None or (e.batch, e.queries, e.keys) != (st.batch, st.queries, st.keys):
            return None
        if self.stepping:  # the user or the library said where steps end: that alone decides
            same = st.token == self.steps
        elif e.kind == "cross" and self.serial > 0:  # no self-attention call since: same pass, unless the
            same = st.token == self.serial and e.same_query is not False  # queries are known to be new
        else:
            same = e.same_query is True
        if not same:
            return None
        st.calls += 1
        return Placement(st.last.first, st.last.lo, st.last.hi, st.calls, st.last.keys, False, st.last.hold)

    def _start(self, st: _Site, e: Event) -> tuple[int, int | None]:
        """The absolute position of the call's first query, and how many of its slots are real."""
        if e.start is not None:
            return e.start, e.valid
        if e.kind == "self":
            if st.end == 0:  # first call of the run: keys beyond the queries are not earlier positions
                st.extra = max(e.keys - e.queries, 0)
                if st.extra and e.recorded:
                    self._note("extra-keys", e.site,
                               f"site {e.site!r}: the first self-attention call of the run has {e.keys} keys for "
                               f"{e.queries} queries and no cache position; the {st.extra} extra keys are taken "
                               "as slots that are not tokens (memory slots, registers), and the queries as "
                               "positions from 0. If they are a cache of earlier tokens, record from the first "
                               "token on.", quiet=True)
            return max(e.keys - e.queries - st.extra, 0), e.valid
        c = self.clock
        if e.site not in self.leading and c is not None and (c.batch, c.queries) == (e.batch, e.queries):
            return c.start, c.valid  # the self-attention of the same pass said where it stands
        # no self-attention before this call in its pass: a recomputed prefix, else the next position
        return (0 if e.queries > st.end else st.end), None

    def _breaks_run(self, st: _Site, e: Event, start: int, valid: int | None,
                    compare: Callable[[int, int], Verdict] | None) -> bool | Literal["rows"]:
        """Whether the call belongs to a new run, from the evidence it carries (`"rows"`: only because the
        rows it recomputes differ from the held ones)."""
        if st.end == 0:
            return False
        if e.fresh:
            return True  # the call's cache was empty: a new run, even where its kept rows start past the last one
        if e.kind == "cross" and e.keys != st.keys:
            return True  # another image (or image size): the keys changed
        if e.memory is not None and st.memory and not set(e.memory) <= st.memory:
            return True  # another image: its keys are none of the rows held so far (beams only reorder)
        real = e.queries if valid is None else max(0, min(valid, e.queries))
        if start < st.end:
            if start + real < st.end:
                return True  # positions went back without reaching the last held one: a new run
            if e.recorded and st.rows and compare is not None:
                if compare(st.end - 1, st.end - 1 - start) == "different":
                    return "rows"  # recomputed rows differ from the held ones: another input
        elif start > st.end and e.recorded:
            self._note("gap", e.site,
                       f"site {e.site!r}: a call at position {start} after positions 0..{st.end - 1}: positions "
                       f"{st.end}..{start - 1} were never seen (kept as they came). If the loop starts a new run "
                       "here, call trace.new_sequence() before it.")
        if e.batch != st.batch and e.recorded:
            evidence = e.start is not None or e.kind == "self" or e.memory is not None or self.serial > 0
            if not evidence:
                self._note("batch", e.site,
                           f"site {e.site!r}: the batch changed from {st.batch} to {e.batch} at position "
                           f"{max(start, st.end)} and nothing marks a new run (no self-attention, cache or keys "
                           "to compare); kept in the same run, as beam hypotheses. If a new run starts here, call "
                           "trace.new_sequence() before it; give the spec memory= to let attnhook tell.")
        return False

    def _note(self, code: str, site: str, message: str, quiet: bool = False) -> None:
        self.notes.append(Note(code if not quiet else f"quiet:{code}", site, message))
