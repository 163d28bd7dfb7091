"""Start a real ``tritonserver`` on a model repository, wait until it is ready, stop it cleanly.

By default the server is the one the set-up installs (PyPI ``nvidia-pytriton``, which carries
tritonserver 2.51 with the Python backend); ``tritonserver=`` names another binary, e.g. the one in
NVIDIA's Triton container, whose own backends are then used.
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from .errors import DRAIN_ID_ENV

DRAIN_TIMEOUT_S = 1.5  # the drain before SIGTERM, at most
STOP_GRACE_S = 8.0  # SIGTERM to SIGKILL: with the drain, the server is gone within 10 s
EXIT_TIMEOUT_S = 7  # tritonserver's own wait for connections, in-flight requests and the unload (Python stubs
# take seconds each to exit on a busy CPU), within the grace
HTTP_MAX_INPUT_BYTES = 8 * 1024 * 1024  # passed where the binary knows --http-max-input-size (not 2.51)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: run build_scripts/setup.sh, or pass --tritonserver")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def prepare_backends() -> Path:
    """A backend directory whose Python backend stub matches this interpreter (idempotent)."""
    root = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"no Triton Python backend stub for Python {version} in {stub.parent.parent}")
    target = Path(sys.prefix) / "triton_backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (stub, root / "backends" / "python" / "libtriton_python.so",
                root / "backends" / "python" / "triton_python_backend_utils.py"):
        dst = target / src.name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target.parent


def server_env() -> dict[str, str]:
    """Environment for tritonserver and perf_analyzer: this venv first, their shared libraries found."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    site = pytriton_root().parent
    libs = [str(site / "nvidia_pytriton.libs"), str(site / "nvidia" / "cuda_runtime" / "lib")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def check_tools() -> list[str]:
    """Run ``tritonserver --help`` and ``perf_analyzer --version``: both must load and answer."""
    found = []
    for cmd, expect in (([str(tritonserver_binary()), "--help"], "Usage: tritonserver"),
                        ([str(Path(sys.executable).parent / "perf_analyzer"), "--version"], "Perf Analyzer Version")):
        run = subprocess.run(cmd, capture_output=True, text=True, env=server_env())
        output = run.stdout + run.stderr
        line = next((ln for ln in output.splitlines() if expect in ln), None)
        if line is None:  # tritonserver --help exits 1 by design: judge by what it prints
            raise RuntimeError(f"{Path(cmd[0]).name} does not run:\n{output[-2000:]}")
        found.append(f"{Path(cmd[0]).name} runs: {line.strip()}")
    return found


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    drain_id: str = ""
    started_s: float = field(default=0.0)
    drained: list[str] = field(default_factory=list)  # the decoding models the last stop drained

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def metrics(self) -> dict[str, float]:
        """The server's ``specinfer_*`` samples, keyed as Prometheus prints them: ``name{labels}``."""
        with urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        samples = (line.rsplit(" ", 1) for line in lines if line.startswith("specinfer_"))
        return {key: float(value) for key, value in samples}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> list[str]:
        """Have every decoding model (a model with a ``stop`` input) fail its requests in flight with
        UNAVAILABLE and refuse new ones; returns the models that confirmed within ``timeout``.

        Triton 2.51 waits ``--exit-timeout-secs`` for requests in flight and then crashes in its exit
        path (SIGSEGV in malloc_consolidate) while gRPC streams to an ensemble, the BLS model or the
        unary model are still open; drained first, it has nothing to wait for and exits with code 0.
        """
        end = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            names = [m.name for m in client.get_model_repository_index(client_timeout=timeout).models
                     if m.state == "READY"]
            decoders = [n for n in names if any(i.name == "stop" for i in client.get_model_config(
                n, client_timeout=max(end - time.monotonic(), 0.1)).config.input)]
            done: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: done.put(error is None))
            for name in decoders:
                stop = grpcclient.InferInput("stop", [1, 1], "BOOL")
                stop.set_data_from_numpy(np.array([[True]]))
                client.async_stream_infer(name, [stop], request_id=self.drain_id, enable_empty_final_response=True)
            confirmed = sum(done.get(timeout=max(end - time.monotonic(), 0.1)) for _ in decoders)
            return decoders[:confirmed]
        except Exception:  # not serving any more, or too slow: SIGTERM and the grace still stop it
            return []
        finally:
            client.close()

    def stop(self, grace: float = STOP_GRACE_S, drain: bool = True) -> int:
        """Drain the decoding models, SIGTERM, then after ``grace`` seconds SIGKILL to tritonserver and
        its stubs (its process group), should it still run: its sockets close then, so every client
        still connected gets an error instead of waiting forever."""
        if self.process.poll() is None:
            self.drained = self.drain() if drain else []
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs left behind by a crash go too
        return self.process.wait()


def start_server(
    model_repository: str | Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
    tritonserver: str | None = None, log_path: str | Path | None = None, ready_timeout: float = 300,
    extra_args: tuple[str, ...] = (), exit_timeout: int = EXIT_TIMEOUT_S,
) -> Server:
    """Start tritonserver (ports 0 = any free port) and return once it reports ready."""
    repo = Path(model_repository).resolve()
    if not repo.is_dir():
        raise RuntimeError(f"model repository {repo} does not exist")
    ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
    if tritonserver:
        cmd = [tritonserver]
    else:
        cmd = [str(tritonserver_binary()), f"--backend-directory={prepare_backends()}"]
    cmd += [f"--model-repository={repo}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
            f"--metrics-port={ports[2]}", "--allow-metrics=true", "--allow-cpu-metrics=true",
            f"--exit-timeout-secs={exit_timeout}", *http_limits(cmd[0]),
            f"--backend-config=python,shm-region-prefix-name=specinfer_{ports[0]}_",  # servers side by side
            *extra_args]
    log = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"tritonserver-{ports[0]}.log"
    start = time.monotonic()
    drain_id = uuid.uuid4().hex
    with open(log, "w") as out:  # its own process group: Ctrl-C reaches the launcher, which stops it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env() | {DRAIN_ID_ENV: drain_id},
                                start_new_session=True)
    server = Server(proc, *ports, log, drain_id)
    try:
        wait_ready(server, start + ready_timeout)
    except BaseException:  # not ready, or the launcher was told to stop: leave no server behind
        server.stop(drain=False)  # nothing is in flight yet
        raise
    server.started_s = time.monotonic() - start
    return server


def wait_ready(server: Server, deadline: float) -> None:
    url = f"http://localhost:{server.http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {server.process.returncode}; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tritonserver not ready in time; log {server.log_path}:\n{server.log_tail()}")


def http_limits(binary: str) -> list[str]:
    """A cap on HTTP request bodies where the server has one: 2.51 has none (see README)."""
    run = subprocess.run([binary, "--help"], capture_output=True, text=True, env=server_env())
    return [f"--http-max-input-size={HTTP_MAX_INPUT_BYTES}"] if "--http-max-input-size" in run.stdout + run.stderr else []
