"""The quickstart end to end (--fast): train, export, reload in a clean process, evaluate, report."""

import json
import math
from pathlib import Path

from stepdistill.cli import main


def test_quickstart_fast_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as the README's first command uses
    out = Path("qs")
    assert main(["quickstart", "--fast", "--out", "qs", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_parity_max_abs"] < 1e-4 and "StepdistillClassConditionalPipeline" in summary["reload"]
    rows = summary["results"]
    assert set(rows) == {"teacher, DPM-Solver++ 50 steps, w=1", "teacher, DPM-Solver++ 1 step, w=1", "student, SiD 1 step (exported pipeline)"}
    assert summary["guidance_scale"] == 1.0
    for r in rows.values():
        for key in ("fid", "precision", "recall", "accuracy", "nfe", "latency_s"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert Path(r["grid"]).is_file()
    assert rows["student, SiD 1 step (exported pipeline)"]["nfe"] == 1 and rows["teacher, DPM-Solver++ 50 steps, w=1"]["nfe"] == 50  # unguided: 1 NFE a step
    report = (out / "report.md").read_text()
    assert "| student, SiD 1 step (exported pipeline) |" in report and "from_pretrained" in report
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "README.md").is_file()
    assert str((tmp_path / "qs" / "pipeline").resolve()) in report  # the usage snippet names a path that works from anywhere
    assert main(["quickstart", "--fast", "--out", str(out)]) == 2  # never overwrites a run
