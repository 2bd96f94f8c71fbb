"""Queue core: the same contract tests on both implementations ("py" / "c"),
then property tests that drive both with random operation sequences and
compare every result (the pure-Python twin is the reference model; a plain
dict checks the twin in turn)."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router.pqueue import MAX_HANDLE, IndexedPQ, PyIndexedPQ


@pytest.fixture(params=[PyIndexedPQ, IndexedPQ], ids=["py", "c"])
def pq_cls(request):
    return request.param


@pytest.fixture
def pq(pq_cls):
    return pq_cls()


def service_order(model: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(model.items(), key=lambda hk: (hk[1], hk[0]))


# -- contract ---------------------------------------------------------------------


def test_empty_queue(pq):
    assert len(pq) == 0 and not pq and pq.items() == []
    assert 0 not in pq
    with pytest.raises(IndexError):
        pq.pop()
    with pytest.raises(IndexError):
        pq.peek()
    for op in (pq.remove, pq.key, pq.rank):
        with pytest.raises(KeyError):
            op(0)
    with pytest.raises(KeyError):
        pq.update(0, 1.0)


def test_serves_smallest_key_then_earliest_handle(pq):
    for handle, key in [(5, 1.0), (3, 1.0), (9, 0.5), (4, 2.0), (7, 1.0)]:
        pq.push(handle, key)
    assert len(pq) == 5 and pq and 7 in pq and 8 not in pq
    assert pq.peek() == (9, 0.5)
    assert pq.rank(9) == 0 and pq.rank(3) == 1 and pq.rank(7) == 3 and pq.rank(4) == 4
    assert pq.items() == [(9, 0.5), (3, 1.0), (5, 1.0), (7, 1.0), (4, 2.0)]
    assert [pq.pop() for _ in range(5)] == [(9, 0.5), (3, 1.0), (5, 1.0), (7, 1.0), (4, 2.0)]
    assert not pq


def test_remove_update_key(pq):
    for handle in range(10):
        pq.push(handle, float(handle))
    assert pq.remove(4) == 4.0 and 4 not in pq and len(pq) == 9
    pq.update(9, -1.0)  # reprioritise to the front
    pq.update(0, 100.0)  # and to the back
    assert pq.key(9) == -1.0 and pq.key(0) == 100.0
    assert pq.peek() == (9, -1.0) and pq.rank(0) == 8
    assert [h for h, _ in pq.items()] == [9, 1, 2, 3, 5, 6, 7, 8, 0]
    pq._check_invariants()


def test_keys_are_floats_and_infinities_allowed(pq):
    pq.push(1, 3)  # an int key is stored as a float
    pq.push(2, -math.inf)
    pq.push(3, math.inf)
    pq.push(4, -0.0)
    assert pq.items() == [(2, -math.inf), (4, 0.0), (1, 3.0), (3, math.inf)]
    assert type(pq.key(1)) is float


def test_bad_arguments_raise_and_change_nothing(pq):
    pq.push(1, 1.0)
    pq.push(MAX_HANDLE - 1, 2.0)  # largest handle
    before = pq.items()
    with pytest.raises(ValueError):
        pq.push(1, 0.0)  # already queued
    for handle in (-1, MAX_HANDLE, 2**70):
        with pytest.raises(ValueError):
            pq.push(handle, 0.0)
        with pytest.raises(KeyError):
            pq.remove(handle)
        assert handle not in pq
    for handle in (1.0, "1", None):
        with pytest.raises(TypeError):
            pq.push(handle, 0.0)
        with pytest.raises(TypeError):
            pq.key(handle)
    with pytest.raises(TypeError):
        pq.push(2, "0.5")
    with pytest.raises(ValueError):
        pq.push(2, math.nan)
    with pytest.raises(ValueError):
        pq.update(1, math.nan)
    with pytest.raises(ValueError):
        type(pq)(-1)  # capacity_hint
    assert pq.items() == before and 2 not in pq
    pq._check_invariants()


def test_clear_and_reuse(pq_cls):
    pq = pq_cls(4)
    for handle in range(1000):
        pq.push(handle, -float(handle))
    pq.clear()
    assert len(pq) == 0 and pq.items() == [] and 5 not in pq
    pq._check_invariants()
    pq.push(5, 1.0)
    assert pq.pop() == (5, 1.0)


@pytest.mark.parametrize("pattern", ["sparse", "strided", "sequential"])
def test_growth_and_handle_patterns(pq_cls, pattern):
    """Table growth and collision patterns: random 62-bit, multiples of 1024, runs."""
    rnd = random.Random(pattern)
    handles = {
        "sparse": lambda i: rnd.randrange(MAX_HANDLE),
        "strided": lambda i: i * 1024,
        "sequential": lambda i: 10**12 + i,
    }[pattern]
    pq, model = pq_cls(), {}
    for i in range(5000):
        h, k = handles(i), float(rnd.randrange(100))
        if h not in model:
            pq.push(h, k)
            model[h] = k
        if i % 3 == 0:
            victim = rnd.choice(list(model))
            assert pq.remove(victim) == model.pop(victim)
    pq._check_invariants()
    assert pq.items() == service_order(model)
    assert [pq.pop() for _ in range(len(pq))] == service_order(model)


def test_long_random_run_agrees_with_twin():
    """A few thousand mixed operations at a realistic size, compared op by op."""
    rnd = random.Random(7)
    c, py = IndexedPQ(), PyIndexedPQ()
    next_handle, live = 0, []
    for step in range(20000):
        r = rnd.random()
        if r < 0.45 or not live:
            k = rnd.choice([rnd.random() * 100, float(rnd.randrange(10))])
            c.push(next_handle, k)
            py.push(next_handle, k)
            live.append(next_handle)
            next_handle += 1
        elif r < 0.75:
            got = c.pop()
            assert got == py.pop()
            live.remove(got[0])
        elif r < 0.85:
            h = live.pop(rnd.randrange(len(live)))
            assert c.remove(h) == py.remove(h)
        else:
            h = rnd.choice(live)
            k = rnd.random() * 100
            c.update(h, k)
            py.update(h, k)
        if step % 2000 == 0:
            c._check_invariants()
            assert c.items() == py.items()
            if live:
                h = rnd.choice(live)
                assert c.rank(h) == py.rank(h)
    assert c.items() == py.items()


def test_facade_refuses_to_run_without_the_build():
    code = (
        "import sys; sys.modules['router._queue_core'] = None\n"
        "try:\n    import router.pqueue\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "make build" in out.stdout


# -- properties -------------------------------------------------------------------

HANDLES = st.one_of(
    st.integers(0, 40),
    st.sampled_from([MAX_HANDLE - 1, 2**32, 2**32 + 8, 8 * 1024, 16 * 1024]),
)
KEYS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 1.5, -3.0, math.inf, -math.inf]),  # ties
    st.floats(allow_nan=False, width=64),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, MAX_HANDLE - 1), KEYS), max_size=200))
def test_pops_come_out_in_service_order(entries):
    model = dict(entries)  # last key wins for a repeated handle
    for cls in (PyIndexedPQ, IndexedPQ):
        pq = cls()
        for h, k in model.items():
            pq.push(h, k)
        assert [pq.pop() for _ in range(len(model))] == service_order(model)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # compared by type: messages may differ
        return ("raised", type(exc))


class BothQueues(RuleBasedStateMachine):
    """Every operation on both implementations; results must match each other
    and a plain dict model."""

    def __init__(self):
        super().__init__()
        self.py, self.c, self.model = PyIndexedPQ(), IndexedPQ(), {}

    def both(self, name, *args):
        got = outcome(getattr(self.py, name), *args)
        assert got == outcome(getattr(self.c, name), *args), (name, args)
        return got

    @rule(handle=HANDLES, key=KEYS)
    def push(self, handle, key):
        status, _ = self.both("push", handle, key)
        assert (status == "ok") == (handle not in self.model)
        self.model.setdefault(handle, key)

    @rule(start=st.integers(0, 2**40), count=st.integers(1, 80), key=KEYS)
    def push_run(self, start, count, key):
        """A burst of arrivals: consecutive handles, equal keys (grows the table)."""
        for handle in range(start, start + count):
            if handle not in self.model:
                self.both("push", handle, key)
                self.model[handle] = key

    @rule()
    def pop(self):
        status, value = self.both("pop")
        if self.model:
            assert value == service_order(self.model)[0]
            del self.model[value[0]]
        else:
            assert status == "raised"

    @rule()
    def peek(self):
        status, value = self.both("peek")
        assert value == (service_order(self.model)[0] if self.model else IndexError)

    @rule(data=st.data())
    def remove(self, data):
        handle = self.pick(data)
        status, value = self.both("remove", handle)
        assert value == (self.model.pop(handle) if handle in self.model else KeyError)

    @rule(data=st.data(), key=KEYS)
    def update(self, data, key):
        handle = self.pick(data)
        status, _ = self.both("update", handle, key)
        assert (status == "ok") == (handle in self.model)
        if handle in self.model:
            self.model[handle] = key

    @rule(data=st.data())
    def lookups(self, data):
        handle = self.pick(data)
        assert self.both("__contains__", handle) == ("ok", handle in self.model)
        key = self.both("key", handle)
        rank = self.both("rank", handle)
        if handle in self.model:
            assert key == ("ok", self.model[handle])
            assert rank == ("ok", service_order(self.model).index((handle, self.model[handle])))

    @precondition(lambda self: len(self.model) > 20)
    @rule()
    def clear(self):
        self.both("clear")
        self.model.clear()

    def pick(self, data):
        """A queued handle most of the time, else any handle."""
        if self.model and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(self.model)))
        return data.draw(HANDLES)

    @invariant()
    def agree(self):
        assert len(self.py) == len(self.c) == len(self.model)
        assert bool(self.py) == bool(self.c) == bool(self.model)
        assert self.py.items() == self.c.items() == service_order(self.model)
        self.py._check_invariants()
        self.c._check_invariants()


TestBothQueues = BothQueues.TestCase
TestBothQueues.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
