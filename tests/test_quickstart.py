import json

from stepdistill.cli import main


def test_quickstart_fast_writes_report_with_finite_numbers(tmp_path, capsys):
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "qs"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    rows = summary["results"]
    assert all(v == v and abs(v) < 1e9 for r in rows.values() for v in r.values())  # finite
    assert rows["student, DMD (1 step)"]["sliced_wasserstein"] < rows["student, untrained (1 step)"]["sliced_wasserstein"]
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "| student, DMD (1 step) |" in report and (tmp_path / "qs" / "student.png").is_file()
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "qs")]) == 2  # never overwrites a run
