"""Timing helpers shared by bench_decode.py and reference/ref_decode.py (standard library only).

Both interpreters -- ours and the reference's own venv -- time their decoders with these,
so that their numbers are taken the same way.
"""

from __future__ import annotations

import gc
import timeit
from collections.abc import Callable


def calibrate(timer: timeit.Timer, sample: float) -> int:
    """Loop count for one timing sample of about *sample* seconds."""
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= sample / 5 or number >= 10**7:
            return max(1, round(number * sample / max(elapsed, 1e-9)))
        number *= 10


class Timers:
    """One :class:`timeit.Timer` per (case, decoder); :meth:`round` samples each once.

    ``stmt`` is a string so the loop calls the decoder directly (no lambda frame per call).
    With *gc_enabled* the cyclic GC stays on while timing, as in a server; plain ``timeit``
    switches it off.
    """

    def __init__(
        self,
        raws: dict[str, bytes],
        fns: dict[str, Callable[[bytes], object]],
        *,
        sample: float,
        gc_enabled: bool,
    ) -> None:
        setup = "gc.enable()" if gc_enabled else "pass"
        self.timers = {
            (case, name): timeit.Timer(
                "fn(raw)", setup=setup, globals={"fn": fn, "raw": raw, "gc": gc}
            )
            for case, raw in raws.items()
            for name, fn in fns.items()
        }
        self.numbers = {key: calibrate(timer, sample) for key, timer in self.timers.items()}

    def round(self) -> dict[tuple[str, str], float]:
        """ns/op of every (case, decoder), timed back to back."""
        return {
            key: timer.timeit(self.numbers[key]) / self.numbers[key] * 1e9
            for key, timer in self.timers.items()
        }
