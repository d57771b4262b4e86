"""benchmarks/bench_optim.py --quick runs end to end (so that the benchmark cannot rot)."""

import json

import bench_optim  # benchmarks/, on the path through conftest.py
import pytest


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(f"before\n{bench_optim.START}\nOLD-TABLE\n{bench_optim.END}\nafter\n")
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
    assert "OLD-TABLE" in readme.read_text()
    table = (out / "bench_optim_cpu_quick.md").read_text()
    assert "| optimizer | ms | ÷ SGD |" in table and "KFAC, factored damping" in table


def test_render_rewrites_the_readme_section_from_the_results(quick_run):
    out, readme = quick_run
    bench_optim.main(["--render", str(out / "bench_optim_cpu_quick.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{bench_optim.END}\nafter\n")
    assert "OLD-TABLE" not in text and (out / "bench_optim_cpu_quick.md").read_text() in text


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{bench_optim.START}\nold\n{bench_optim.END}\nb\n")
    assert bench_optim.update_readme(readme, "new table\n")
    assert readme.read_text() == f"a\n{bench_optim.START}\nnew table\n{bench_optim.END}\nb\n"
    missing = tmp_path / "other.md"
    missing.write_text("no markers\n")
    assert not bench_optim.update_readme(missing, "x\n")
    assert missing.read_text() == "no markers\n"


def test_asdl_like_for_like_kfac_is_fisherlabs_factored_kfac():
    """With the benchmark's ASDL settings (empirical Fisher, curvature every step, factored
    damping; here the running average's first step and inverses every step), ASDL's KFAC step
    is fisherlab's ``damping_mode="factored"`` step on a bias-free MLP (ASDL preconditions a
    bias by ``Γ⁻¹`` alone, without the homogeneous coordinate)."""
    pytest.importorskip("asdl")
    import torch
    from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig
    from torch import nn

    import fisherlab as fl

    bench_optim.patch_asdl_nvtx()

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    ours = model().double()
    opt = fl.optim.KFAC(
        ours, lr=1.0, damping=1e-2, stat_decay=0.0, damping_mode="factored", inv_update_freq=1
    )
    start = torch.nn.utils.parameters_to_vector(ours.parameters()).clone()
    opt.zero_grad()
    loss_fn(ours(x.double()), y).backward()
    opt.step()
    opt.close()
    step = start - torch.nn.utils.parameters_to_vector(ours.parameters())
    theirs = model().double()
    config = PreconditioningConfig(
        data_size=16, damping=1e-2, curvature_upd_interval=1, preconditioner_upd_interval=1,
        ema_decay=1.0,
    )  # fmt: skip
    maker = KfacGradientMaker(theirs, config, fisher_type=FISHER_EMP)
    output = maker.setup_model_call(theirs, x.double())
    maker.setup_loss_call(loss_fn, output, y)
    maker.forward_and_backward()
    asdl = torch.cat([p.grad.flatten() for p in theirs.parameters()])
    assert (asdl - step).norm() <= 1e-10 * step.norm()
