# cython: language_level=3, binding=False
"""Compiled queue core: an indexed priority queue over integer call handles.

Imported as ``router._queue_core``; use it through ``router.pqueue``, whose
module docstring states the contract shared with the pure-Python twin
``PyIndexedPQ``.

Layout (no Python object is stored per entry):

* ``_heap``: a 4-ary min-heap of 16-byte ``Entry {double key; int64 handle}``
  ordered by ``(key, handle)``. The array is placed so that every group of four
  siblings fills exactly one 64-byte cache line: a level of a sift costs one
  line, and four children per node halve the depth of a binary heap. Pops
  (the hot path) go to the bottom, so this is where the time goes.
* ``_thandle`` / ``_tpos``: an open-addressing hash table (linear probing,
  Fibonacci hashing, load <= 1/2, power-of-two size) mapping a handle to its
  heap position. Handles may be sparse and large, hence no direct array.
* ``_hslot``: parallel to ``_heap``, the table slot of each entry, so moving an
  entry during a sift rewrites ``_tpos[slot]`` directly, without hashing.
  Table deletion shifts later chain members back (no tombstones, no periodic
  rehash); when a table entry moves, its ``_hslot`` follows.

Memory comes from ``PyMem_*`` and grows geometrically; ``clear()`` gives back
anything above the capacity hint. Allocations happen before the entries are
touched, so a ``MemoryError`` leaves the queue's contents unchanged.
"""

