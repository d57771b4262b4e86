"""The command line, end to end."""

import json
import subprocess
import sys

import pytest

from fisherlab import cli
from fisherlab.cli import exact as exact_cmd


def test_exact_prints_and_saves_a_per_layer_table(tmp_path, capsys):
    code = cli.main(
        ["exact", "--model", "cnn", "--samples", "16", "--out", str(tmp_path), "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert (
        "exact true Fisher of cnn on digits: 16 training samples in batches of 128, float64, "
        "backend backpack" in out
    )
    saved = json.loads((tmp_path / "exact-cnn-digits-true.json").read_text())
    assert [r["layer"] for r in saved["rows"]] == ["0", "2", "5"]
    assert saved["meta"]["backend"] == "backpack"
    row = saved["rows"][0]
    assert row["P"] == 8 * 9 + 8 and 0 < row["lambda_max"] <= row["trace"]
    assert (tmp_path / "exact-cnn-digits-true.csv").read_text().startswith("layer,type,weight")


def test_bad_input_is_reported_not_raised(tmp_path, capsys):
    code = cli.main(
        ["exact", "--samples", "4", "--fisher-type", "mc", "--mc-samples", "2", "--backend",
         "backpack", "--model", "cnn", "--dtype", "float32", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    for args, message in [
        (["--mc-samples", "0"], "argument --mc-samples: must be a positive integer, got 0"),
        (["--batch-size", "-5"], "argument --batch-size: must be a positive integer, got -5"),
        (["--samples", "abc"], "argument --samples: 'abc' is not an integer"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["exact", *args, "--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "fisherlab", "exact", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--fisher-type" in result.stdout


def test_largest_eigenvalue_by_lobpcg_matches_dense():
    import torch

    torch.manual_seed(0)
    rows = torch.randn(40, 600, dtype=torch.float64)
    block = rows.T @ rows
    assert exact_cmd._largest_eigenvalue(block, dense_limit=100) == pytest.approx(
        float(torch.linalg.eigvalsh(block)[-1]), rel=1e-8
    )


def test_verify_on_a_model_states_its_sample_count(tmp_path, capsys):
    code = cli.main(
        ["verify", "--model", "mlp", "--samples", "8", "--batch-size", "4", "--fisher-types",
         "empirical", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert "verify on mlp on digits: 8 training samples in batches of 4" in capsys.readouterr().out
