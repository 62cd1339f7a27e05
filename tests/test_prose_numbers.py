"""Honest numbers: every measured number in a notebook's prose is printed by the same notebook's run
(scripts/prose_numbers.py, whose docstring states the rule), and no notebook has more than 2,000 words of prose.

The first tests check the checker on small synthetic notebooks (the examples of issue 11); the last two run it over
the committed course notebooks.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prose_numbers.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prose_numbers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prose_numbers", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pn = _load_script()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


# --- synthetic notebooks --------------------------------------------------------------------------------------------
def md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(source: str = "", *outputs: dict) -> dict:
    return {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": source, "outputs": list(outputs)}


def stream(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def display(mime: str, text: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {mime: text}}


def notebook(*cells: dict, metadata: dict | None = None) -> dict:
    return {"cells": list(cells), "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}


def flagged(nb: dict) -> list[str]:
    """The numbers (as written) that the checker reports."""
    return [v.number for v in pn.check_notebook(nb)]


def candidates(text: str) -> list[str]:
    stripped, _ = pn.strip_markdown(text)
    return [c.text for c in pn.find_candidates(stripped)]


# --- caught: the examples of issue 11 -------------------------------------------------------------------------------
def test_a_ratio_the_run_does_not_print_is_caught():
    nb = notebook(md("**Summary.** On this machine vmap is 7.2x faster than the loop."),
                  code("print(report)", stream("vmap vs loop: 6.08x\n")))
    violations = pn.check_notebook(nb, path="nb.ipynb")
    assert [v.number for v in violations] == ["7.2x"]
    line = str(violations[0])
    assert line.startswith('nb.ipynb: cell 0: "') and "vmap is 7.2x faster" in line
    assert line.endswith("— 7.2x is printed by no output")


def test_a_ratio_rounded_differently_is_caught():
    nb = notebook(md("bfloat16 buys 1.45x here."), code("", stream("bfloat16: 1.40x (relative error 0.16)\n")))
    assert flagged(nb) == ["1.45x"]


def test_an_accuracy_and_a_time_of_another_run_are_caught():
    nb = notebook(md("The run reached 81.0% in 54 s."),
                  code("", stream("200 meta-iterations: 80.7 ± 1.1% on 600 episodes in 62 s\n")))
    assert flagged(nb) == ["81.0%", "54 s"]


def test_a_size_in_an_unexecuted_notebook_is_caught_and_the_message_says_execute_it():
    nb = notebook(md("Each algorithm needs about 150 MiB more."), code("x = 1"))
    violations = pn.check_notebook(nb)
    assert [v.number for v in violations] == ["150 MiB"]
    assert "the notebook has no outputs: execute it" in str(violations[0])


def test_a_size_no_output_prints_is_caught():
    nb = notebook(md("Each algorithm needs about 150 MiB more."), code("", stream("peak memory: 212 MiB\n")))
    assert flagged(nb) == ["150 MiB"]


def test_every_kind_of_measured_number_is_a_candidate():
    text = ("loss 0.728, accuracy 65.8, 65%, 12.5 %, 3 percent, 1.04x, 7.2×, 2x faster, 54 s, 3.2ms, 800 µs, "
            "15 hours, 2 min, 150 MiB, 2 GB, 512 bytes, 12 KiB")
    assert candidates(text) == ["0.728", "65.8", "65%", "12.5 %", "3 percent", "1.04x", "7.2×", "2x", "54 s", "3.2ms",
                                "800 µs", "15 hours", "2 min", "150 MiB", "2 GB", "512 bytes", "12 KiB"]


def test_both_ends_of_a_range_are_candidates_and_share_the_unit():
    assert candidates("between 0.4 to 0.5 here") == ["0.4", "0.5"]
    assert candidates("all six lie between 37–47% and 2-3 s") == ["37", "47%", "2", "3 s"]
    nb = notebook(md("all six lie between 37–47%."), code("", stream("accuracies: 0.47 0.41\n")))
    assert flagged(nb) == ["37"]  # 47% is 0.47 printed, 37% is printed by nothing


def test_thousands_separators_and_signs_are_parsed():
    nb = notebook(md("It took 4,000 ms and moved by −0.2 (and +0.31)."),
                  code("", stream("time: 4000.0 ms, change -0.20, 0.306\n")))
    assert flagged(nb) == []
    nb = notebook(md("It took 4,500 ms."), code("", stream("time: 4000.0 ms\n")))
    assert flagged(nb) == ["4,500 ms"]


def test_a_cited_marker_without_a_source_is_a_violation():
    nb = notebook(md("MAML reaches <!-- cited: -->98.7%<!-- /cited --> in the paper."), code("", stream("1\n")))
    violations = pn.check_notebook(nb)
    assert len(violations) == 1 and "cited marker without a source" in str(violations[0])


# --- accepted -------------------------------------------------------------------------------------------------------
def test_a_percentage_rounded_from_the_printed_value_is_accepted():
    assert flagged(notebook(md("ProtoNets lead (83%)."), code("", stream("ProtoNets 82.6\n")))) == []
    assert flagged(notebook(md("ProtoNets lead (83%)."), code("", stream("ProtoNets 82.6%\n")))) == []
    assert flagged(notebook(md("ProtoNets lead (83%)."), code("", stream("ProtoNets 0.826\n")))) == []
    assert flagged(notebook(md("ProtoNets lead (84%)."), code("", stream("ProtoNets 0.826\n")))) == ["84%"]


def test_a_decimal_at_the_prose_precision_is_accepted():
    assert flagged(notebook(md("an error ratio of 0.4"), code("", stream("ratio 0.39\n")))) == []
    assert flagged(notebook(md("an error ratio of 0.40"), code("", stream("ratio 0.39\n")))) == ["0.40"]


def test_numbers_in_math_code_links_urls_and_comments_are_ignored():
    text = ("The loss $L = 0.5\\,\\lVert y \\rVert^2$ and $$\\alpha = 0.73$$ and \\(1.5\\) and \\[2.5\\], "
            "`lr=0.001`, ``x = 3.5``, [the paper](https://arxiv.org/abs/1703.03400v3) at "
            "https://example.org/v1.5/a.png <!-- 99.9% --> <img width=\"50%\" src=\"a.png\">\n"
            "```python\nspeedup = 7.2\n```\n~~~\n0.5\n~~~\nend")
    assert candidates(text) == []


def test_a_cited_region_is_accepted_and_an_unclosed_one_runs_to_the_end_of_the_cell():
    nb = notebook(md("MAML: <!-- cited: Finn et al. 2017, Table 1 -->98.7%<!-- /cited --> (Finn et al., 2017)."),
                  code("", stream("ours: 90.9%\n")))
    assert flagged(nb) == []
    nb = notebook(md("<!-- cited: Snell et al. 2017, Table 1 -->ProtoNets 98.8% and 96.0%.\n\nAnd 1.5x."),
                  md("Here 7.5x."), code("", stream("nothing\n")))
    assert flagged(nb) == ["7.5x"]


def test_a_given_region_is_accepted():
    nb = notebook(md("The GPU run must <!-- given: the target of issue 9 -->reach 90%<!-- /given -->."),
                  code("", stream("done\n")))
    assert flagged(nb) == []


def test_versions_references_arxiv_ids_and_dates_are_not_candidates():
    text = ("torch 2.15, PyTorch>=2.4, Python 3.10, CUDA 12.1, numpy 1.26.4, v1.2, metatut 0.3, compute capability "
            "8.0, section 5.1, sections 5.1 and 5.2, Sec. 3.2, §4.1, Table 2.1, Fig. 3.4, eq. 2.7, Algorithm 1.1, "
            "arXiv 1703.03400, arXiv:1707.09835, 1803.02999, on 2024-05-01 in the 1990s")
    assert candidates(text) == []
    assert candidates("with PyTorch 2.4, 0.73 of the time; notebook 03, 0.5 s") == ["0.73", "0.5 s"]


def test_a_given_marker_without_a_reason_is_a_violation():
    nb = notebook(md("It must <!-- given -->reach 90%<!-- /given -->."), code("", stream("1\n")))
    assert [str(v).split(" — ")[1] for v in pn.check_notebook(nb)] == ["given marker without a reason"]


def test_inline_math_wrapped_over_two_lines_is_ignored_but_not_over_a_paragraph():
    assert candidates("the step $\\theta' = \\theta -\n0.5 \\nabla L$ is taken") == []
    assert candidates("costs $5 and\n\n0.5 of $6") == ["0.5"]


def test_a_variable_named_v_is_no_version_and_html_entities_are_decoded():
    assert candidates("with v = 0.5 and 65&nbsp;%") == ["0.5", "65\xa0%"]


def test_printed_lists_without_spaces_are_read_both_ways():
    nb = notebook(md("It took 200 ms and 100,200 ms."), code("", stream("[100,200]\n")))
    assert flagged(nb) == []


def test_a_heading_number_is_not_a_candidate():
    assert candidates("### 3.1 The inner loop\n\n## 4.2. Results") == []


def test_integers_dimensions_and_scientific_notation_are_not_candidates():
    assert candidates("600 test tasks, K = 10, 5-way 1-shot, conv4, 28×28 images, a 3x3 kernel, "
                      "1e-3, 10^-3, 10^{-4}, 2.5e-4, 64 filters") == []


def test_a_confidence_level_is_not_a_candidate():
    assert candidates("the mean with a 95% confidence interval, mean ± 95% CI") == []


def test_a_constant_of_the_setting_in_a_code_cell_is_accepted():
    nb = notebook(md("One inner step of α = 0.01, for 4,000 ms at most, on 60% of the characters."),
                  code("ALPHA = 0.01\nBUDGET_MS = mt.pick(ci=600, laptop=4_000)\nSPLIT = (0.6, 0.2, 0.2)",
                       stream("ok\n")))
    assert flagged(nb) == []
    nb = notebook(md("One inner step of α = 0.02."), code("ALPHA = 0.01", stream("ok\n")))
    assert flagged(nb) == ["0.02"]


def test_a_number_of_a_generated_summary_cell_is_accepted():
    nb = notebook(md("As the summary above says, vmap is 6.1x faster."),
                  code("display(Markdown(text))", display("text/markdown", "vmap is **6.08x** faster")))
    assert flagged(nb) == []
    nb = notebook(md("The table shows 0.71."),
                  code("display(HTML(t))", display("text/html", "<table><tr><td>0.71</td></tr></table>")))
    assert flagged(nb) == []


def test_an_output_widget_saved_in_the_notebook_counts_as_an_output():
    state = {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {"state": {
        "outputs": [stream("final loss 0.052\n")]}}}, "version_major": 2, "version_minor": 0}}
    nb = notebook(md("The loss ends at 0.05."), code("", stream("x\n")), metadata={"widgets": state})
    assert flagged(nb) == []


def test_images_are_not_outputs():
    nb = notebook(md("The loss ends at 0.05."), code("", display("image/png", "iVBORw0KGgo0.05")))
    assert flagged(nb) == ["0.05"]


def test_the_word_count_is_the_markdown_cells_only():
    nb = notebook(md("one two  three\nfour"), code("not counted at all"), md(["five ", "six"]))
    assert pn.prose_word_count(nb) == 6


def test_the_cli_prints_each_violation_and_exits_1(tmp_path, capsys):
    import json

    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps(notebook(md("vmap is 7.2x faster"), code("", stream("6.08x\n")))), encoding="utf-8")
    good = tmp_path / "good.ipynb"
    good.write_text(json.dumps(notebook(md("vmap is 6.1x faster"), code("", stream("6.08x\n")))), encoding="utf-8")
    assert pn.main([str(good)]) == 0
    assert pn.main([str(bad), str(good)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f'{bad}: cell 0: "vmap is 7.2x faster" — 7.2x is printed by no output']


def test_the_checker_imports_without_torch():
    probe = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, 'scripts'); import prose_numbers; "
             "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]")
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)


# --- the committed notebooks ----------------------------------------------------------------------------------------
def test_the_committed_notebooks_are_found():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_measured_number_in_the_prose_is_printed_by_the_same_run(path):
    violations = pn.check_notebook(path)
    assert not violations, (
        f"{len(violations)} measured number(s) in the markdown of {path.name} that no output of the notebook prints "
        "(rule: scripts/prose_numbers.py's docstring). Generate the sentence from the run's results in a code cell "
        "(display(Markdown(f'...'))) or print the number; wrap a figure quoted from a paper in "
        "<!-- cited: Authors Year, Table N --> ... <!-- /cited -->, a requirement or target in "
        "<!-- given: REASON --> ... <!-- /given -->:\n  " + "\n  ".join(map(str, violations)))


def test_no_notebook_exceeds_2000_words_of_prose():
    counts = {p.name: pn.prose_word_count(p) for p in NOTEBOOKS}
    over = {name: n for name, n in counts.items() if n > pn.WORD_LIMIT}
    assert not over, (
        f"notebooks with more than {pn.WORD_LIMIT:,} words of markdown prose (one idea per notebook; move material "
        "to another notebook or cut it):\n  " + "\n  ".join(f"{name}: {n:,} words" for name, n in over.items())
        + "\nall counts: " + ", ".join(f"{name} {n:,}" for name, n in counts.items()))


def test_a_number_beside_a_publication_must_be_cited_even_when_some_output_prints_it():
    check_notebook = pn.check_notebook
    nb = {"cells": [
        {"cell_type": "markdown", "source": "Finn et al. (2017) report 98.7% on 5-way 1-shot.\n\nOur run: 0.99."},
        {"cell_type": "code", "source": "print(0.987, 0.99)", "outputs": [
            {"output_type": "stream", "name": "stdout", "text": "0.9875 0.99\n"}]},
    ]}
    found = check_notebook(nb)
    assert [v.number for v in found] == ["98.7%"] and "names a publication" in found[0].reason
    nb["cells"][0]["source"] = ("<!-- cited: Finn et al. 2017, Table 1 -->Finn et al. (2017) report 98.7% on 5-way "
                                "1-shot.<!-- /cited -->\n\nOur run: 0.99.")
    assert check_notebook(nb) == []
    nb["cells"][0]["source"] = "| MAML (published) | 1.13 |\n| MAML (ours) | 0.99 |"
    assert [v.number for v in check_notebook(nb)] == ["1.13"]
