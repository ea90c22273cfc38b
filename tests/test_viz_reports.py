import pytest

from moe_lib.viz.reports import benchmark_path, benchmark_report


def test_benchmark_report_finds_the_committed_json_and_names_the_command_when_missing():
    assert benchmark_path("cpu").name == "cpu.json" and benchmark_report("cpu")["benchmark"] == "cpu"
    assert benchmark_path("no_such_benchmark") is None
    with pytest.raises(FileNotFoundError, match="python -m moe_lib.bench no_such_benchmark"):
        benchmark_report("no_such_benchmark")
