"""The queue core: an indexed priority queue over integer call handles.

Two implementations share one contract:

* :class:`IndexedPQ` -- the compiled core (``native/queue_core.pyx``), what the
  router uses;
* :class:`PyIndexedPQ` -- a pure-Python twin, kept simple on purpose: it is the
  reference model the property tests compare the compiled core against.

Contract (both classes)
-----------------------
Entries are ``(handle, key)`` pairs. A *handle* is an ``int`` in
``[0, 2**62)`` naming one queued call; a *key* is a float, smaller is served
first. Equal keys are served by smaller handle first: handles are issued in
arrival order, so ties go by arrival (design invariant 3). NaN keys are
refused (``ValueError``) because they have no place in a total order.

===================  ===========  ==============================================
operation            cost         errors
===================  ===========  ==============================================
``push(h, k)``       O(log n)     ValueError: h already queued, h out of range,
                                  k is NaN; TypeError: h not an int, k not a
                                  real number
``pop()``            O(log n)     IndexError when empty
``peek()``           O(1)         IndexError when empty
``remove(h)``        O(log n)     KeyError when h is not queued
``update(h, k)``     O(log n)     KeyError when h is not queued; ValueError for
                                  a NaN key
``key(h)``           O(1)         KeyError when h is not queued
``rank(h)``          O(n)         KeyError when h is not queued
``h in q``           O(1)         (False for any int not queued)
``items()``          O(n log n)   --
``len``/``bool``     O(1)         --
``clear()``          O(n)         --
===================  ===========  ==============================================

``rank(h)`` is the number of entries that would be served before ``h`` (its
0-based position in service order); it scans the queue once, which is fine for
IVR position announcements but not for a hot loop. ``items()`` returns a
snapshot list of ``(handle, key)`` in service order.

Operations that look up a handle (``remove``, ``update``, ``key``, ``rank``)
raise ``KeyError`` for any int that is not queued, including out-of-range
ints; a non-int handle is a ``TypeError`` everywhere. A failed call changes
nothing.

Differences that are not part of the contract: the compiled core holds at most
``2**30`` entries (``OverflowError`` beyond) and cannot be pickled or copied;
the twin has neither limit. Both keep the queue's state across calls only;
durability is the journal's job, not theirs.
"""

from __future__ import annotations

import math
from operator import index as _index
from typing import final

__all__ = ["IndexedPQ", "PyIndexedPQ", "MAX_HANDLE"]

#: Handles must be ``< MAX_HANDLE`` (they fit a C int64 with room to spare).
MAX_HANDLE = 1 << 62


# ldexp(x, 0) is x converted exactly as the C core converts its ``double``
# arguments (__float__, then __index__; str refused; -0.0 and inf kept), so both
# implementations accept and refuse the same keys with the same errors.
def _as_double(key: object) -> float:
    return math.ldexp(key, 0)  # type: ignore[arg-type]


def _check_key(key: float) -> None:
    if key != key:
        raise ValueError("key must not be NaN")


@final
class PyIndexedPQ:
    """Pure-Python indexed binary min-heap; same contract as :class:`IndexedPQ`.

    Heap entries are ``(key, handle)`` tuples, so tuple order is service order;
    ``_pos`` maps each handle to its index in ``_heap``.
    """

    __slots__ = ("_heap", "_pos")

    def __init__(self, capacity_hint: int = 0) -> None:
        if _index(capacity_hint) < 0:
            raise ValueError("capacity_hint must be >= 0")
        self._heap: list[tuple[float, int]] = []
        self._pos: dict[int, int] = {}

    # -- queries -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __contains__(self, handle: int) -> bool:
        return _index(handle) in self._pos

    def __repr__(self) -> str:
        return f"<PyIndexedPQ len={len(self._heap)}>"

    def peek(self) -> tuple[int, float]:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        key, handle = self._heap[0]
        return handle, key

    def key(self, handle: int) -> float:
        return self._heap[self._lookup(handle)][0]

    def rank(self, handle: int) -> int:
        target = self._heap[self._lookup(handle)]
        return sum(1 for entry in self._heap if entry < target)

    def items(self) -> list[tuple[int, float]]:
        return [(handle, key) for key, handle in sorted(self._heap)]

    # -- mutations ---------------------------------------------------------------

    def push(self, handle: int, key: float) -> None:
        # Same check order as the C core: key type, handle type, handle range,
        # NaN key, duplicate.
        key = _as_double(key)
        handle = _index(handle)
        if not 0 <= handle < MAX_HANDLE:
            raise ValueError(f"handle {handle} out of range [0, 2**62)")
        _check_key(key)
        if handle in self._pos:
            raise ValueError(f"handle {handle} already queued")
        self._heap.append((key, handle))
        self._pos[handle] = len(self._heap) - 1
        self._sift_up(len(self._heap) - 1)

    def pop(self) -> tuple[int, float]:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        key, handle = self._heap[0]
        self._delete_at(0)
        return handle, key

    def remove(self, handle: int) -> float:
        pos = self._lookup(handle)
        key = self._heap[pos][0]
        self._delete_at(pos)
        return key

    def update(self, handle: int, key: float) -> None:
        key = _as_double(key)
        handle = _index(handle)
        _check_key(key)
        pos = self._lookup(handle)
        old = self._heap[pos]
        self._heap[pos] = (key, old[1])
        if key < old[0]:
            self._sift_up(pos)
        else:
            self._sift_down(pos)

    def clear(self) -> None:
        self._heap.clear()
        self._pos.clear()

    # -- internals ---------------------------------------------------------------

    def _lookup(self, handle: int) -> int:
        handle = _index(handle)
        try:
            return self._pos[handle]
        except KeyError:
            raise KeyError(handle) from None

    def _delete_at(self, pos: int) -> None:
        heap = self._heap
        del self._pos[heap[pos][1]]
        last = heap.pop()
        if pos < len(heap):
            heap[pos] = last
            self._pos[last[1]] = pos
            self._sift_up(pos)
            self._sift_down(pos)

    def _sift_up(self, pos: int) -> None:
        heap, where = self._heap, self._pos
        entry = heap[pos]
        while pos > 0:
            parent = (pos - 1) >> 1
            if not entry < heap[parent]:
                break
            heap[pos] = heap[parent]
            where[heap[pos][1]] = pos
            pos = parent
        heap[pos] = entry
        where[entry[1]] = pos

    def _sift_down(self, pos: int) -> None:
        heap, where = self._heap, self._pos
        n = len(heap)
        entry = heap[pos]
        while True:
            child = 2 * pos + 1
            if child >= n:
                break
            if child + 1 < n and heap[child + 1] < heap[child]:
                child += 1
            if not heap[child] < entry:
                break
            heap[pos] = heap[child]
            where[heap[pos][1]] = pos
            pos = child
        heap[pos] = entry
        where[entry[1]] = pos

    def _check_invariants(self) -> None:
        """Raise AssertionError unless the heap order and the index agree (tests)."""
        heap = self._heap
        assert len(self._pos) == len(heap)
        for i, (_key, handle) in enumerate(heap):
            assert self._pos[handle] == i
            if i:
                assert not heap[i] < heap[(i - 1) >> 1]


try:
    from router._queue_core import IndexedPQ
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "router._queue_core (the compiled queue core) is not built or fails to load; "
        f"run `make build` first ({exc})"
    ) from exc
