"""`serve run CONFIG` on a fresh local Ray instance of its own, for experiments on a shared machine, and
`ServeProcess`, the experiments' handle on such a server (start, wait until ready, stop by pid).

    RAY_AUTH_MODE=disabled python -m experiments.serve_local deployments/experiments/serving-cpu-sun-1.yaml

Why not plain `serve run`: without `--address` it joins the Ray instance named in /tmp/ray/ray_current_cluster,
which on a shared machine is whoever started Ray last (their Serve apps, their cluster). And on a heavily loaded
host Ray's node start gives up after a fixed 30 s ("The current node timed out during startup"), so this retries
it. It starts Ray with address="local", no dashboard (8265 belongs to whoever took it first), then hands over to
`serve run`'s own code, which blocks and shuts Serve and Ray down on SIGINT. SIGTERM does the same here, and
SIGINT works even when a non-interactive shell started this in the background (which sets SIGINT to ignored).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def start_ray(attempts: int = 4) -> None:
    import ray

    for i in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, namespace="serve")
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a slow node start
            print(f"serve_local: ray.init attempt {i}/{attempts} failed: {e}", file=sys.stderr, flush=True)
            ray.shutdown()
            _kill_children()  # a failed start leaves its GCS, dashboard and monitors running
            if i == attempts:
                raise
            time.sleep(5)


def _kill_children() -> None:
    import psutil

    kids = psutil.Process().children(recursive=True)
    for p in kids:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    psutil.wait_procs(kids, timeout=10)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m experiments.serve_local CONFIG.yaml", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)  # `serve run` shuts Serve and Ray down on KeyboardInterrupt
    start_ray()
    from ray.serve.scripts import run

    run.main([argv[0]], standalone_mode=False)  # blocks until SIGINT or SIGTERM
    return 0


# -- the experiments' side: one server process -------------------------------------------------------------------------
def session_procs(sid: int) -> list:
    """Every process of session `sid` (the launcher was started with setsid, so its session id is its pid)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                out.append(p)
    return out


def http_json(port: int, path: str, timeout: float = 10.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def port_free(port: int) -> bool:
    """Whether a server could bind 127.0.0.1:port now (SO_REUSEADDR, as uvicorn binds: TIME-WAIT is no obstacle)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def complete(port: int, model: str, max_tokens: int = 4, timeout: float = 300.0) -> None:
    """One short completion of exactly `max_tokens` tokens (raises if it is not)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": "Hello there",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    if out["usage"]["completion_tokens"] != max_tokens:
        raise RuntimeError(f"warm-up request to {model} returned {out['usage']}")


def warm(port: int, model: str, timeout_s: float) -> None:
    """One short completion, retried while the ingress answers 503 (a model still loading)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return complete(port, model)
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(2)


class ServeProcess:
    """`serve run YAML` under this module (a Ray instance of its own) in a session of its own, on 127.0.0.1:port;
    ready when every model is listed, the router sees every decode worker, no model is loading, and each model
    answered a warm-up request. stop(): SIGINT (Serve and Ray shut down), then SIGTERM, then every process left in
    the session, by pid (nothing is stopped by name: other Ray clusters on the machine stay up)."""

    def __init__(
        self,
        name: str,
        yaml_path: Path,
        out: Path,
        models: list[str],
        workers: int,
        port: int,
        *,
        stop_wait_s: float = 20.0,
    ) -> None:
        self.name, self.yaml, self.out = name, str(yaml_path), out
        self.models, self.workers, self.port, self.stop_wait_s = list(models), workers, port, stop_wait_s
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Seconds until ready; raises (with the log's path) if the server exits or is not ready in time."""
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is taken: another server is running there")
        self.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        t0 = time.monotonic()
        logf = open(self.out / "serve.log", "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.serve_local", self.yaml],
            cwd=ROOT,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a shell that started us in the background may have set SIGINT to ignored; serve run needs it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        log(f"{self.name}: started {self.yaml} (launcher pid {self.proc.pid})")
        deadline = t0 + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: the server exited ({self.proc.returncode}); see {self.out}/serve.log"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: not ready within {timeout_s:.0f} s; see {self.out}/serve.log"
                )
            with contextlib.suppress(Exception):
                listed = {m["id"] for m in http_json(self.port, "/v1/models")["data"]}
                status = http_json(self.port, "/sunray/status")
                live, loading = status["router"]["live"], status.get("loading", [])
                if listed == set(self.models) and len(live) == self.workers and not loading:
                    break
            time.sleep(2)
        for m in self.models:  # every prefill replica and the decode path answer before the clock starts
            warm(self.port, m, max(30.0, deadline - time.monotonic()))
        ready = time.monotonic() - t0
        log(f"{self.name}: ready after {ready:.0f} s ({self.workers} decode workers)")
        return ready

    def decode_worker_env(self, var: str) -> dict[str, str | None]:
        """`var` in the environment of each decode worker process (pid -> value): proof of what MPS share it got."""
        out: dict[str, str | None] = {}
        if self.proc is None:
            return out
        for p in session_procs(self.proc.pid):
            with contextlib.suppress(Exception):
                if "DecodeWorker" in " ".join(p.cmdline()):
                    out[str(p.pid)] = p.environ().get(var)
        return out

    def status(self, path: Path) -> dict | None:
        """/sunray/status, also written to `path`; None (logged) if the server does not answer."""
        try:
            s = http_json(self.port, "/sunray/status", timeout=20)
        except Exception as e:  # noqa: BLE001 - a report without it is still a report
            log(f"{self.name}: no /sunray/status: {e}")
            return None
        path.write_text(json.dumps(s, indent=1) + "\n")
        return s

    def stop(self) -> None:
        if self.proc is None:
            return
        import psutil

        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.stop_wait_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {self.stop_wait_s:.0f} s after SIGINT; SIGTERM")
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=20)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = session_procs(sid)
            if not left:
                break
            log(f"{self.name}: {len(left)} processes of the session left; {sig.name} to each by pid")
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            psutil.wait_procs(left, timeout=10)
        for _ in range(30):
            if port_free(self.port):
                break
            time.sleep(1)
        self.proc = None
        log(f"{self.name}: stopped")


if __name__ == "__main__":
    sys.exit(main())
