"""benchmarks/bench_optim.py --quick runs end to end (so that the benchmark cannot rot)."""

import json

import bench_optim  # benchmarks/, on the path through conftest.py
import pytest


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(f"before\n{bench_optim.START}\nold\n{bench_optim.END}\nafter\n")
    bench_optim.main(["--quick", "--out-dir", str(out), "--readme", str(readme)])
    return out, readme


def test_quick_run_writes_every_contender(quick_run):
    out, _ = quick_run
    saved = json.loads((out / "bench_optim_cpu_quick.json").read_text())
    rows = saved["rows"]
    contenders = {(r["model"], r["contender"]) for r in rows}
    for model in ("tiny", "tinycnn"):
        for name in ("sgd", "sgd-control", *bench_optim.METHODS, "plain:tengrad-paper"):
            assert (model, name) in contenders
        for name in bench_optim.METHODS:
            assert (model, "plain:" + name) in contenders
    ours = [r for r in rows if r["kind"] == "fisherlab"]
    assert all(r["ratio_plain"] > 0 and r["floor_ratio"] > 1 for r in ours)
    assert all(r["gflop_counted"] > 0 for r in rows if r["kind"] != "asdl")


def test_quick_run_leaves_the_readme_alone(quick_run):
    out, readme = quick_run
    assert "old" in readme.read_text()
    table = (out / "bench_optim_cpu_quick.md").read_text()
    assert "| optimizer | ms | ÷ SGD |" in table and "KFAC, factored damping" in table


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{bench_optim.START}\nold\n{bench_optim.END}\nb\n")
    assert bench_optim.update_readme(readme, "new table\n")
    assert readme.read_text() == f"a\n{bench_optim.START}\nnew table\n{bench_optim.END}\nb\n"
    missing = tmp_path / "other.md"
    missing.write_text("no markers\n")
    assert not bench_optim.update_readme(missing, "x\n")
    assert missing.read_text() == "no markers\n"
