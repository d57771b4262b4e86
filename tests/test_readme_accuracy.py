"""Statements of the README that restate the code or a committed table equal it (no drift)."""

import inspect
import re
from pathlib import Path

import fisherlab as fl
from fisherlab import analysis as an
from fisherlab.conventions import DEFAULT_CACHE_BYTES

README = Path(__file__).resolve().parents[1] / "README.md"


def _text() -> str:
    return " ".join(README.read_text().split())


def test_the_capture_cache_default_is_stated_as_the_code_has_it():
    code = inspect.signature(fl.Problem).parameters["cache_bytes"].default
    assert code == DEFAULT_CACHE_BYTES
    text = _text()
    signature = re.findall(r"`fl\.Problem\([^`]*cache_bytes=(\d+)\*\*(\d+)\)`", text)
    assert len(signature) == 1, "the README's Problem signature must show cache_bytes"
    base, power = map(int, signature[0])
    assert base**power == code
    # the one sentence with the size in MiB, and no other size stated for the cache
    stated = re.findall(r"fit `cache_bytes` \(default (\d+) MiB", text)
    assert [int(v) * 2**20 for v in stated] == [code]
    others = re.findall(r"(?:capture|cache)[^.|]{0,60}?\b(\d+) MiB", text)
    assert all(int(v) * 2**20 == code for v in others), others


def test_the_skfac_claims_follow_their_table(tmp_path):
    """The SKFAC section's numbers are claims read off ``cnn-spatial``'s table: change the
    table and the claim (its number and how often it holds) changes."""
    stem, folder = "cnn-spatial", README.parent / "figures"
    before = an.claims.render_claims(folder, [stem])
    assert "s′ = 1, 2, 4, 8" in before and "holds in 6 of 6 (layer, doubling) steps" in before
    assert before.split("\n- ")[1] in README.read_text()
    data = an.FigureData.load(folder, stem)
    for row in data.rows("sweep"):
        if row["source"] == "reference" and row["spatial_samples"] == 8:
            row["rel_frobenius"] = 3.21
    data.save(tmp_path, stem)
    after = an.claims.render_claims(tmp_path, [stem])
    assert "3.2" in after and "holds in 4 of 6 (layer, doubling) steps" in after
