"""Every subcommand × every bad argument → exit status 2, one line, nothing written.

The table is generated from the argument parsers: every option of every subcommand whose
value is checked (a ``type``, ``choices``) gets bad values from :data:`BAD_VALUES` (by type) or
a value outside its choices; options whose values are checked when the command runs (paths,
model specs) get theirs from :data:`SEMANTIC`. A new option with a new type, or a new free-valued
option, fails :func:`test_every_option_has_bad_values` until it is given bad values here: new
options are covered by construction.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

from fisherlab import cli
from fisherlab.cli import common

BAD_VALUES = {
    common.positive_int: ["0", "-3", "2.5", "abc"],
    common.nonnegative_int: ["-1", "abc"],
    common.seed: ["-1", "1.5", str(2**32)],
    common.positive_float: ["0", "-1", "nan", "inf", "abc"],
    common.nonnegative_float: ["-1", "nan", "abc"],
    common.fraction: ["1", "-0.1", "nan", "abc"],
    common.accuracy: ["0", "1.5", "abc"],
    common.figure_format: ["bogus"],
    common.option: ["novalue", "=3"],
}
"""Bad values per argparse type; every type used by an option must be here."""

SEMANTIC = {
    "model": [("nonsense", "unknown model")],
    "out": [("{file}", "is not a folder"), ("{file}/below", "is not a folder")],
    "figures": [("{file}", "is not a folder")],
    "config": [("{tmp}/missing.json", "does not exist")],
    "data_dir": [("{tmp}/missing", "not an existing folder|reads no data_dir")],
    "methods": [("bogus", "unknown method 'bogus'")],
    "runs": [("{tmp}/missing", "no finished runs")],
    "checkpoint": [("{tmp}/missing.pt", "does not exist")],
    "checkpoints": [("{tmp}/none-*.pt", "goes with --model package.module:factory")],
}
"""Options checked when the command runs, by destination: ``(value, message)``."""

FREE = {"help"}
"""Options without a value to get wrong."""

REQUIRED = {"compare-optimizers": ["--config", "{config}"], "curves": ["{tmp}"]}
"""Arguments a subcommand cannot run without (filled in unless the case sets them)."""

FAST = {
    "exact": ["--samples", "4", "--quiet"],
    "compare": ["--samples", "4", "--quiet"],
    "verify": ["--batch-sizes", "1", "--seeds", "0", "--dtypes", "float64", "--quiet"],
    "figures": ["--quick", "--quiet", "--model", "mlp", "--only", "heatmaps"],
    "train": ["--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--quiet"],
    "compare-optimizers": ["--quiet"],
    "curves": [],
}
"""Settings that keep a command short should a bad value be missed (the test then fails)."""


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and action.dest not in FREE


def _cases() -> list:
    cases = []
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if not _takes_value(action):
                continue
            flag = action.option_strings[-1] if action.option_strings else None
            bad: list[tuple[str, str]] = []
            if action.type in BAD_VALUES:
                bad = [(v, "") for v in BAD_VALUES[action.type]]
            elif action.choices is not None:
                bad = [("not-a-choice", "invalid choice")]
            elif action.dest in SEMANTIC:
                bad = list(SEMANTIC[action.dest])
            for value, message in bad:
                ident = f"{command}-{flag or action.dest}={value}"
                cases.append(pytest.param(command, flag, value, message, id=ident))
    return cases


def test_every_option_has_bad_values():
    """A new option whose values can be wrong must be added to this table."""
    missing = []
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if not _takes_value(action):
                continue
            typed = action.type in BAD_VALUES or (action.type is None and action.choices)
            if not typed and action.dest not in SEMANTIC:
                missing.append(f"{command} {action.option_strings or action.dest}")
    assert not missing, f"options without bad values in tests/test_cli_errors.py: {missing}"


@pytest.fixture
def places(tmp_path):
    """A file (for ``--out``), a valid config (whose runs would go to ``tmp/runs``)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    file = inputs / "a-file"
    file.write_text("not a folder\n")
    config = inputs / "c.json"
    config.write_text(
        json.dumps(
            {
                "out": str(tmp_path / "runs"),
                "train": {"epochs": 1, "train_subset": 64, "test_subset": 32},
                "experiments": [{"model": "mlp", "optimizers": {"sgd": {"lr": 0.1}}}],
            }
        )
    )
    return {"file": str(file), "config": str(config), "tmp": str(tmp_path)}


@pytest.mark.parametrize("command, flag, value, message", _cases())
def test_a_bad_argument_is_one_line_with_status_2_and_writes_nothing(
    command, flag, value, message, places, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # default output folders land here, and must not appear
    value = value.format(**places)
    argv = [command]
    if flag is None:  # a positional argument
        argv.append(value)
    else:
        argv += [a.format(**places) for a in REQUIRED.get(command, [])]
        argv += [*FAST[command], flag, value]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("fisherlab") and "error:" in err[0], err
    assert "Traceback" not in err[0]
    if (flag is not None and message == "") or message == "invalid choice":
        assert f"argument {flag}" in err[0] or flag in err[0], err
    if message:
        assert re.search(message, err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"], "something was written"
