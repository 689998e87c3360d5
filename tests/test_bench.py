"""`sunray bench decode`: the floor it divides by and the kernel profile it prints (on the CPU here; the same code
profiles CUDA graph replays on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from sunray.bench import bench_decode, decode_floor_ms, kernel_family
from sunray.models.presets import dummy_model


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return dummy_model("tiny-llama", device="cpu", dtype=torch.float32)


def test_row_divides_by_its_floor_and_profiles_the_step(lm):
    r = bench_decode(lm, batch=2, context=16, steps=3, warmup=1, bandwidth=1e10, kernels=True)
    assert r["floor_ms"] == pytest.approx(decode_floor_ms(lm, 2, 16, 1e10), abs=1e-3)
    assert r["step_over_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"], rel=0.01)
    prof = r["kernel_profile"]
    assert prof["source"] == "forward (CPU operators)" and prof["steps"] == 3
    fams = prof["families"]
    # every layer's q/k/v, o, gate/up and down projections (fused or not) plus the LM head are matmuls
    assert fams["matmul"]["launches"] >= lm.config.num_layers * 3 + 1
    assert sum(f["launches"] for f in fams.values()) == pytest.approx(prof["launches"], abs=0.5)
    assert sum(f["share"] for f in fams.values()) == pytest.approx(1.0, abs=0.01)
    assert 0 < prof["kernel_us"] <= prof["wall_us"] * 1.05 and prof["gap_us"] is None
    assert prof["top"] and prof["top"][0]["us"] >= prof["top"][-1]["us"]


@pytest.mark.parametrize(
    "name, family",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4>", "matmul"),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "matmul"),
        ("nvjet_hsh_128x64_64x6_1x1_v_bz_TNN", "matmul"),
        ("_w4a16_kernel", "int4 matmul"),
        (
            "void at::native::tinygemm_m16n8k16_chunk_kernel<at::native::KReductionType(0), 32, 8>",
            "int4 matmul",
        ),
        ("_paged_decode_kernel", "attention"),
        ("_merge_splits_kernel", "attention"),
        ("_store_kv_kernel", "kv store"),
        ("_rms_norm_kernel", "norm"),
        ("_rope_kernel", "rope"),
        ("_silu_mul_kernel", "silu*mul"),
        (
            "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>",
            "sampler",
        ),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<long>>", "copy/fill"),
        ("some_new_kernel", "other"),
    ],
)
def test_kernel_families(name, family):
    assert kernel_family(name) == family


def test_bench_prints_what_the_int4_tuner_chose(monkeypatch, capsys):
    """Each (M bucket, weight) the tuner timed: one line with the kernel chosen, its time, and how many were timed."""
    from sunray.cli import _int4_tuning
    from sunray.models import int4

    runs = [
        {
            "m": 16,
            "n": 6144,
            "k": 4096,
            "group": 128,
            "force": None,
            "choice": "tinygemm",
            "ms": {"tinygemm": 0.0312, "triton bm=16 bn=128 split=4 warps=4 stages=3 after": 0.0405},
        }
    ]
    monkeypatch.setattr(int4, "TUNING", runs)
    assert _int4_tuning() == runs
    err = capsys.readouterr().err
    assert "# int4 M=16 [6144 x 4096] g128: tinygemm 0.0312 ms (of 2 timed; slowest 0.0405 ms)" in err


def test_overlapped_row_says_so_and_times_steps_back_to_back(lm):
    r = bench_decode(lm, batch=2, context=16, steps=3, warmup=1, bandwidth=1e10, overlap_steps=True)
    assert r["overlap_steps"] is True and r["back_to_back_ms"] > 0 and r["ms_per_step"] > 0


def test_sampler_bench_times_every_case_on_each_batch(tmp_path, capsys):
    import json

    from sunray.bench import SAMPLER_CASES
    from sunray.cli import main

    out = tmp_path / "sampler.json"
    args = ["bench", "sampler", "--shape", "tiny-llama", "--batch-sizes", "1", "4", "--steps", "2"]
    assert main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["sampler"]
    assert [(r["batch"], r["case"]) for r in rows] == [(b, c) for b in (1, 4) for c in SAMPLER_CASES]
    assert all(r["ms"] > 0 and r["vocab"] == 49152 and r["logits"] == "random ids" for r in rows)
    printed = capsys.readouterr().out
    assert "temperature 0.7, top-p 0.9" in printed and printed.count("\n") == 1 + len(rows)
