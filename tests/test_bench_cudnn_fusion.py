"""bench/cudnn_fusion_probe.cpp, the cuDNN runtime-fusion probe of bench/bench_cudnn_fusion.py, without a GPU: it
compiles against cuDNN's headers, every case's graph builds on the host (cuDNN finalizes each tensor and operation
descriptor), and the float64 references it judges cuDNN's outputs by agree with torch's convolution, its gradients
and BatchNorm's backward on the same inputs. Needs cuDNN's headers (torch's CUDA wheels ship them with the nvidia.cudnn
package; .ci/run takes them from the nvidia-cudnn-cu13 wheel, or $CUDNN_ROOT) and, for the references, its library."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_cudnn_fusion as probe  # noqa: E402

N, C_IN, C_OUT, SIZE = 2, 24, 16, 16  # the dump's shape (tests/cpp/cudnn_fusion_reference_dump.cpp)


def _cudnn():
    try:
        return probe.cudnn_paths(None)
    except probe.ProbeError as exc:
        pytest.skip(str(exc))


def _cuda_root():
    try:
        return probe.cuda_root()
    except probe.ProbeError as exc:
        pytest.skip(str(exc))


def test_probe_compiles(tmp_path):
    include, _ = _cudnn()
    _cuda_root()
    built = probe.build_probe(include, None, tmp_path / "probe", compile_only=True)
    assert built.is_file() and built.stat().st_size > 0


def _references(base: Path, r: int) -> dict[str, torch.Tensor]:
    """torch's float64 answers for one dumped case, from its dumped inputs (NHWC / KRSC as the probe stores them)."""
    name = base.name.rsplit("_r", 1)[0]
    roles = [line.split()[1] for line in base.with_suffix(".txt").read_text().splitlines() if line.startswith("in ")]
    ins = {role: torch.from_numpy(np.fromfile(f"{base}_in_{role}.bin", dtype=np.float32).astype(np.float64))
           for role in roles}
    dil = 4 if r == 3 else 1
    pad = dil * (r // 2)

    def nchw(t, c):
        return t.view(N, SIZE, SIZE, c).permute(0, 3, 1, 2)

    def flat(t):
        return t.permute(0, 2, 3, 1).reshape(-1)

    def channel(role):
        return ins[role].view(1, -1, 1, 1)

    w = ins["w"].view(C_OUT, r, r, C_IN).permute(0, 3, 1, 2)
    # the keep mask: a tensor of the graph ("m"), or drawn by the graph's RNG op ("keep", read back on a GPU)
    mask = "m" if "mask" in name else "keep" if "rng" in name else None
    if "dbnapply" in name:  # dy made in the prologue from the next block's gated gradient, activation and terms
        dy = nchw(ins["dy_g"], C_OUT) * channel("dy_eq_dy") + nchw(ins["dy_z"], C_OUT) * channel("dy_eq_x") \
            + channel("dy_eq_b")
    else:
        dy = nchw(ins["dy"], C_OUT) if "dy" in ins else None
    if name.startswith(("fprop", "wgrad")):
        a = nchw(ins["x"], C_IN)
        if "sbr" in name:
            a = torch.relu(a * channel("s") + channel("b"))
            if mask is not None:
                a = a * nchw(ins[mask], C_IN)
        if name.startswith("wgrad"):
            dw = torch.nn.grad.conv2d_weight(a, w.shape, dy, padding=pad, dilation=dil)
            return {"w": dw.permute(0, 2, 3, 1).reshape(-1)}
        y = F.conv2d(a, w, padding=pad, dilation=dil)
        if name == "fprop":
            return {"y": flat(y)}
        return {"y": flat(y), "sum": y.sum((0, 2, 3)), "sq_sum": (y * y).sum((0, 2, 3))}
    da = torch.nn.grad.conv2d_input((N, C_IN, SIZE, SIZE), w, dy, padding=pad, dilation=dil)
    if "dbn" not in name.replace("dbnapply", ""):  # dgrad alone (dx), without the ReLU + BN backward epilogue
        return {"dx": flat(da)}
    if mask is not None:
        da = da * nchw(ins[mask], C_IN)
    # BatchNorm with the given statistics, differentiated as torch's training BatchNorm is: mean and invstd are the
    # batch's, so dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))
    z = nchw(ins["z"], C_IN)
    g = da * ((z * channel("s") + channel("b")) > 0)
    xhat = (z - channel("mean")) * channel("invstd")
    dgamma, dbeta = (g * xhat).sum((0, 2, 3)), g.sum((0, 2, 3))
    count = N * SIZE * SIZE
    dz = channel("gamma") * channel("invstd") * (g - dbeta.view(1, -1, 1, 1) / count
                                                 - xhat * dgamma.view(1, -1, 1, 1) / count)
    return {"g": flat(g), "dgamma": dgamma, "dbeta": dbeta, "dz": flat(dz)}


def test_probe_references_agree_with_torch(tmp_path):
    include, lib = _cudnn()
    _cuda_root()
    if lib is None:
        pytest.skip(f"cuDNN's library (libcudnn.so.9) is not beside {include.parent}: the graphs cannot be built")
    binary = probe.build_probe(include, lib, tmp_path / "dump", compile_only=False,
                               source=ROOT / "tests" / "cpp" / "cudnn_fusion_reference_dump.cpp")
    out = tmp_path / "dump_out"
    out.mkdir()
    subprocess.run([str(binary), str(out)], check=True)
    cases = sorted(out.glob("*.txt"))
    assert len(cases) == 2 * 18  # 18 cases, 2 kernel sizes
    # the RNG masks' judge: two independent draws usable; a mask that repeats for another offset, or holds one value
    # for all channels of a pixel, not
    verdicts = (out / "judge_keep.verdicts").read_text().splitlines()
    assert verdicts[-1] == "verdicts 1 0 0", verdicts
    for index in cases:
        base = index.with_suffix("")
        r = int(base.name.rsplit("_r", 1)[1])
        expected = _references(base, r)
        refs = [line.split()[1] for line in index.read_text().splitlines() if line.startswith("ref ")]
        assert sorted(refs) == sorted(expected), base.name
        for name in refs:
            got = torch.from_numpy(np.fromfile(f"{base}_ref_{name}.bin", dtype=np.float64))
            want = expected[name].reshape(-1)
            assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want), f"{base.name} {name}"


