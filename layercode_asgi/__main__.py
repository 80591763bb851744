"""``python -m layercode_asgi``: the ``layercode-asgi`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
