"""The package outside the checkout, the cheap part: pyproject.toml lists every subpackage and its
package-data globs cover the data folders it maps into the package; resources resolve; an empty
recipes folder is an error. `.ci/wheel_check.sh` builds and installs the wheel for real."""

from pathlib import Path

import pytest

from stepdistill.cli import main
from stepdistill.resources import assets_dir, pipeline_file, recipes_dir

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_of_stepdistill_is_listed_in_pyproject():
    listed = set(_setuptools()["packages"])
    found = {".".join(d.relative_to(ROOT).parts) for d in [ROOT / "stepdistill", *(ROOT / "stepdistill").rglob("*")]
             if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {"stepdistill._assets", "stepdistill._recipes", "stepdistill._pipelines"} <= listed


def test_package_data_globs_cover_every_file_of_the_mapped_folders():
    st = _setuptools()
    mapped = st["package-dir"]
    assert mapped == {"stepdistill._assets": "assets", "stepdistill._recipes": "train/recipes",
                      "stepdistill._pipelines": "pipelines"}
    for package, folder in mapped.items():
        root = ROOT / folder
        files = {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        covered = {p for pattern in st["package-data"][package] for p in root.glob(pattern)} | set(root.glob("*.py"))
        assert len(files) > 0 and files - covered == set(), f"{package}: no package-data glob ships these"


def test_resources_find_the_teachers_recipes_and_pipeline_file(tmp_path, monkeypatch):
    for name in ("digits-unet", "digits-flow", "digits-sd", "digits-vunet"):
        assert (assets_dir() / "teachers" / name / "stepdistill_teacher.json").is_file()
    assert (assets_dir() / "feature_net" / "model.safetensors").is_file()
    assert (recipes_dir() / "digits-unet" / "sid.yaml").is_file()
    assert "class StepdistillClassConditionalPipeline" in pipeline_file().read_text()
    monkeypatch.setenv("STEPDISTILL_RECIPES", str(tmp_path))
    monkeypatch.setenv("STEPDISTILL_ASSETS", str(tmp_path / "assets"))
    assert recipes_dir() == tmp_path and assets_dir() == tmp_path / "assets"


def test_recipes_command_with_no_recipes_exits_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEPDISTILL_RECIPES", str(tmp_path))
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no recipes found under") and "STEPDISTILL_RECIPES" in err and err.count("\n") == 1
    monkeypatch.delenv("STEPDISTILL_RECIPES")
    assert main(["recipes"]) == 0 and "digits-unet/sid" in capsys.readouterr().out.split()