def test_probe_timeout_keeps_finished_cases(tmp_path):
    """A probe run cut off by its time limit keeps the cases it printed; a half-written line is dropped."""
    fake = tmp_path / "probe"
    fake.write_text("#!/bin/sh\n"
                    "echo '{\"case\": \"fprop\", \"supported\": true, \"best_ms\": 1.5}'\n"
                    "printf '{\"case\": \"fprop_st'\n"
                    "exec sleep 30\n")
    fake.chmod(0o755)
    rows = probe.run_probe(fake, 2, "global", "bf16", reps=1, max_plans=1, timeout_s=1)
    assert rows[0] == {"case": "fprop", "supported": True, "best_ms": 1.5, "layer": "global"}
    assert len(rows) == 2 and "ran past 1 s" in rows[1]["error"]


def test_block_comparison_needs_all_three_fused_graphs_checked():
    torch_side = {"torch_conv_fwd_bwd": {"median_ms": 2.0}, "lgc_fast_epilogue_fwd_bwd": {"median_ms": 1.0}}
    rows = [{"case": c, "supported": True, "check_passed": True, "best_ms": ms}
            for c, ms in zip(probe.FUSED_BLOCK, (0.5, 0.75, 0.75))]
    block = probe.block_comparison(rows, torch_side)
    assert block["now_ms"] == 3.0 and block["fused_ms"] == 2.0 and block["speedup"] == 1.5
    rows[1]["check_passed"] = False  # a graph that computes the wrong thing does not count, however fast
    block = probe.block_comparison(rows, torch_side)
    assert block["fused_ms"] is None and block["fused_missing"] == [probe.FUSED_BLOCK[1]]
    assert "fused block unavailable (wgrad_sbr_rng_dbnapply)" in probe.summary_line("global", "bf16", rows, torch_side)


def test_a_run_of_other_layers_adds_to_the_results_file(tmp_path):
    out = tmp_path / "dev.cudnn_fusion.json"
    assert probe.earlier_entries(out) == []
    env = {"commit": "a"}
    first = [{"layer": "global", "dtype": "bf16", "batch": 128, "environment": env, "probe": []}]
    probe.write_results(out, "cudnn_fusion", {"environment": env, "entries": first})
    entries = probe.earlier_entries(out)
    assert entries == first
    local = {"layer": "local3", "dtype": "bf16", "batch": 128, "environment": {"commit": "b"}, "probe": []}
    rerun = {**first[0], "environment": {"commit": "c"}}
    merged = probe.merge_entry(probe.merge_entry(entries, local), rerun)
    assert [(e["layer"], e["environment"]["commit"]) for e in merged] == [("local3", "b"), ("global", "c")]
    out.write_text("[1, 2]")
    with pytest.raises(probe.ProbeError, match="not a results file"):
        probe.earlier_entries(out)


def test_deviceless_run_passes_the_described_device_and_records_what_built(tmp_path):
    """--device-json: the probe gets the device file, each layer's built cases are recorded under the described
    device's name; a file without a deviceName is refused in one line before anything runs."""
    device_json = ROOT / "bench" / "devices" / "nvidia-h100-80gb-hbm3.json"
    seen = tmp_path / "argv"
    fake = tmp_path / "probe"
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$@\" >> {seen}\n"
                    "echo '{\"case\": \"fprop\", \"supported\": true, \"plans_built\": 1}'\n"
                    "echo '{\"case\": \"fprop_sbr_stats\", \"supported\": false, \"error\": \"no\"}'\n")
    fake.chmod(0o755)
    args = argparse.Namespace(out=tmp_path / "out.json", dtypes=["fp16"], layers=["global", "local5"],
                              batch=8, reps=1, max_plans=1)
    out = probe.deviceless(fake, device_json, args)
    calls = seen.read_text().splitlines()
    assert len(calls) == 2 and all(f"--device-json {device_json}" in call for call in calls)
    payload = json.loads(out.read_text())["cudnn_fusion_deviceless"]
    assert payload["environment"]["described_device"] == "NVIDIA H100 80GB HBM3"
    assert [(e["layer"], e["built"]) for e in payload["entries"]] == [("global", ["fprop"]), ("local5", ["fprop"])]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(probe.ProbeError, match="not a device-properties file"):
        probe.deviceless(fake, bad, args)
