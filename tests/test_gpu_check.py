"""bench/gpu_check.py, the prepared GPU check, runs end to end on a CPU with --quick (tiny sizes)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu_writes_the_report(tmp_path):
    out = tmp_path / "out" / "gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file()
    text = out.read_text()
    assert text == done.stdout.rstrip("\n") + "\n" or text.strip() in done.stdout
    lines = text.splitlines()
    errors = [line for line in lines if "relative error" in line]
    assert any(line.startswith("- batched") for line in errors) and any(line.startswith("- loop") for line in errors)
    for line in errors:   # float32 against the float64 loop: small
        assert float(line.rsplit("relative error", 1)[1].split()[0]) < 1e-3, line
    speed_rows = [line for line in lines if line.startswith("| 5-way") or line.startswith("| 20-way")]
    assert len(speed_rows) == 2 * 2 * 2 * 3                     # ways x steps x orders x (batched, loop, floor)
    assert any("| batched |" in row for row in speed_rows)
    assert all(row.rstrip(" |").endswith("–") for row in speed_rows)   # no GPU memory on a CPU
    assert "## 3. Time to quality" in text
