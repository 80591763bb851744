"""Time the reference implementation's event decoding in the reference's own venv.

bench_decode.py starts ``<benchmarks/.ref-venv>/bin/python ref_decode.py`` and drives it
over stdin/stdout, one JSON document per line::

    <- {"bodies": {case: body text}, "sample": seconds, "gc": true}
    -> {"versions": {...}, "decoded": {case: the reference's reading, as JSON}}
    <- "round"                      (as many times as there are rounds)
    -> {"case|ref": ns, "case|floor": ns, ...}
    <- "stop"

``ref`` is how the reference's server reads a webhook body: ``json.loads``, then
``layercode_create_app.sdk.events.parse_webhook_payload``, imported from the installed
package. ``floor`` is ``msgspec.json.decode`` to dicts, which bench_decode.py also times in
our interpreter: the common baseline that makes the two processes' timings comparable.
Nothing of the reference is copied here; only its public function is called.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgspec
from layercode_create_app.sdk.events import parse_webhook_payload

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decode_timing import Timers


def ref_parse(raw: bytes) -> Any:
    return parse_webhook_payload(json.loads(raw))


def main() -> int:
    config = json.loads(sys.stdin.readline())
    raws = {case: text.encode() for case, text in config["bodies"].items()}
    decoded = {
        case: ref_parse(raw).model_dump(mode="json", exclude_none=True)
        for case, raw in raws.items()
    }
    fns = {"ref": ref_parse, "floor": msgspec.json.decode}
    timers = Timers(raws, fns, sample=config["sample"], gc_enabled=config["gc"])
    versions = {
        "python": platform.python_version(),
        "layercode-create-app": version("layercode-create-app"),
        "pydantic": version("pydantic"),
        "msgspec": msgspec.__version__,
    }
    print(json.dumps({"versions": versions, "decoded": decoded}), flush=True)
    for line in sys.stdin:
        if line.strip() != '"round"':
            break
        sample = {f"{case}|{name}": ns for (case, name), ns in timers.round().items()}
        print(json.dumps(sample), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
