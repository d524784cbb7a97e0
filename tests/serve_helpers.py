"""A real ``oxigaf serve`` process on 127.0.0.1 for the serve tests (tests/test_serve*.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Gradio and its client must not phone home, in the server and in the tests.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(root: Path, *args: str, module: str = "oxigaf.serve"):
    """Start ``python -m oxigaf.serve`` (or ``module``, e.g. ``oxigaf.cli serve``) with outputs under
    ``root``; yield (url, root, process); stop it."""
    port = free_port()
    log = open(root.parent / f"{root.name}-server.log", "w+")
    cmd = [sys.executable, "-m", *module.split(), "--backend", "torch", "--port", str(port), "--output", str(root),
           *args]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"oxigaf serve exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"oxigaf serve did not answer within {START_TIMEOUT_S} s:\n{log.read()}")
            time.sleep(0.5)
        yield url, root, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_log(root: Path) -> str:
    return (root.parent / f"{root.name}-server.log").read_text()


def drain(job) -> list:
    """The status updates a finished gradio_client job received (logs, progress), oldest first."""
    updates = []
    q = job.communicator.updates
    while not q.empty():
        updates.append(q.get_nowait())
    return updates
