#!/usr/bin/env bash
# The package outside the checkout: build the wheel, install it in a fresh venv, and from a temporary
# directory run what a new user runs first (recipes, teachers, a short train, export, a clean-process
# DiffusionPipeline.from_pretrained, quickstart --fast). Fails loudly at the first thing missing.
#
#   bash .ci/wheel_check.sh [PYTHON]   PYTHON: the CI venv's python (default .venv/bin/python)
#
# The fresh venv gets only the wheel (pip install --no-deps); its dependencies are the CI venv's
# installed packages, reached through a .pth line (site-packages reached that way have their own .pth
# files ignored, so the CI venv's editable stepdistill stays invisible). This avoids a second ~6 GB
# torch install; the check below asserts that stepdistill and all its data come from the wheel.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$(cd "$repo" && realpath -s "${1:-.venv/bin/python}")  # -s: a venv python is a symlink
work=$(mktemp -d "${TMPDIR:-/tmp}/stepdistill-wheel.XXXXXX")
case "$work/" in "$repo"/*) echo "wheel check: $work is inside the checkout" >&2; exit 1 ;; esac
step="start"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "WHEEL CHECK FAILED at: $step (rc $rc; files kept in $work)" >&2; else rm -rf "$work"; fi' EXIT
say() { step="$*"; echo "[wheel-check $(date +%T)] $*"; }
t0=$(date +%s)

say "build the wheel (from a copy of the checkout's files: no stale build/ of the checkout gets in)"
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard | "$py" -c '
import shutil, sys
from pathlib import Path
repo, src = Path(sys.argv[1]), Path(sys.argv[2])
files = [f for f in sys.stdin.read().split("\0") if f and (repo / f).is_file()]
for f in files:
    (src / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / f, src / f)
(src.parent / "files.txt").write_text("\n".join(files) + "\n")' "$repo" "$work/src"
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/stepdistill-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"

say "the wheel holds every module of stepdistill/, every tracked file of assets/, train/recipes/, pipelines/ and nothing of eval/ or docs/"
"$py" -c '
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
where = {"assets/": "stepdistill/_assets/", "train/recipes/": "stepdistill/_recipes/", "pipelines/": "stepdistill/_pipelines/"}
files = open(sys.argv[2]).read().splitlines()
tracked = [f for f in files if f.startswith(tuple(where))]
modules = [f for f in files if f.startswith("stepdistill/") and f.endswith(".py")]
assert not (lost := [f for f in modules if f not in names]), f"modules missing (list the package in pyproject.toml): {lost}"
missing = [f for f in tracked for src, dst in where.items() if f.startswith(src) and dst + f[len(src):] not in names]
stray = [n for n in names if n.startswith(("eval/", "docs/", "tests/", "stepdistill/eval/", "stepdistill/docs/"))]
assert len(tracked) > 40, f"only {len(tracked)} tracked data files: is this a git checkout?"
assert not missing, f"missing from the wheel (add a package-data glob in pyproject.toml): {missing}"
assert not stray, f"the wheel carries files it should not: {stray[:5]}"
print(f"{len(tracked)} data files present")' "$wheel" "$work/files.txt"

say "install it in a fresh venv"
t_install=$(date +%s)
"$py" -m venv --without-pip "$work/venv"
vpy="$work/venv/bin/python"
"$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  > "$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ci-dependencies.pth"
"$vpy" -m pip install -q --no-deps "$wheel"
echo "install: $(( $(date +%s) - t_install )) s"
export PATH="$work/venv/bin:$PATH"
unset PYTHONPATH STEPDISTILL_ASSETS STEPDISTILL_RECIPES
mkdir "$work/user" && cd "$work/user"

say "stepdistill and its data come from the wheel, not the checkout"
deps=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$vpy" - "$repo" "$work/venv" "$deps" <<'EOF'
import sys
from pathlib import Path
import stepdistill
from stepdistill.resources import assets_dir, pipeline_file, recipes_dir
repo, venv, deps = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()
paths = {"stepdistill": Path(list(stepdistill.__path__)[0]), "assets": assets_dir(), "recipes": recipes_dir(),
         "pipeline": pipeline_file()}
for name, path in paths.items():
    path = path.resolve()
    assert path.exists() and path.is_relative_to(venv), f"{name}: {path} is not inside the fresh venv {venv}"
# the dependencies' site-packages may sit in the checkout (CI's .venv); its .pth files (the editable finder) do not run
inside = [p for p in sys.path if Path(p or ".").resolve().is_relative_to(repo) and Path(p or ".").resolve() != deps]
assert not inside, f"the checkout is on sys.path: {inside}"
print("\n".join(f"{k}: {v}" for k, v in paths.items()))
EOF

say "stepdistill recipes"
stepdistill recipes > recipes.txt
for r in toy2d/dmd digits-unet/sid digits-unet/dmd digits-flow/dmd2 digits-sd/dmd2; do
  grep -qx "$r" recipes.txt || { echo "recipe $r not listed:"; cat recipes.txt; exit 1; }
done
echo "$(wc -l < recipes.txt) recipes"

say "stepdistill teachers"
stepdistill teachers | tee teachers.txt
for t in digits-unet digits-flow digits-sd; do
  grep -q "^$t " teachers.txt || { echo "teacher $t not listed"; exit 1; }
done

say "stepdistill train digits-unet/dmd (2 rounds)"
stepdistill train digits-unet/dmd --output-dir run --no-progress \
  train.steps=2 train.batch_size=8 train.sample_every=0 train.checkpoint_every=0 > train.json
tail -n 3 train.json

say "stepdistill export run pipe"
stepdistill export run pipe
test -f pipe/pipeline_stepdistill_class_conditional.py

say "DiffusionPipeline.from_pretrained(pipe, trust_remote_code=True) in a clean process samples"
"$vpy" - pipe <<'EOF'
import sys
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels=list(range(10)), num_inference_steps=1, generator=torch.Generator().manual_seed(0),
              output_type="pt").images
assert "stepdistill" not in sys.modules, "the exported pipeline imported stepdistill"
assert images.shape[0] == 10 and images.ndim == 4 and torch.isfinite(images).all(), images.shape
print(type(pipe).__name__, tuple(images.shape))
EOF

say "stepdistill quickstart --fast"
stepdistill quickstart --fast --out qs --no-progress > quickstart.json
test -f qs/report.md && test -f qs/summary.json && test -f qs/pipeline/model_index.json
"$vpy" -c 'import json; s = json.load(open("qs/summary.json")); assert s["reload_parity_max_abs"] < 1e-4, s; print("quickstart:", s["seconds"])'

step="done"
echo "[wheel-check] passed in $(( $(date +%s) - t0 )) s"
