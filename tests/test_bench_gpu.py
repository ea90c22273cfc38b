"""`python -m moe_lib.bench gpu`: the dry run executes the whole benchmark's code on the CPU, writes a
labelled JSON elsewhere than benchmarks/gpu.json, and its report feeds the chapter's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lib.bench import gpu, main
from moe_lib.gpu import roofline
from moe_lib.viz import roofline as vr

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bench") / "gpu_dry.json"
    main(["gpu", "--dry-run", "--tokens", "1", "16", "--out", str(out)])
    return json.loads(out.read_text())


def test_dry_run_report(dry_report):
    assert dry_report["dry_run"] is True and dry_report["dtype"] == "bfloat16"
    assert dry_report["machine"]["device"].startswith("CPU") and dry_report["machine"]["date"]
    assert dry_report["ceilings"]["matmul"]["tflops"] > 0 and dry_report["ceilings"]["copy"]["gbps"] > 0
    assert [e["tokens"] for e in dry_report["results"]] == [1, 16]
    one, sixteen = dry_report["results"]
    assert set(one["modes"]) == {"forward"} and set(sixteen["modes"]) == {"forward", "forward_backward"}
    assert one["experts_hit"] == 8
    for entry in dry_report["results"]:
        assert entry["skipped"] == {"moe_lib:graph": "needs CUDA", "moe_lib:device+stream": "needs CUDA"}
        for mode in entry["modes"].values():
            assert set(mode["results"]) == {"moe_lib:device", "moe_lib:layer", *gpu.PEERS}
            for r in mode["results"].values():
                assert r["roofline_fraction"] == pytest.approx(mode["bound_ms"] / r["median_ms"])
                assert r["tflops"] == pytest.approx(mode["flops"] / r["median_ms"] / 1e9)


def test_dry_run_verified_every_implementation_against_float32(dry_report):
    checks = [dry_report["verification_4_tokens"]["forward"], dry_report["verification_4_tokens"][
        "forward_backward"]] + [c for e in dry_report["results"] for c in e["verification"].values()]
    assert all(r["ok"] for check in checks for r in check.values()), checks
    assert "d_experts" in dry_report["verification_4_tokens"]["forward_backward"]["moe_lib:device"]
    syncs = dry_report["host_syncs_16_tokens"]
    assert syncs["moe_lib:device"]["operations"] == [] and syncs["moe_lib:layer"]["operations"]


def test_dry_run_never_writes_the_gpu_results(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="never writes"):
        main(["gpu", "--dry-run", "--out", "benchmarks/gpu.json"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_real_run_needs_a_gpu():
    with pytest.raises(SystemExit, match="--dry-run"):
        main(["gpu"])


def test_summary_arithmetic_by_hand():
    cfg = gpu.LAYER
    times = {"moe_lib:device|forward": [2e-3, 1e-3, 3e-3], "transformers:eager|forward": [4e-3]}
    entry = gpu.summarize_tokens(cfg, 16, times, hits=100, peaks={"flops": 800e12, "bandwidth": 3e12})
    mode = entry["modes"]["forward"]
    n_bytes = 2 * (3 * 7168 * 2048 * 101 + 2 * 16 * 7168)
    assert mode["bytes"] == n_bytes and mode["bound_by"] == "bandwidth"
    assert mode["bound_ms"] == pytest.approx(1e3 * n_bytes / 3e12)
    assert mode["results"]["moe_lib:device"]["median_ms"] == pytest.approx(2.0)
    assert mode["results"]["moe_lib:device"]["gbps"] == pytest.approx(n_bytes / 2e-3 / 1e9)
    assert mode["best_ours"] == "moe_lib:device" and mode["speedup_vs_peers"]["transformers:eager"] == 2
    met = gpu.targets([entry])["16|forward"]
    assert met["fraction_target"] == 0.5 and met["faster_than_every_peer"]
    assert met["fraction_met"] == (roofline.expert_bytes(cfg, 16, 100) / 3e12 / 2e-3 >= 0.5)


def test_figures_from_the_dry_run_name_it(dry_report):
    fig = vr.results_figure(dry_report)
    assert "DRY RUN" in fig.layout.title.text
    names = {t.name for t in fig.data}
    assert "moe_lib:device (forward)" in names and "transformers:eager (forward+backward)" in names
    rows = vr.ladder_rows(dry_report)
    assert rows[0] == ["variant", "T = 1", "T = 16"]
    assert [r[0] for r in rows[1:]] == list(vr.LADDER) and rows[-1][1:] == ["-", "-"]
    assert "x)" in rows[2][1], "each step shows its speed-up over the previous one"
    assert vr.ladder_markdown(dry_report).splitlines()[1] == "| --- | --- | --- |"
    lines = vr.target_lines(dry_report)
    assert len(lines) == 3 and lines[0].startswith("T = 1 forward: moe_lib:")
