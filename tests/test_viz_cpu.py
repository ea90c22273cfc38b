from moe_lib.viz.cpu import cpu_benchmark_figure, shape_label


def fake_run(tokens: int, fwd: float, fb: float) -> dict:
    entry = lambda s: {"speedup_vs_best_transformers": s, "pct_of_dense": 50.0 * s, "tokens_per_s": 1.0}  # noqa: E731
    return {"tokens": tokens, "config": {"d_model": 256, "d_expert": 128},
            "target": {"speedup": 1.3, "pct_of_dense_forward_backward": 75.0},
            "results": {"moe_lib:grouped": {"forward": entry(fwd), "forward_backward": entry(fb)}}}


def test_cpu_benchmark_figure_has_a_bar_per_level_mode_and_shape():
    report = {"levels": {"native": {"runs": [fake_run(4096, 1.2, 1.4), fake_run(1024, 0.8, 0.9)]},
                         "avx2": {"runs": [fake_run(4096, 1.25, 1.35), fake_run(1024, 1.1, 0.95)]}}}
    fig = cpu_benchmark_figure(report)
    assert len(fig.data) == 2 * 2 * 2  # levels x modes x (speed-up, % dense)
    speedups = [t for t in fig.data if t.text is not None]
    assert [list(t.y) for t in speedups] == [[1.2, 0.8], [1.4, 0.9], [1.25, 1.1], [1.35, 0.95]]
    assert list(speedups[0].x) == [shape_label(r) for r in report["levels"]["native"]["runs"]]
    lines = sorted(round(shape.y0, 2) for shape in fig.layout.shapes)
    assert lines == [1.0, 1.0, 1.3, 1.3, 75.0]  # break-even, targets
    assert [t.name for t in fig.data if t.showlegend] == ["native", "avx2"]


def test_the_gemm_bound_is_an_outlined_bar_behind_each_level():
    runs = [fake_run(4096, 1.2, 1.4), fake_run(1024, 0.8, 0.9)]
    for run, bound in zip(runs, (1.5, 1.1), strict=True):
        run["results"]["bound:GEMMs"] = fake_run(0, bound, bound + 0.2)["results"]["moe_lib:grouped"]
    fig = cpu_benchmark_figure({"levels": {"native": {"runs": runs}}})
    assert len(fig.data) == 2 * 2 * 2  # modes x (speed-up, % dense) x (ours, bound)
    bounds = [t for t in fig.data if t.name == "native: GEMMs alone"]
    assert [list(t.y) for t in bounds] == [[1.5, 1.1], [75.0, 55.0], [1.7, 1.3], [85.0, 65.0]]
    assert all(t.offsetgroup == "native" for t in fig.data)  # each drawn at its level's bar
    assert fig.data.index(bounds[0]) < fig.data.index(next(t for t in fig.data if t.text is not None))