cimport cython
from cpython.exc cimport PyErr_Occurred
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #if defined(__GNUC__)
    #  define TANDEM_UNLIKELY(x) __builtin_expect(!!(x), 0)
    #  define TANDEM_PREFETCH(p) __builtin_prefetch((p), 1, 3)
    #else
    #  define TANDEM_UNLIKELY(x) (x)
    #  define TANDEM_PREFETCH(p) ((void)0)
    #endif
    #define TANDEM_MAX_HANDLE (((int64_t)1) << 62)
    #define TANDEM_FIB 0x9E3779B97F4A7C15ULL  /* 2**64 / golden ratio */
    """
    bint unlikely "TANDEM_UNLIKELY"(bint)
    const int64_t MAX_HANDLE "TANDEM_MAX_HANDLE"
    const uint64_t FIB "TANDEM_FIB"
    void prefetch_w "TANDEM_PREFETCH"(const void*) noexcept nogil


ctypedef struct Entry:
    double key
    int64_t handle


cdef enum:
    ARITY = 4           # children per node; a group of 4 Entries is one cache line
    MIN_TABLE = 8
    EMPTY = -1          # _thandle value of a free table slot
    OUT_OF_RANGE = -1   # _handle_of() result for ints outside [0, 2**62)
    LINE = 64           # cache-line size the child groups are aligned to

# Positions and slots are int32 (half the index traffic of Py_ssize_t);
# this caps a queue at 2**30 entries (the table holds twice as many slots).
cdef Py_ssize_t MAX_ENTRIES = 1 << 30


cdef inline bint _before(const Entry* a, const Entry* b) noexcept nogil:
    """Service order: smaller key first, then smaller handle (arrival order)."""
    return a.key < b.key or (a.key == b.key and a.handle < b.handle)


cdef int _cmp_entries(const void* pa, const void* pb) noexcept nogil:
    cdef const Entry* a = <const Entry*>pa
    cdef const Entry* b = <const Entry*>pb
    if _before(a, b):
        return -1
    if _before(b, a):
        return 1
    return 0


cdef inline int64_t _handle_of(object handle) except? -2:
    """The int64 value of ``handle``; OUT_OF_RANGE for ints outside [0, 2**62).

    Non-integers raise TypeError (via ``__index__``, like ``operator.index``).
    """
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(handle):
        handle = PyNumber_Index(handle)
    v = PyLong_AsLongLongAndOverflow(handle, &overflow)
    if unlikely(v == -1 and PyErr_Occurred() != NULL):
        return -2
    if overflow or v < 0 or v >= MAX_HANDLE:
        return OUT_OF_RANGE
    return v


@cython.final
@cython.auto_pickle(False)
cdef class IndexedPQ:
    """Indexed 4-ary min-heap over int handles; see ``router.pqueue``."""

    cdef void* _heap_mem         # allocation behind _heap (freed, never indexed)
    cdef Entry* _heap            # heap[1 + 4*i] starts a cache line
    cdef int32_t* _hslot         # table slot of each heap entry
    cdef Py_ssize_t _n           # entries in the heap
    cdef Py_ssize_t _cap         # allocated heap entries
    cdef int64_t* _thandle       # table: handle or EMPTY
    cdef int32_t* _tpos          # table: heap position of that handle
    cdef Py_ssize_t _tcap        # table slots, a power of two >= MIN_TABLE
    cdef int _tshift             # 64 - log2(_tcap), for Fibonacci hashing
    cdef Py_ssize_t _hint        # capacity asked for at construction

    def __cinit__(self, capacity_hint=0):
        cdef Py_ssize_t hint = capacity_hint
        if hint < 0:
            raise ValueError("capacity_hint must be >= 0")
        self._hint = hint if hint < MAX_ENTRIES else MAX_ENTRIES
        self._alloc_initial()

    def __dealloc__(self):
        PyMem_Free(self._heap_mem)
        PyMem_Free(self._hslot)
        PyMem_Free(self._thandle)
        PyMem_Free(self._tpos)

    # -- memory --------------------------------------------------------------

    cdef int _alloc_initial(self) except -1:
        """Size the storage of an *empty* queue for the capacity hint."""
        cdef Py_ssize_t cap = self._hint if self._hint > 16 else 16
        cdef Py_ssize_t tcap = MIN_TABLE
        while tcap < 2 * cap:
            tcap *= 2
        self._n = 0
        self._grow_heap(cap, shrink=True)
        self._rehash(tcap, shrink=True)
        return 0

    cdef int _grow_heap(self, Py_ssize_t cap, bint shrink=False) except -1:
        """Reallocate the heap arrays for ``cap`` entries, keeping the first _n."""
        cdef void* mem
        cdef Entry* heap
        cdef int32_t* hslot
        cdef size_t addr
        if cap == self._cap or (cap < self._cap and not shrink):
            return 0
        # One spare line so heap+1 can be moved onto a line boundary.
        mem = PyMem_Malloc(cap * sizeof(Entry) + LINE)
        hslot = <int32_t*>PyMem_Malloc(cap * sizeof(int32_t))
        if mem == NULL or hslot == NULL:
            PyMem_Free(mem)
            PyMem_Free(hslot)
            raise MemoryError()
        addr = (<size_t>mem + sizeof(Entry) + LINE - 1) & ~(<size_t>LINE - 1)
        heap = <Entry*>(addr - sizeof(Entry))
        if self._n:
            memcpy(heap, self._heap, self._n * sizeof(Entry))
            memcpy(hslot, self._hslot, self._n * sizeof(int32_t))
        PyMem_Free(self._heap_mem)
        PyMem_Free(self._hslot)
        self._heap_mem, self._heap, self._hslot, self._cap = mem, heap, hslot, cap
        return 0

    cdef int _reserve(self, Py_ssize_t need) except -1:
        """Make room for ``need`` entries (heap and table), growing geometrically."""
        cdef Py_ssize_t cap, tcap
        if need > MAX_ENTRIES:
            raise OverflowError("IndexedPQ holds at most 2**30 entries")
        if need > self._cap:
            cap = self._cap * 2
            if cap < need:
                cap = need
            self._grow_heap(cap if cap < MAX_ENTRIES else MAX_ENTRIES)
        if 2 * need > self._tcap:
            tcap = self._tcap * 2
            while tcap < 2 * need:
                tcap *= 2
            self._rehash(tcap)
        return 0

    cdef int _rehash(self, Py_ssize_t tcap, bint shrink=False) except -1:
        """Rebuild the table with ``tcap`` slots from the heap."""
        cdef int64_t* thandle
        cdef int32_t* tpos
        cdef Py_ssize_t i, s
        if tcap == self._tcap or (tcap < self._tcap and not shrink):
            return 0
        thandle = <int64_t*>PyMem_Malloc(tcap * sizeof(int64_t))
        tpos = <int32_t*>PyMem_Malloc(tcap * sizeof(int32_t))
        if thandle == NULL or tpos == NULL:
            PyMem_Free(thandle)
            PyMem_Free(tpos)
            raise MemoryError()
        PyMem_Free(self._thandle)
        PyMem_Free(self._tpos)
        memset(thandle, 0xFF, tcap * sizeof(int64_t))   # all EMPTY (-1)
        self._thandle, self._tpos = thandle, tpos
        self._set_tcap(tcap)
        for i in range(self._n):
            s = self._probe(self._heap[i].handle)
            thandle[s] = self._heap[i].handle
            tpos[s] = <int32_t>i
            self._hslot[i] = <int32_t>s
        return 0

    cdef inline void _set_tcap(self, Py_ssize_t tcap) noexcept:
        cdef int bits = 0
        while ((<Py_ssize_t>1) << bits) < tcap:
            bits += 1
        self._tcap = tcap
        self._tshift = 64 - bits

    # -- hash table ----------------------------------------------------------

    cdef inline Py_ssize_t _home(self, int64_t handle) noexcept:
        # Handles are issued in arrival order, so pushes come in runs of
        # consecutive handles: keep each aligned run of 8 together in one
        # cache line of _thandle (low 3 bits kept) and scatter the runs with
        # Fibonacci hashing of the rest. Strided handles still spread, at
        # worst over one home in 8 -- short probes at load <= 1/2.
        return <Py_ssize_t>(
            (((<uint64_t>handle >> 3) * FIB) >> self._tshift) & ~(<uint64_t>7)
            | (<uint64_t>handle & 7))

    cdef inline Py_ssize_t _probe(self, int64_t handle) noexcept:
        """The slot holding ``handle``, or the free slot where it would go."""
        cdef Py_ssize_t mask = self._tcap - 1
        cdef Py_ssize_t s = self._home(handle)
        cdef int64_t* thandle = self._thandle
        while thandle[s] != handle and thandle[s] != EMPTY:
            s = (s + 1) & mask
        return s

    cdef inline Py_ssize_t _find(self, int64_t handle) noexcept:
        """Heap position of ``handle``, or -1 when it is not queued."""
        cdef Py_ssize_t s
        if handle < 0:
            return -1
        s = self._probe(handle)
        if self._thandle[s] == EMPTY:
            return -1
        return self._tpos[s]

    cdef void _table_delete(self, Py_ssize_t hole) noexcept:
        """Free table slot ``hole`` by shifting later probe-chain members back."""
        cdef Py_ssize_t mask = self._tcap - 1
        cdef int64_t* thandle = self._thandle
        cdef int32_t* tpos = self._tpos
        cdef Py_ssize_t s = hole, home
        while True:
            s = (s + 1) & mask
            if thandle[s] == EMPTY:
                break
            home = self._home(thandle[s])
            # The entry at s may fill the hole unless its home lies cyclically
            # in (hole, s]: then the hole is not on its probe path.
            if hole <= s:
                if hole < home <= s:
                    continue
            elif hole < home or home <= s:
                continue
            thandle[hole] = thandle[s]
            tpos[hole] = tpos[s]
            self._hslot[tpos[hole]] = <int32_t>hole
            hole = s
        thandle[hole] = EMPTY

    # -- heap ----------------------------------------------------------------
    # Sifts move a hole instead of swapping: each level copies one entry and
    # points its table slot at the new position; the sifted entry lands once.

    cdef inline void _move(self, Py_ssize_t dst, Py_ssize_t src) noexcept:
        cdef int32_t slot = self._hslot[src]
        self._heap[dst] = self._heap[src]
        self._hslot[dst] = slot
        self._tpos[slot] = <int32_t>dst

    cdef inline void _put(self, Py_ssize_t pos, Entry e, int32_t slot) noexcept:
        self._heap[pos] = e
        self._hslot[pos] = slot
        self._tpos[slot] = <int32_t>pos

    cdef void _sift_up(self, Py_ssize_t pos, Entry e, int32_t slot) noexcept:
        cdef Entry* heap = self._heap
        cdef Py_ssize_t parent
        while pos > 0:
            parent = (pos - 1) // ARITY
            if not _before(&e, &heap[parent]):
                break
            self._move(pos, parent)
            pos = parent
        self._put(pos, e, slot)

    cdef void _sift_down(self, Py_ssize_t pos, Entry e, int32_t slot) noexcept:
        cdef Entry* heap = self._heap
        cdef Py_ssize_t n = self._n
        cdef Py_ssize_t child, best, j, a, b
        while True:
            child = ARITY * pos + 1
            if child + ARITY <= n:
                # The grandchildren of pos are 16 contiguous entries (4 lines):
                # start fetching them before comparing this level, so the next
                # level's miss overlaps this one's work (measured 5-10% on pops
                # at 1e5..1e6 entries).
                j = ARITY * child + 1
                if j < n:
                    prefetch_w(&heap[j])
                    prefetch_w(&heap[j + 4])
                    prefetch_w(&heap[j + 8])
                    prefetch_w(&heap[j + 12])
                # Full group: a two-round tournament (independent compares).
                a = child if _before(&heap[child], &heap[child + 1]) else child + 1
                b = child + 2 if _before(&heap[child + 2], &heap[child + 3]) else child + 3
                best = a if _before(&heap[a], &heap[b]) else b
            elif child < n:
                best = child
                for j in range(child + 1, n):
                    if _before(&heap[j], &heap[best]):
                        best = j
            else:
                break
            if not _before(&heap[best], &e):
                break
            self._move(pos, best)
            pos = best
        self._put(pos, e, slot)

    cdef void _delete_at(self, Py_ssize_t pos) noexcept:
        """Drop the entry at heap position ``pos`` (table slot included)."""
        cdef int32_t slot = self._hslot[pos]
        cdef Py_ssize_t last
        # The table line of a dequeued call is usually cold: fetch it while
        # the heap is repaired, then free the slot (nothing reads it meanwhile).
        prefetch_w(&self._thandle[slot])
        self._n -= 1
        last = self._n
        if pos != last:
            if pos > 0 and _before(&self._heap[last], &self._heap[(pos - 1) // ARITY]):
                self._sift_up(pos, self._heap[last], self._hslot[last])
            else:
                self._sift_down(pos, self._heap[last], self._hslot[last])
        self._table_delete(slot)

    # -- public API ----------------------------------------------------------

    def push(self, handle, double key):
        """Queue ``handle`` with ``key``; ValueError if already queued."""
        cdef int64_t h = _handle_of(handle)
        cdef Py_ssize_t s
        cdef Entry e
        if unlikely(h == OUT_OF_RANGE):
            raise ValueError(f"handle {handle} out of range [0, 2**62)")
        if unlikely(key != key):
            raise ValueError("key must not be NaN")
        s = self._probe(h)
        if unlikely(self._thandle[s] != EMPTY):
            raise ValueError(f"handle {handle} already queued")
        if unlikely(self._n >= self._cap or 2 * (self._n + 1) > self._tcap):
            self._reserve(self._n + 1)
            s = self._probe(h)
        self._thandle[s] = h
        e.key = key
        e.handle = h
        self._n += 1
        self._sift_up(self._n - 1, e, <int32_t>s)

    def pop(self):
        """Remove and return ``(handle, key)`` of the next call to serve."""
        cdef Entry top
        if unlikely(self._n == 0):
            raise IndexError("pop from an empty queue")
        top = self._heap[0]
        self._delete_at(0)
        return top.handle, top.key

    def peek(self):
        """``(handle, key)`` of the next call to serve, left queued."""
        if unlikely(self._n == 0):
            raise IndexError("peek from an empty queue")
        return self._heap[0].handle, self._heap[0].key

    def remove(self, handle):
        """Dequeue ``handle`` wherever it is and return its key."""
        cdef Py_ssize_t pos = self._find(_handle_of(handle))
        cdef double key
        if unlikely(pos < 0):
            raise KeyError(handle)
        key = self._heap[pos].key
        self._delete_at(pos)
        return key

    def update(self, handle, double key):
        """Give ``handle`` a new key (reprioritise)."""
        cdef int64_t h = _handle_of(handle)
        cdef Py_ssize_t pos
        cdef Entry e
        if unlikely(key != key):
            raise ValueError("key must not be NaN")
        pos = self._find(h)
        if unlikely(pos < 0):
            raise KeyError(handle)
        e = self._heap[pos]
        e.key = key
        if key < self._heap[pos].key:
            self._sift_up(pos, e, self._hslot[pos])
        else:
            self._sift_down(pos, e, self._hslot[pos])

    def key(self, handle):
        """The key ``handle`` is queued with."""
        cdef Py_ssize_t pos = self._find(_handle_of(handle))
        if unlikely(pos < 0):
            raise KeyError(handle)
        return self._heap[pos].key

    def rank(self, handle):
        """Entries served before ``handle``: a linear scan, O(n)."""
        cdef Py_ssize_t pos = self._find(_handle_of(handle))
        cdef Py_ssize_t i, count = 0
        cdef Entry target
        if pos < 0:
            raise KeyError(handle)
        target = self._heap[pos]
        for i in range(self._n):
            count += _before(&self._heap[i], &target)
        return count

    def items(self):
        """Snapshot ``[(handle, key), ...]`` in service order, O(n log n)."""
        cdef Py_ssize_t i, n = self._n
        cdef Entry* tmp
        if n == 0:
            return []
        tmp = <Entry*>PyMem_Malloc(n * sizeof(Entry))
        if tmp == NULL:
            raise MemoryError()
        try:
            memcpy(tmp, self._heap, n * sizeof(Entry))
            qsort(tmp, n, sizeof(Entry), _cmp_entries)
            return [(tmp[i].handle, tmp[i].key) for i in range(n)]
        finally:
            PyMem_Free(tmp)

    def clear(self):
        """Empty the queue and give back memory above the capacity hint."""
        self._n = 0
        memset(self._thandle, 0xFF, self._tcap * sizeof(int64_t))
        try:
            self._alloc_initial()
        except MemoryError:
            pass  # still empty and consistent, just not shrunk

    def __len__(self):
        return self._n

    def __bool__(self):
        return self._n != 0

    def __contains__(self, handle):
        return self._find(_handle_of(handle)) >= 0

    def __repr__(self):
        return f"<IndexedPQ len={self._n}>"

    def _check_invariants(self):
        """Raise AssertionError unless heap order and table agree (tests)."""
        cdef Py_ssize_t i, s, home, used = 0
        cdef Py_ssize_t mask = self._tcap - 1
        for i in range(self._n):
            s = self._hslot[i]
            assert 0 <= s < self._tcap, "slot out of table"
            assert self._thandle[s] == self._heap[i].handle, "slot/handle mismatch"
            assert self._tpos[s] == i, "table position stale"
            if i:
                assert not _before(&self._heap[i], &self._heap[(i - 1) // ARITY]), \
                    "heap order broken"
        for s in range(self._tcap):
            if self._thandle[s] == EMPTY:
                continue
            used += 1
            home = self._home(self._thandle[s])
            # No free slot may interrupt the probe path from home to s.
            while home != s:
                assert self._thandle[home] != EMPTY, "probe chain broken"
                home = (home + 1) & mask
        assert used == self._n, "table count differs from heap size"
        assert 2 * self._n <= self._tcap, "table overloaded"
