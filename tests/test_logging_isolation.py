"""Issue 14 item 15: no "Logging error ... I/O operation on closed file" after a test.

Every ``uvicorn.Config`` runs ``logging.config.dictConfig``, which binds uvicorn's handlers
to the ``sys.stderr`` of that moment. Inside a test that captures output (``capsys``, e.g.
the in-process demo or ``simulate`` against ``serve()``) that is the test's capture
stream, closed when the test ends; the next uvicorn record -- a later test's, or a server
thread's still stopping -- then printed a traceback. The suite's autouse fixture
(conftest ``_isolate_library_logging``) restores those loggers after each test and fails
a test that leaves any logger writing to a closed stream. This runs the situation in a
separate pytest session with the suite's conftest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INNER_TESTS = """
import logging

import pytest
import uvicorn


async def app(scope, receive, send):
    pass


def test_uvicorn_configured_while_output_is_captured(capsys: pytest.CaptureFixture[str]) -> None:
    uvicorn.Config(app, log_level="warning")  # what serve() and the in-process demo do
    logging.getLogger("uvicorn.error").warning("inside the test")
    assert "inside the test" in capsys.readouterr().err


def test_a_uvicorn_record_after_that_test_ended() -> None:
    logging.getLogger("uvicorn.error").warning("a late record")


def test_litestar_configured_while_output_is_captured(capsys: pytest.CaptureFixture[str]) -> None:
    from litestar import Litestar  # puts a queue handler (with a listener thread) on root

    Litestar([])
    logging.getLogger("layercode_asgi.inner").warning("inside the litestar test")


def test_a_library_record_after_the_litestar_test_ended() -> None:
    logging.getLogger("layercode_asgi.inner").warning("a late library record")
    for handler in logging.getLogger().handlers:  # let a queue listener write it now
        listener = getattr(handler, "listener", None)
        if listener is not None:
            listener.stop()
"""


def test_no_logging_error_after_a_capturing_test_configured_uvicorn(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "4 passed" in output
    assert "Logging error" not in output and "closed file" not in output, output
