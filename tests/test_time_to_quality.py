"""bench/time_to_quality.py (time to 90% held-out accuracy, metatut against learn2learn) runs end to end with
--quick on the small offline Omniglot sets, and its report tabulates the runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "time_to_quality.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bench(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_quick_runs_append_results_and_the_report_tabulates_them(tmp_path):
    results = tmp_path / "out" / "ttq.jsonl"
    for row in ("metatut", "metatut-l2l-settings"):
        done = bench("run", "--row", row, "--seed", "3", "--quick", "--results", str(results), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "held-out" in done.stdout
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["row"] for r in runs] == ["metatut", "metatut-l2l-settings"]
    for r in runs:
        assert r["quick"] and r["seed"] == 3 and r["iterations"] >= 1 and 0 <= r["final_accuracy"] <= 1
        assert r["curve"] and r["curve"][-1][1] == r["iterations"]
    # the shipped configuration's settings, and learn2learn's example settings on the other row
    assert runs[0]["settings"]["query"] == 15 and runs[0]["settings"]["inner_lr"] == 0.4
    assert runs[1]["settings"]["query"] == 1 and runs[1]["settings"]["inner_lr"] == 0.5
    assert runs[1]["settings"]["meta_lr"] == 0.003

    table = bench("report", "--quick", "--results", str(results), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| metatut")]
    assert len(rows) == 2 and all("| 1 | 0/1 |" in row for row in rows)
    # full-size runs only, by default: none here
    empty = bench("report", "--results", str(results), cwd=tmp_path)
    assert empty.returncode != 0 and "no runs" in empty.stderr


def test_bad_options_are_refused_with_their_names_before_any_file_is_written(tmp_path):
    results = tmp_path / "ttq.jsonl"
    for option, value in (("--cap-minutes", "0"), ("--target", "1.5"), ("--eval-every-s", "-1")):
        done = bench("run", "--row", "metatut", option, value, "--results", str(results), cwd=tmp_path)
        assert done.returncode == 2 and option in done.stderr, done.stderr
    done = bench("run", "--row", "maml", "--results", str(results), cwd=tmp_path)
    assert done.returncode == 2 and "--row" in done.stderr
    assert not results.exists()


def test_all_runs_every_seed_in_its_own_process_then_reports(tmp_path):
    results = tmp_path / "ttq.jsonl"
    done = bench("all", "--quick", "--rows", "metatut-l2l-settings", "--seeds", "0,1", "--parallel", "2",
                 "--results", str(results), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(json.loads(line)["seed"] for line in results.read_text().splitlines()) == [0, 1]
    row = [line for line in done.stdout.splitlines() if line.startswith("| metatut-l2l-settings")]
    assert len(row) == 1 and "| 2 | 0/2 |" in row[0]
    bad = bench("all", "--rows", "metatut,maml", "--results", str(results), cwd=tmp_path)
    assert bad.returncode == 2 and "--rows" in bad.stderr and "learn2learn-cnn" in bad.stderr


def test_the_committed_table_is_the_report_of_the_committed_results(tmp_path):
    results = ROOT / "bench" / "results" / "time_to_quality_cpu.jsonl"
    table = bench("report", "--results", str(results), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    for line in table.stdout.splitlines():
        if line.startswith("|"):
            assert line in text, f"bench/RESULTS.md does not have the report's line {line!r}"
