"""`serve run CONFIG` on a fresh local Ray instance of its own, for experiments on a shared machine.

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
import signal
import sys
import time


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


if __name__ == "__main__":
    sys.exit(main())
