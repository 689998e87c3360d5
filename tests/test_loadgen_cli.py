"""The command line: clear argparse errors, and the simulator commands end to end (small and fast)."""

from __future__ import annotations

import json

import pytest

from loadgen import cli
from loadgen.metrics import RequestRecord
from loadgen.report import write_records


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--url", "http://h", "--rate", "-1"], "argument --rate: must be a positive number"),
        (["run", "--url", "http://h", "--rate", "x"], "argument --rate: expected a number"),
        (["run", "--url", "http://h"], "one of the arguments --rate --concurrency is required"),
        (
            ["run", "--url", "http://h", "--rate", "1", "--concurrency", "2"],
            "not allowed with argument --rate",
        ),
        (
            ["run", "--url", "http://h", "--concurrency", "0"],
            "argument --concurrency: must be an integer >= 1",
        ),
        (
            ["run", "--url", "http://h", "--rate", "1", "--input-len", "9:3"],
            "argument --input-len: length range",
        ),
        (
            ["run", "--url", "http://h", "--rate", "1", "--alpha", "-0.5"],
            "argument --alpha: must be a number >= 0",
        ),
        (["run", "--url", "http://h", "--rate", "1", "--cv", "2"], "--cv only applies to --arrival gamma"),
        (["run", "--url", "h:80", "--rate", "1"], "URL must start with http://"),
        (
            ["run", "--url", "http://h", "--rate", "1", "--models", "a", "--num-models", "2"],
            "either --models or --num-models",
        ),
        (["run", "--url", "http://h", "--rate", "1", "--models", "a", "a"], "model names must be distinct"),
        (
            ["run", "--url", "http://h", "--rate", "1", "--dataset", "/nonexistent.jsonl"],
            "--dataset: no such file",
        ),
        (
            ["sim", "run", "--rate", "1", "--num-models", "2", "--prefill-gpus", "1", "--decode-gpus", "1"],
            "--prefill-gpus: 1 GPUs cannot give 2 models at least 1 each",
        ),
        (
            [
                "sim",
                "run",
                "--rate",
                "1",
                "--policy",
                "partitioned",
                "--num-models",
                "2",
                "--prefill-gpus",
                "2",
                "--decode-gpus",
                "1,2,3",
            ],
            "--decode-gpus: give one total or one count per model",
        ),
        (
            ["sim", "run", "--rate", "1", "--prefill-gpus", "1", "--decode-gpus", "1", "--profile", "nope"],
            "--profile: no profile file",
        ),
        (["plot", "/nonexistent"], "no summary file"),
    ],
)
def test_bad_arguments_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sim_run_and_plot(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = cli.main(
        [
            "sim",
            "run",
            "--num-models",
            "3",
            "--alpha",
            "1",
            "--rate",
            "50",
            "100",
            "--duration",
            "10",
            "--num-requests",
            "100000",
            "--input-len",
            "64:512",
            "--output-len",
            "32:128",
            "--prefill-gpus",
            "4",
            "--decode-gpus",
            "2",
            "--tpot-slo-ms",
            "20",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    s = json.loads(out.read_text())
    assert [r["rate"] for r in s["runs"]] == [50.0, 100.0]
    for r in s["runs"]:
        assert r["overall"]["request_throughput"] == pytest.approx(r["rate"], rel=0.15)
        assert r["gpus"]["prefill"] == 4 and r["gpus"]["decode"] == 2
    assert "sun r=50" in capsys.readouterr().out
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "throughput_latency.png").exists()


def test_sim_validate_replays_a_live_run(tmp_path, capsys):
    """A hand-made 'live' run at 5 req/s on an idle cluster: the simulator, replaying it on a constant profile
    that matches the fake timings, reproduces TTFT and TPOT."""
    prof = {
        "format": "sunray-step-profile/1",
        "name": "flat",
        "source": "analytic",
        "device": "test",
        "date": "-",
        "model": "-",
        "kv_bytes_per_token": 1,
        "kv_capacity_tokens": 100000,
        "prefill": {"tokens": [1], "ms": [50.0]},
        "decode": {"batch": [1], "context": [1], "ms": [[10.0]]},
    }
    (tmp_path / "flat.json").write_text(json.dumps(prof))
    live = tmp_path / "live"
    live.mkdir()
    recs = []
    for i in range(20):
        t0 = i * 0.2
        chunks = [t0 + 0.05 + 0.01 * k for k in range(5)]
        recs.append(
            RequestRecord(
                i,
                f"m{i % 2}",
                "ok",
                scheduled_s=t0,
                sent_s=t0,
                first_token_s=chunks[0],
                end_s=chunks[-1],
                chunk_s=chunks,
                prompt_len=32,
                prompt_tokens=32,
                completion_tokens=5,
            )
        )
    write_records(live / "requests-rate-5.jsonl", recs)
    (live / "summary.json").write_text(json.dumps({"runs": [{"requests_file": "requests-rate-5.jsonl"}]}))
    out = tmp_path / "cmp.json"
    assert (
        cli.main(
            [
                "sim",
                "validate",
                "--live",
                str(live),
                "--profile",
                str(tmp_path / "flat.json"),
                "--prefill-gpus",
                "2",
                "--decode-gpus",
                "1",
                "--kv-link-gbps",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["metric"]: r for r in json.loads(out.read_text())["comparison"]}
    assert rows["ttft_ms p50"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert rows["tpot_ms p50"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert "sim/live" in capsys.readouterr().out
