"""The README's "use metatut in your own project" example runs as written."""
import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", text, re.S)
    assert m, "README.md must hold the example between <!-- example:start --> and <!-- example:end -->"
    return m.group(1)


def test_readme_example_runs(capsys, monkeypatch):
    monkeypatch.setenv("METATUT_PROGRESS", "0")
    exec(compile(_example(), str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"after 1 steps: [\d.]+ ± [\d.]+ \(n=600\)", out)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "bash run.sh lab" in text and "bash run.sh test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash run.sh test" in ci
