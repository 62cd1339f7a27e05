"""Interleaved timing: structure, rotation, statistics, validation and device synchronisation (never speed)."""
import itertools

import pytest
import torch

import metatut as mt
from metatut.timing import Timing, format_table, interleaved_timings, rotated_order, speedups, synchronize


class FakeClock:
    """A clock that advances by one second per reading and logs each reading into a shared event list."""

    def __init__(self, events):
        self.events, self.now = events, 0.0

    def __call__(self):
        self.events.append("clock")
        self.now += 1.0
        return self.now


def _recorder(events, name):
    def fn():
        events.append(name)
    return fn


def test_exported_from_the_package():
    assert mt.timing is __import__("metatut.timing", fromlist=["x"])
    assert "timing" in mt.__all__


def test_rotated_order_cycles_through_every_starting_point():
    names = ["a", "b", "c"]
    assert [rotated_order(names, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                           ["a", "b", "c"]]
    assert rotated_order([], 3) == []


def test_warmup_then_rounds_in_rotated_order():
    events = []
    fns = {n: _recorder(events, n) for n in ("a", "b", "c")}
    result = interleaved_timings(fns, rounds=3, iters=2, warmup=1, clock=FakeClock(events))
    calls = [e for e in events if e != "clock"]
    warm, timed = calls[:3], calls[3:]
    assert warm == ["a", "b", "c"]
    # round r runs each function `iters` times in a row, in the order rotated by r
    expected = [n for r in range(3) for n in rotated_order("abc", r) for _ in range(2)]
    assert timed == expected
    # the clock is read once before and once after each block of iters calls
    assert events[3:] == list(itertools.chain.from_iterable(
        ["clock", n, n, "clock"] for r in range(3) for n in rotated_order("abc", r)))
    assert list(result) == ["a", "b", "c"]                       # the order of the input, not of the rounds


def test_statistics_are_per_call_median_and_quartiles():
    values = [4.0, 1.0, 2.0, 3.0, 100.0]                       # elapsed seconds of the 5 rounds (one outlier)
    ticks = iter(itertools.chain.from_iterable((0.0, v) for v in values))   # (start, end) reading per round

    def stepping_clock():
        return next(ticks)

    result = interleaved_timings({"f": lambda: None}, rounds=5, iters=2, warmup=0, clock=stepping_clock)
    t = result["f"]
    assert isinstance(t, Timing)
    assert t.times == tuple(v / 2 for v in values)              # elapsed / iters, in round order
    assert t.median == pytest.approx(1.5)                       # median of 2, 0.5, 1, 1.5, 50
    assert t.q1 == pytest.approx(1.0) and t.q3 == pytest.approx(2.0)
    assert t.iqr == pytest.approx(1.0) and t.rounds == 5
    assert "ms" in str(t)


def test_one_round_gives_equal_quartiles():
    ticks = iter([0.0, 0.25])
    t = interleaved_timings({"f": lambda: None}, rounds=1, warmup=0, clock=lambda: next(ticks))["f"]
    assert t.median == t.q1 == t.q3 == 0.25 and t.times == (0.25,)


def test_real_clock_gives_nonnegative_finite_times():
    result = interleaved_timings({"sum": lambda: torch.ones(10).sum(), "noop": lambda: None}, rounds=3)
    for t in result.values():
        assert len(t.times) == 3 and all(x >= 0 for x in t.times)
        assert t.q1 <= t.median <= t.q3


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rounds=0), ValueError, "rounds must be an int >= 1"),
    (dict(rounds=2.5), TypeError, "rounds must be an int >= 1"),
    (dict(rounds=True), TypeError, "rounds must be an int >= 1"),
    (dict(rounds=2, iters=0), ValueError, "iters must be an int >= 1"),
    (dict(rounds=2, warmup=-1), ValueError, "warmup must be an int >= 0"),
    (dict(rounds=2, device="tpu-ish"), ValueError, "device must be"),
    (dict(rounds=2, clock=3.0), TypeError, "clock must be a callable"),
])
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, error, words):
    calls = []
    with pytest.raises(error, match=words):
        interleaved_timings({"f": lambda: calls.append(1)}, **kwargs)
    assert calls == []                                          # refused before anything ran


@pytest.mark.parametrize("functions, error, words", [
    ({}, ValueError, "non-empty dict"),
    ([lambda: None], ValueError, "non-empty dict"),
    ({"f": 3}, TypeError, r"functions\['f'\] must be callable"),
    ({1: lambda: None}, TypeError, "keyed by str"),
])
def test_bad_functions_are_refused(functions, error, words):
    with pytest.raises(error, match=words):
        interleaved_timings(functions, rounds=1)


def test_cuda_device_is_synchronised_before_every_clock_reading(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    fns = {n: _recorder(events, n) for n in ("a", "b")}
    interleaved_timings(fns, rounds=2, iters=1, warmup=1, device="cuda", clock=FakeClock(events))
    # after warm-up the queue is drained once, then every clock reading directly follows a synchronisation
    assert events[:3] == ["a", "b", ("sync", "cuda")]
    for i, e in enumerate(events):
        if e == "clock":
            assert events[i - 1] == ("sync", "cuda"), events
    assert events.count("clock") == 2 * 2 * 2


def test_mps_device_is_synchronised(monkeypatch):
    events = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: events.append("sync"))
    interleaved_timings({"f": lambda: events.append("f")}, rounds=2, warmup=0, device=torch.device("mps"),
                        clock=FakeClock(events))
    assert events == ["sync", "sync", "clock", "f", "sync", "clock", "sync", "clock", "f", "sync", "clock"]


def test_cpu_and_none_do_not_synchronise(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("synchronize must not be called for the CPU")
    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    monkeypatch.setattr(torch.mps, "synchronize", fail)
    for device in (None, "cpu", torch.device("cpu")):
        synchronize(device)
        interleaved_timings({"f": lambda: None}, rounds=1, device=device)


def test_speedups_and_table():
    timings = {"loop": Timing(0.02, 0.019, 0.021, (0.02,)), "vmap": Timing(0.005, 0.004, 0.006, (0.005,))}
    assert speedups(timings, "loop") == pytest.approx({"loop": 1.0, "vmap": 4.0})
    with pytest.raises(KeyError, match="baseline 'nope'"):
        speedups(timings, "nope")
    table = format_table(timings, baseline="loop")
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| implementation") and "speed-up vs loop" in lines[0]
    assert "| 20.000 | 19.000 - 21.000 | 1.00x |" in lines[2] and "4.00x" in lines[3]
    plain = format_table(timings, unit="us", title="path")
    assert "speed-up" not in plain and "median us / call" in plain and "5000.000" in plain
    with pytest.raises(ValueError, match="unit must be one of"):
        format_table(timings, unit="min")
    with pytest.raises(ValueError, match="must not be empty"):
        format_table({})


def test_progress_label_does_not_change_the_schedule(monkeypatch):
    monkeypatch.setenv("METATUT_PROGRESS", "0")
    events = []
    fns = {n: _recorder(events, n) for n in ("a", "b")}
    interleaved_timings(fns, rounds=3, warmup=0, clock=FakeClock(events), desc="timing")
    assert [e for e in events if e != "clock"] == ["a", "b", "b", "a", "a", "b"]
    with pytest.raises(TypeError, match="desc must be a str"):
        interleaved_timings(fns, rounds=1, desc=3)
