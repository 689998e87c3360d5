"""Soak: mixed traffic with random client disconnects for a fixed time against a running server (loopback only),
sampling the server's KV and memory as it goes (issue 12, item 4).

    python -m experiments.soak --url http://127.0.0.1:8000 --minutes 20 --out results/soak

Clients (`--clients` loops, back to back) send chat and completion requests, streaming and not, to every model the
server lists, with random prompt and output lengths; a share of them (`--disconnect`) is abandoned mid-way: a
stream closed after a few chunks, a plain request cancelled before its answer. Each request ends as

- complete: a finish reason (and for streams a usage chunk and `[DONE]`);
- refused: 429 or 503 with Retry-After;
- disconnected: abandoned by the client on purpose;
- lost: anything else (an error status, an error event, a broken or truncated answer). The soak passes with 0.

Every `--sample-s` it records the server's `/sunray/status` (KV blocks used and queue depth per decode worker) and
the resident memory of the server's processes (found by their Ray process titles in /proc). After the traffic it
waits for the KV to drain and checks every block is free. Writes `soak.json` and `soak.png` (loadgen.plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp

from loadgen.plot import timeseries

PROCESS_TITLES = ("ray::ServeReplica:", "ray::DecodeWorker")


def _descendants(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        frontier += kids
    return out


def server_processes(server_pid: int | None = None) -> dict[str, int]:
    """Ray process title -> pid of the serving processes (titles carry the deployment name): the descendants of
    `server_pid` (the `sunray serve` or `serve run` process), or every such process on this machine."""
    mine = _descendants(server_pid) if server_pid else None
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (mine is not None and int(proc.name) not in mine):
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(PROCESS_TITLES):
            name = title.split()[0].removeprefix("ray::")
            found[name if name not in found else f"{name}#{proc.name}"] = int(proc.name)
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args: argparse.Namespace, models: list[str]) -> None:
        self.args, self.models = args, models
        self.rng = random.Random(args.seed)
        self.counts = {"complete": 0, "refused": 0, "disconnected": 0, "lost": 0}
        self.tokens = 0
        self.lost: list[str] = []  # the first few, for the report

    def _body(self) -> tuple[str, dict, bool]:
        chat, stream = self.rng.random() < 0.5, self.rng.random() < 0.6
        words = " ".join(
            self.rng.choice(["add", "the", "list", "of", "numbers", "7", "x", "call"])
            for _ in range(self.rng.randint(2, 120))
        )
        body = {
            "model": self.rng.choice(self.models),
            "max_tokens": self.rng.randint(1, 64),
            "stream": stream,
        }
        if self.rng.random() < 0.3:
            body["temperature"] = round(self.rng.uniform(0, 1.5), 2)
        if chat:
            body["messages"] = [{"role": "user", "content": words}]
        else:
            body["prompt"] = words
        return ("/v1/chat/completions" if chat else "/v1/completions"), body, stream

    async def one(self, session: aiohttp.ClientSession) -> None:
        path, body, stream = self._body()
        abandon_after = self.rng.randint(0, 5) if self.rng.random() < self.args.disconnect else None
        try:
            kind = await asyncio.wait_for(
                self._request(session, path, body, stream, abandon_after),
                timeout=self.args.request_timeout_s
                if abandon_after is None or stream
                else self.rng.uniform(0.05, 1),
            )
        except asyncio.TimeoutError:
            kind = "disconnected" if abandon_after is not None else "lost"
            if kind == "lost":
                self.lost.append(f"timeout after {self.args.request_timeout_s} s: {path}")
        except aiohttp.ClientError as e:
            kind = "lost"
            self.lost.append(f"{type(e).__name__}: {e}")
        self.counts[kind] += 1

    async def _request(self, session, path: str, body: dict, stream: bool, abandon_after: int | None) -> str:
        async with session.post(self.args.url + path, json=body) as r:
            if r.status in (429, 503) and r.headers.get("Retry-After"):
                await r.read()
                return "refused"
            if r.status != 200:
                self.lost.append(f"HTTP {r.status}: {(await r.text())[:200]}")
                return "lost"
            if not stream:
                answer = await r.json()
                if answer["choices"][0]["finish_reason"] in ("stop", "length"):
                    self.tokens += answer["usage"]["completion_tokens"]
                    return "complete"
                self.lost.append(f"finish {answer['choices'][0]['finish_reason']}")
                return "lost"
            finish, usage, done, chunks = None, None, False, 0
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    self.lost.append(f"error event: {event['error']}")
                    return "lost"
                chunks += 1
                if abandon_after is not None and chunks > abandon_after:
                    return "disconnected"  # leaving the `async with` closes the connection mid-stream
                if event.get("choices") and event["choices"][0].get("finish_reason"):
                    finish = event["choices"][0]["finish_reason"]
                usage = event.get("usage") or usage
            if done and finish in ("stop", "length") and usage:
                self.tokens += usage["completion_tokens"]
                return "complete"
            self.lost.append(f"stream ended: done={done} finish={finish} usage={usage}")
            return "lost"

    async def client(self, session, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one(session)


async def status(session, url: str) -> dict:
    async with session.get(f"{url}/sunray/status", timeout=aiohttp.ClientTimeout(total=10)) as r:
        return await r.json()


async def run(args: argparse.Namespace) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(f"{args.url}/v1/models") as r:
            models = [m["id"] for m in (await r.json())["data"]]
        soak, procs = Soak(args, models), server_processes(args.server_pid)
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        clients = [asyncio.create_task(soak.client(session, deadline)) for _ in range(args.clients)]
        samples: list[dict] = []
        last_tokens = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(args.sample_s)
            s = await status(session, args.url)
            workers = s["router"]["workers"]
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    **soak.counts,
                    "tok_s": round((soak.tokens - last_tokens) / args.sample_s, 1),
                    "kv_used": {w: v["kv_blocks_total"] - v["kv_blocks_free"] for w, v in workers.items()},
                    "queue_depth": {w: v["queue_depth"] for w, v in workers.items()},
                    "rss_mb": {name: rss_mb(pid) for name, pid in procs.items()},
                }
            )
            last_tokens = soak.tokens
            print(f"{samples[-1]['t_s']:7.0f} s {soak.counts} {samples[-1]['tok_s']} tok/s", flush=True)
        await asyncio.gather(*clients)
        # Drained: once the last requests are gone, every KV block is free again.
        drain_deadline, drained = time.monotonic() + 30, None
        while time.monotonic() < drain_deadline:
            workers = (await status(session, args.url))["router"]["workers"]
            if all(
                v["queue_depth"] == 0 and v["kv_blocks_free"] == v["kv_blocks_total"]
                for v in workers.values()
            ):
                drained = round(time.monotonic() - deadline, 1)
                break
            await asyncio.sleep(0.5)
    rss = {name: [s["rss_mb"][name] for s in samples if s["rss_mb"].get(name)] for name in procs}
    return {
        "command": "python -m experiments.soak " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d"),
        "url": args.url,
        "minutes": args.minutes,
        "clients": args.clients,
        "disconnect_share": args.disconnect,
        "counts": soak.counts,
        "requests": sum(soak.counts.values()),
        "tokens": soak.tokens,
        "lost_examples": soak.lost[:10],
        "kv_drained_after_s": drained,
        "rss_mb_first_last": {n: (v[0], v[-1]) for n, v in rss.items() if v},
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--clients", type=int, default=8, help="concurrent request loops")
    p.add_argument("--disconnect", type=float, default=0.2, help="share of requests abandoned mid-way")
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--sample-s", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-pid", type=int, default=None, help="sample the memory of this process tree only")
    p.add_argument("--out", default="results/soak")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("the soak sends traffic to loopback addresses only")
    report = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    timeseries(report, out / "soak.png")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    ok = report["counts"]["lost"] == 0 and report["kv_drained_after_s"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
