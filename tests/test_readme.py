"""The README's Python examples run as written (in a scratch folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "my-figures" / "my-spectra.png").stat().st_size > 0


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert len(images) >= 20
    missing = [path for path in images if not (README.parent / path).is_file()]
    assert not missing, f"README shows images that are not committed: {missing}"
