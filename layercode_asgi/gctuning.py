"""LAYERCODE_GC_TUNING: the garbage collector's thresholds while an app runs with it."""

from __future__ import annotations

import gc
import threading

__all__ = ["YOUNG_GC_THRESHOLD", "tune_gc", "untune_gc"]

#: LAYERCODE_GC_TUNING: allocations between two young garbage collections (CPython: 700).
YOUNG_GC_THRESHOLD = 20_000
# The thresholds before the tuning, once per app running with it (see tune_gc).
_gc_tunings: list[tuple[int, int, int]] = []
_gc_lock = threading.Lock()


def tune_gc() -> None:
    """LAYERCODE_GC_TUNING, for the whole process: the first app to start tunes the
    collector, the last to stop (:func:`untune_gc`) undoes it."""
    # A full collection scans every live object and stops every open stream while it does. The app's
    # own objects (modules, routes, the agent) never die: frozen out of those passes. A turn's
    # objects die by reference counting, not by the collector: full passes may run a tenth as often.
    # Paced benchmark, one worker, interleaved rounds, p99 first-tts overhead: freezing, N=200 31 ->
    # 15 ms and N=800 85 -> 76 ms; then a tenth as many full passes, N=200 19 -> 11 ms and N=800 67
    # -> 38 ms. A young pass every 20,000 allocations instead of 700: an open turn's objects are
    # scanned (and promoted) far less often while they live, N=800 p99 52-79 -> 33-44 ms and server
    # CPU per turn 429-443 -> 366-405 µs (three interleaved rounds each).
    with _gc_lock:
        if _gc_tunings:
            _gc_tunings.append(_gc_tunings[0])
            return
        thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(max(thresholds[0], YOUNG_GC_THRESHOLD), thresholds[1], thresholds[2] * 10)
        _gc_tunings.append(thresholds)


def untune_gc() -> None:
    with _gc_lock:
        thresholds = _gc_tunings.pop()
        if not _gc_tunings:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
