"""The position tracker on its own: a lettered table of edge cases, fed events the way hooks feed them.

Each case is a list of (event, verdict) pairs; the verdict is what `compare` answers if asked (held rows
equal, reordered, or different). The expectation is, per recorded event, (run, first, lo, hi, call).
"""

from __future__ import annotations

import pytest

from attnhook._positions import Event, Tracker


def S(q, k, **kw):  # a self-attention call of site "s"
    return Event("s", "self", kw.pop("batch", 1), q, k, **kw)


def X(q, k=9, **kw):  # a cross-attention call of site "x"
    return Event("x", "cross", kw.pop("batch", 1), q, k, **{"same_query": False, **kw})


STEP = "step"
NEW = "new_sequence"

CASES = {
    # A: incremental decoding with a cache: one query per call, the cache says where
    "A incremental, cache position": (
        [S(3, 3, start=0), X(3), S(1, 4, start=3), X(1), S(1, 5, start=4), X(1)],
        [(0, 0, 0, 3, 0), (0, 0, 0, 3, 0), (0, 3, 0, 1, 0), (0, 3, 0, 1, 0), (0, 4, 0, 1, 0), (0, 4, 0, 1, 0)]),
    # B: the whole prefix recomputed every step: only the new last row is kept
    "B recomputed prefix": (
        [S(1, 1), X(1), S(2, 2), X(2), S(3, 3), X(3)],
        [(0, 0, 0, 1, 0), (0, 0, 0, 1, 0), (0, 1, 1, 2, 0), (0, 1, 1, 2, 0), (0, 2, 2, 3, 0), (0, 2, 2, 3, 0)]),
    # C: fixed-slot template: 8 slots, the mask says how many are real; slot i is kept at step i
    "C template": (
        [S(8, 8, valid=1), X(8), S(8, 8, valid=2), X(8), S(8, 8, valid=3), X(8)],
        [(0, 0, 0, 1, 0), (0, 0, 0, 1, 0), (0, 1, 1, 2, 0), (0, 1, 1, 2, 0), (0, 2, 2, 3, 0), (0, 2, 2, 3, 0)]),
    # D: one cross-attention module called three times per step with the same queries
    "D several calls per step": (
        [S(1, 1), X(1), X(1, same_query=True), X(1, same_query=True), S(2, 2), X(2), X(2, same_query=True)],
        [(0, 0, 0, 1, 0), (0, 0, 0, 1, 0), (0, 0, 0, 1, 1), (0, 0, 0, 1, 2), (0, 1, 1, 2, 0), (0, 1, 1, 2, 0),
         (0, 1, 1, 2, 1)]),
    # E: positions go back to 0: a new run
    "E restart": (
        [S(1, 1), S(2, 2), S(1, 1)],
        [(0, 0, 0, 1, 0), (0, 1, 1, 2, 0), (1, 0, 0, 1, 0)]),
    # F: teacher-forcing another input of the same length: recomputed rows differ
    "F same length, other input": (
        [(S(4, 4), "same"), (S(4, 4), "different")],
        [(0, 0, 0, 4, 0), (1, 0, 0, 4, 0)]),
    # G: the same input again: a recomputation, nothing new (held for replay)
    "G same input again": (
        [(S(4, 4), "same"), (S(4, 4), "same")],
        [(0, 0, 0, 4, 0), (0, 4, 4, 4, 0)]),
    # H: beams grow 1 -> 3 and are reordered in a recomputing loop: held rows map, one run
    "H beams reordered": (
        [S(2, 2), (S(3, 3, batch=3), "mapped"), (S(4, 4, batch=3), "mapped")],
        [(0, 0, 0, 2, 0), (0, 2, 2, 3, 0), (0, 3, 3, 4, 0)]),
    # I: extra key slots on the first call (memory slots): positions from 0, the extras stay extra
    "I memory slots": (
        [S(5, 9), S(1, 10)],
        [(0, 0, 0, 5, 0), (0, 5, 0, 1, 0)]),
    # J: cross-attention before the pass's self-attention, cached: the stale clock is not used
    "J cross before self": (
        [X(3), S(3, 3), X(1), S(1, 4), X(1), S(1, 5)],
        [(0, 0, 0, 3, 0), (0, 0, 0, 3, 0), (0, 3, 0, 1, 0), (0, 3, 0, 1, 0), (0, 4, 0, 1, 0), (0, 4, 0, 1, 0)]),
    # K: no self-attention (recurrent decoder): keys of another image start a new run; beams copy rows
    "K recurrent, keys": (
        [X(1, batch=2, memory=(1, 1)), X(1, batch=2, memory=(1, 1)), X(1, batch=1, memory=(1,)),
         X(1, batch=2, memory=(7, 7))],
        [(0, 0, 0, 1, 0), (0, 1, 0, 1, 0), (0, 2, 0, 1, 0), (1, 0, 0, 1, 0)]),
    # L: the key count changes: another image size, a new run
    "L keys change": (
        [X(1, 9), X(1, 9), X(1, 12)],
        [(0, 0, 0, 1, 0), (0, 1, 0, 1, 0), (1, 0, 0, 1, 0)]),
    # M: explicit step events: two calls between steps are one step, even with fresh queries
    "M step events": (
        ["stepping", X(1), X(1), STEP, X(1), X(1), STEP],
        [(0, 0, 0, 1, 0), (0, 0, 0, 1, 1), (0, 1, 0, 1, 0), (0, 1, 0, 1, 1)]),
    # N: trace.new_sequence() between runs that nothing else tells apart
    "N new_sequence": (
        [X(1), X(1), NEW, X(1)],
        [(0, 0, 0, 1, 0), (0, 1, 0, 1, 0), (1, 0, 0, 1, 0)]),
    # O: a watched self-attention site (not recorded) still shows the restart to a recorded cross site
    "O watched self": (
        [S(1, 1, recorded=False), X(1), S(2, 2, recorded=False), X(2), S(1, 1, recorded=False), X(1)],
        [(0, 0, 0, 1, 0), (0, 1, 1, 2, 0), (1, 0, 0, 1, 0)]),
    # P: a vision encoder's self-attention ran first (other sizes): the cross site still runs before the
    # text self-attention of its pass, and is not placed on the text's previous position
    "P cross first after a vision encoder": (
        [Event("v", "self", 1, 17, 17), X(4, 17), S(1, 4, start=3), X(1, 17), S(1, 5, start=4)],
        [(0, 0, 0, 17, 0), (0, 0, 0, 4, 0), (0, 3, 0, 1, 0), (0, 4, 0, 1, 0), (0, 4, 0, 1, 0)]),
}


