"""Statements of the README that restate a constant of the code equal it (they cannot drift)."""

import inspect
import re
from pathlib import Path

import fisherlab as fl
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
