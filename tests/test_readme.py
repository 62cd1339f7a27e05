"""The README's "use metatut in your own project" examples run as written, in order, in one namespace."""
import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", text, re.S)
    assert blocks, "README.md must hold examples between <!-- example:start --> and <!-- example:end -->"
    return blocks


def _example() -> str:
    """All the examples as one script (they build on each other)."""
    return "\n".join(_examples())


def test_readme_examples_run(capsys, monkeypatch):
    monkeypatch.setenv("METATUT_PROGRESS", "0")
    assert len(_examples()) >= 4  # own module, inner optimiser, closures, MetaParams
    exec(compile(_example(), str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"after 1 steps: [\d.]+ ± [\d.]+ \(n=600\)", out)
    assert re.search(r"inner Adam, after 3 steps: [\d.]+ ± [\d.]+", out)
    assert "MetaParams(" in out


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "bash run.sh lab" in text and "bash run.sh test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash run.sh test" in ci