def _run(events):
    tracker, run, out = Tracker(), 0, []
    for item in events:
        if item == "stepping":
            tracker.stepping = True
            continue
        if item == STEP:
            tracker.step()
            continue
        if item == NEW:
            tracker.new_run()
            run += 1
            continue
        event, verdict = item if isinstance(item, tuple) else (item, "same")
        placed = tracker.place(event, lambda position, row: verdict)
        run += placed.new_run
        if event.recorded:
            out.append((run, placed.first, placed.lo, placed.hi, placed.call))
    return out, tracker


@pytest.mark.parametrize("case", sorted(CASES))
def test_edge_case(case):
    events, expected = CASES[case]
    placed, _ = _run(events)
    assert placed == expected


def test_a_gap_and_a_batch_change_without_evidence_leave_notes():
    _, tracker = _run([X(1, start=0), X(1, start=3)])
    assert [n.code for n in tracker.notes] == ["gap"]
    _, tracker = _run([X(1, batch=3), X(1, batch=2)])
    assert [n.code for n in tracker.notes] == ["batch"] and "trace.new_sequence()" in tracker.notes[0].message
    _, tracker = _run([S(1, 1), X(1, batch=1), S(2, 2, batch=3), (X(2, batch=3), "mapped")])
    assert tracker.notes == []  # positions say it is one run: beams, nothing to say
