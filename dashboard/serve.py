"""Run this dashboard on 127.0.0.1 for a real-browser test or a screenshot tool, and stop it afterwards.

    with local_dashboard({"KCORE_RUNS_DIR": runs}) as url:
        page.goto(url)

The server is started the way the README says (headless, bound to 127.0.0.1, no usage statistics); Debian's
Chromium drives it through Playwright (never ``playwright install``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Debian's chromium, the browser the tests and tools drive
CHROMIUM = Path("/usr/bin/chromium")
#: flags for a headless Chromium in a container without a network
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_dashboard(env: Mapping[str, str] | None = None, *, port: int | None = None, log: Path | None = None,
                    timeout: float = 90.0) -> Iterator[str]:
    """Start ``streamlit run dashboard/app.py`` on 127.0.0.1 and yield its URL once its health check answers.

    Args:
        env: variables added to this process's environment (e.g. ``KCORE_RUNS_DIR``).
        port: the port (default: a free one).
        log: file for the server's output (default: discarded).
        timeout: seconds to wait for the server to answer.

    Yields:
        ``http://127.0.0.1:PORT``.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` (with the end of its log).
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log).read_text()[-2000:] if log else "(no log kept)"
                raise RuntimeError(f"streamlit did not start on {url} within {timeout:.0f} s: {tail}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_idle(page: Any, timeout_ms: int = 90_000) -> None:
    """Wait until the Streamlit page in Playwright's ``page`` has finished its rerun (no status widget)."""
    time.sleep(0.5)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
