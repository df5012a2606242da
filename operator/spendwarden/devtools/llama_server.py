"""A real llama.cpp upstream for tests and the demo: xllamacpp's OpenAI-compatible server on the tiny GGUF model.

The server runs in a child process (`python -m spendwarden.devtools.llama_server`) so that a crash or a stuck native
thread cannot take the test process down, and stopping it is a plain SIGTERM. The model is the tiny
random-weight one from `spendwarden.devtools.tiny_gguf`: gibberish text, but real tokenization and
real usage numbers, in well under a second per request.

    with LlamaServer() as llama:
        OpenAI(base_url=llama.openai_url, api_key="none").chat.completions.create(model=llama.model, ...)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_ALIAS = "tiny-llama"


def xllamacpp_available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """Start/stop the llama.cpp server on a free 127.0.0.1 port.

    model_path: a GGUF file; default: the tiny model, written into a temporary directory.
    ctx: context tokens per slot; parallel: slots (concurrent requests); threads: CPU threads.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, alias: str = DEFAULT_ALIAS,
                 ctx: int = 512, parallel: int = 2, threads: int = 1, startup_timeout: float = 60.0,
                 workdir: str | os.PathLike[str] | None = None):
        self.model_path = Path(model_path) if model_path else None
        self.model = alias
        self.ctx = ctx
        self.parallel = parallel
        self.threads = threads
        self.startup_timeout = startup_timeout
        self._workdir = Path(workdir) if workdir else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> LlamaServer:
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="spendwarden-llama-")
            self._workdir = Path(self._tmp.name)
        self._workdir.mkdir(parents=True, exist_ok=True)
        if self.model_path is None:
            from spendwarden.devtools.tiny_gguf import write

            self.model_path = write(self._workdir / "tiny.gguf")
        self.port = _free_port()
        self.log_path = self._workdir / f"llama-{self.port}.log"
        cmd = [sys.executable, "-m", "spendwarden.devtools.llama_server", "--model", str(self.model_path), "--port", str(self.port),
               "--alias", self.model, "--ctx", str(self.ctx), "--parallel", str(self.parallel),
               "--threads", str(self.threads)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not listening yet, or loading (503)
            time.sleep(0.05)
        raise TimeoutError(f"llama server not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._workdir = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(argv: list[str]) -> int:
    """Child process: run the server until SIGTERM/SIGINT."""
    import threading

    import xllamacpp as xlc

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a Pod, where the Service connects from outside")
    p.add_argument("--alias", default=DEFAULT_ALIAS)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-tiny-model", action="store_true",
                   help="write the tiny GGUF model to --model first (a Pod has no test process to make it)")
    args = p.parse_args(argv)
    if args.write_tiny_model:
        from .tiny_gguf import write

        write(args.model)

    params = xlc.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx * args.parallel  # the context is split evenly between the slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.warmup = False  # the tiny model needs none; saves start-up time
    params.offline = True  # never reach for a model hub

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = xlc.Server(params)  # starts serving HTTP at once
    print(f"llama server on {server.listening_address}", flush=True)
    while not stop.wait(0.2):
        pass
    del server  # the destructor stops the HTTP server and the main loop
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
