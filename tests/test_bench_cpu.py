"""`python -m moe_lib.bench cpu` on a tiny shape: one instruction-set level in its child process,
every implementation checked against `loop`, the JSON and the README tables."""

import json
from pathlib import Path

from moe_lib import native
from moe_lib.bench import main
from moe_lib.bench.cpu import BOUND, DEFAULT_PATH, MODES, PYTHON_TASKS, markdown, target_lines


def test_bench_cpu_tiny_shape_both_levels(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # a cap in the caller's environment
    out = tmp_path / "cpu.json"
    main(["cpu", "--tokens", "64", "--d-model", "32", "--d-expert", "16", "--reps", "1", "--warmup", "0",
          "--threads", "1", "--levels", "native", "avx2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["levels"]["native"]["isa"]["env"].values()) == {None}  # native runs uncapped
    assert report["levels"]["native"]["isa"]["aten_cpu_capability"].lower() != "default"
    level = report["levels"]["avx2"]
    assert level["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert level["isa"]["aten_cpu_capability"].lower() == "avx2"  # the cap took effect in the child
    assert "AVX2" in level["isa"]["onednn_isa"]
    run = level["runs"][0]
    assert run["tokens"] == 64 and run["config"]["d_model"] == 32 and run["threads"] == 1
    assert max(run["max_rel_error_vs_loop"].values()) < 1e-5
    ours = run["results"][DEFAULT_PATH]
    for mode in MODES:
        assert ours[mode]["tokens_per_s"] > 0 and ours[mode]["speedup_vs_best_transformers"] > 0
    assert "experts_strategies" in run
    built = native.ops() is not None
    assert level["isa"]["native_kernels"]["built"] == built
    assert (PYTHON_TASKS in run["results"]) == built  # the default path without the C++ kernels
    assert (BOUND in run["results"]) == built  # the layer's GEMMs alone
    if built:
        assert all(0 < ours[mode]["pct_of_gemm_bound"] for mode in MODES)
    lines = target_lines(report)
    assert len(lines) == 2 and lines[1].startswith("avx2, 64 tokens, H 32, I 16: forward ")
    assert ("Python tasks" in lines[1]) == built and ("GEMMs alone" in lines[1]) == built
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert report["machine"]["flags"]["avx2"] == (" avx2" in cpuinfo)
    table = markdown(report)
    assert f"| {DEFAULT_PATH} (default) |" in table and "| 64 tokens, H 32, I 16 |" in table
    assert "wrote" in capsys.readouterr().out


def test_time_rounds_takes_a_self_timed_tasks_own_time():
    """A task that returns a number (the balancing update, timed after an untimed forward+backward)
    counts that number, not the closure's whole time; the others are timed around the call."""
    import time

    from moe_lib.bench.cpu import time_rounds

    def slow_but_self_timed():
        time.sleep(0.02)
        return 0.001

    times = time_rounds({"own": slow_but_self_timed, "plain": lambda: time.sleep(0.01)}, reps=3, warmup=1)
    assert times["own"] == [0.001] * 3
    assert len(times["plain"]) == 3 and min(times["plain"]) >= 0.01
