"""Run the benchmark protocols and regenerate eval/RESULTS.md and the plots.

    python eval/run_benchmarks.py eval/protocols/digits.yaml                  # sample + measure, then table
    python eval/run_benchmarks.py eval/protocols/digits.yaml --only digits-flow
    python eval/run_benchmarks.py eval/protocols/digits.yaml --only digits-flow-w1     # one entry: guidance 1
    python eval/run_benchmarks.py --table-only                                # table and plots from results/*.json
    python eval/run_benchmarks.py --fast                                      # smoke run: 100 samples, steps 1/4/50

``--fast`` (a few minutes on 2 CPU cores) writes to ``eval/fast-results/`` (git-ignored), never over
the committed results, with its own RESULTS.md there.

Each model of a protocol writes ``eval/results/<protocol>__<model>.json`` (every record with its
protocol, the command that made it; rewritten after every setting, so a stopped run keeps what it
measured) and sample grids under ``eval/results/grids/``. ``eval/RESULTS.md`` and
``eval/results/fid_vs_nfe.png`` / ``fid_vs_latency.png`` are generated from all results JSON files:
never edit them by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdistill.contract import StepdistillError  # noqa: E402
from stepdistill.evaluation.cli import samplers_for  # noqa: E402
from stepdistill.evaluation.harness import EvalSettings, Evaluator  # noqa: E402
from stepdistill.evaluation.report import plot_fid_vs_cost, protocol_lines, slug, table  # noqa: E402

RESULTS = ROOT / "eval" / "results"
FAST = {"num_samples": 100, "steps": {1, 4, 50}, "cost_repeats": 1}
KNOWN = {"name", "reference", "feature_net", "inception_weights", "num_samples", "seed", "batch_size", "cost", "models", "runs"}


def load_protocol(path: Path) -> dict:
    proto = yaml.safe_load(path.read_text()) or {}
    unknown = set(proto) - KNOWN
    if unknown:
        raise StepdistillError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(KNOWN)}")
    return proto


def settings_of(proto: dict, num_samples: int | None) -> EvalSettings:
    cost = proto.get("cost") or {}
    return EvalSettings(num_samples=num_samples or int(proto.get("num_samples", 1000)), seed=int(proto.get("seed", 0)),
                        batch_size=int(proto.get("batch_size", 100)), reference=proto.get("reference", "digits"),
                        feature_net=proto.get("feature_net", "digits"), inception_weights=proto.get("inception_weights"),
                        cost=bool(cost.get("enabled", True)), cost_batch_size=int(cost.get("batch_size", 64)),
                        cost_repeats=int(cost.get("repeats", 3)))


def model_entries(proto: dict) -> list[dict]:
    """Teachers (with solvers and steps) and runs/exports as one list of {spec, solvers, steps}."""
    out = [{"spec": m["teacher"], "solvers": m.get("solvers"), "steps": m.get("steps", [1, 2, 4]), "guidance": m.get("guidance")}
           for m in proto.get("models", [])]  # guidance: a teacher's CFG scale (default its recommended one)
    out += [{"spec": r if isinstance(r, str) else r["path"], "solvers": None,
             "steps": ([1] if isinstance(r, str) else r.get("steps", [1])),
             "trust_remote_code": False if isinstance(r, str) else bool(r.get("trust_remote_code", False)),
             "hybrid": None if isinstance(r, str) or not r.get("hybrid") else tuple(int(v) for v in r["hybrid"]),
             "guidance": None if isinstance(r, str) else r.get("guidance"),  # the hybrid's teacher steps at this CFG
             "checkpoint": None if isinstance(r, str) else r.get("checkpoint")}  # a named checkpoint, not the newest
            for r in proto.get("runs") or []]
    return out


def present(spec: str) -> bool:
    from stepdistill.evaluation.sources import model_kind

    try:
        model_kind(spec)
        return True
    except StepdistillError:
        return False


def entry_key(entry: dict) -> str:
    """One protocol entry's name: its results file ``<protocol>__<key>.json`` and an ``--only`` token."""
    w, ckpt = entry.get("guidance"), entry.get("checkpoint")
    return f"{slug(entry['spec'])}{'' if w is None else f'-w{w:g}'}{'' if ckpt is None else f'-{ckpt}'}"


def run_protocol(path: Path, only: list[str] | None, num_samples: int | None, command: str, fast: bool = False) -> None:
    proto = load_protocol(path)
    name = proto.get("name", path.stem)
    settings = settings_of(proto, num_samples or (FAST["num_samples"] if fast else None))
    if fast:
        settings.cost_repeats = FAST["cost_repeats"]
    evaluator = Evaluator(settings, "cpu")
    missing = []
    for entry in model_entries(proto):
        spec = entry["spec"]
        w, ckpt, key = entry.get("guidance"), entry.get("checkpoint"), entry_key(entry)
        if only and spec not in only and key not in only:
            continue
        if not present(spec):
            missing.append(spec)
            print(f"skip {spec}: not present", flush=True)
            continue
        out = RESULTS / f"{name}__{key}.json"
        records = []
        steps = [n for n in entry["steps"] if n in FAST["steps"]] or entry["steps"][:1] if fast else entry["steps"]
        if ckpt is not None:  # one checkpoint of a run (its student alone)
            from stepdistill.evaluation.sources import student_sampler

            samplers = [student_sampler(spec, checkpoint=ckpt, model=f"{spec} @{ckpt}")]
        else:
            samplers = samplers_for(spec, steps, entry["solvers"], guidance_scale=w,
                                    trust_remote_code=entry.get("trust_remote_code", False), hybrid=entry.get("hybrid"))
        for sampler in samplers:
            start = time.time()
            record = evaluator.evaluate(sampler, RESULTS / "grids" / f"{name}__{slug(sampler.label)}.png")
            record["sample_grid"] = str(Path(record["sample_grid"]).relative_to(RESULTS.parent))
            record["eval_seconds"] = round(time.time() - start, 1)
            records.append(record)
            print(f"{sampler.label}: FID {record['fid']:.3f} P {record['precision']:.3f} R {record['recall']:.3f} "
                  f"acc {record['accuracy']} NFE {record['nfe']} latency {record.get('latency_s', 0) * 1000:.1f} ms "
                  f"({record['eval_seconds']} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"protocol_file": os.path.relpath(path, ROOT), "protocol_name": name,
                                       "command": command, "records": records}, indent=1) + "\n")
    if not only:  # a partial run does not know what else is missing
        (RESULTS / f"{name}__missing.json").write_text(json.dumps(missing) + "\n")


def write_results_table(readme: bool = True) -> None:
    """RESULTS.md beside the results folder and the plots, from every results/*.json; then the README's block."""
    files = sorted(p for p in RESULTS.glob("*__*.json") if not p.name.endswith("__missing.json"))
    by_protocol: dict[str, list[dict]] = {}
    commands: dict[str, set] = {}
    for f in files:
        data = json.loads(f.read_text())
        by_protocol.setdefault(data["protocol_name"], []).extend(data["records"])
        commands.setdefault(data["protocol_name"], set()).add(data["command"])
    lines = ["# Benchmark results", "",
             f"Generated by `python eval/run_benchmarks.py {'--fast' if not readme else '--table-only'}` from "
             f"`{RESULTS.relative_to(ROOT)}/*.json`; do not edit.", ""]
    for name, records in sorted(by_protocol.items()):
        records.sort(key=lambda r: (r["kind"] != "teacher", r["model"], r["solver"], r["steps"]))
        missing_file = RESULTS / f"{name}__missing.json"
        missing = json.loads(missing_file.read_text()) if missing_file.is_file() else []
        nfe_plot = plot_fid_vs_cost(records, RESULTS / f"{name}_fid_vs_nfe.png", "nfe", "network evaluations per image (NFE)")
        lat_plot = plot_fid_vs_cost(records, RESULTS / f"{name}_fid_vs_latency.png", "latency_s", "latency per image, batch 1 (ms)")
        eval_min = sum(r.get("eval_seconds") or 0 for r in records) / 60
        lines += [f"## Protocol `{name}`", "", *table(records), "",
                  f"![FID vs NFE]({RESULTS.name}/{nfe_plot.name}) ![FID vs latency]({RESULTS.name}/{lat_plot.name})", "",
                  f"Measuring these {len(records)} rows took {eval_min:.0f} min of evaluation wall time on a 2-core CPU "
                  "machine with 1 torch thread (sum of the rows' `eval_seconds`: sampling, features, metrics and cost timing; reference "
                  "features cached; training time not included).", "",
                  "Protocol (every record in the JSON carries it in full):", "", *protocol_lines(records[0]["protocol"]),
                  "- NFE: network evaluations per image, counted by a forward hook; each guided step counts 2",
                  "- latency / img/s / peak memory: CPU, measured while other jobs shared the machine: compare within a row "
                  "set, not across machines",
                  "- speed-up vs T50: the teacher's 50-step batch-1 latency (DPM-Solver++, or Euler for flow) over the row's, "
                  "both from this protocol's runs",
                  "- train min: wall-clock training time from the run's metrics.jsonl (2 CPU cores; each training run used "
                  "1 torch thread while another run used the other core); '-' where the run predates this record",
                  f"- command: {'; '.join(sorted(commands[name]))}"]
        if missing:
            lines.append(f"- not present when the results were made (skipped): {', '.join(missing)}")
        lines.append("")
    (RESULTS.parent / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS.parent / 'RESULTS.md'}")
    if readme:
        update_readme(by_protocol)


def readme_block(by_protocol: dict[str, list[dict]]) -> str:
    """The README's results section: each protocol's table, as in RESULTS.md."""
    lines = ["Generated from `eval/RESULTS.md` by `python eval/run_benchmarks.py --table-only`; protocol and plots there.", ""]
    for name, records in sorted(by_protocol.items()):
        lines += [f"Protocol `{name}`:", "", *table(records), ""]
    return "\n".join(lines)


def update_readme(by_protocol: dict[str, list[dict]]) -> None:
    """Replace the text between the README's results markers with ``readme_block``."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{readme_block(by_protocol)}\n{end}{tail}")
    print(f"updated the results section of {readme}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("protocols", nargs="*", type=Path, help="protocol YAML files (default: eval/protocols/*.yaml)")
    p.add_argument("--only", nargs="+", help="only these models of the protocol: a model's spec (all its entries) or one "
                   "entry's results name (e.g. digits-flow-w1: the entry with guidance 1)")
    p.add_argument("--num-samples", type=int, help="override the protocol's sample count (smoke runs)")
    p.add_argument("--table-only", action="store_true", help="regenerate RESULTS.md and plots only")
    p.add_argument("--fast", action="store_true",
                   help="smoke run (100 samples, steps 1/4/50, one cost repeat) into eval/fast-results/, not the committed results")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    global RESULTS
    if args.fast:
        RESULTS = ROOT / "eval" / "fast-results" / "results"
    start = time.time()
    if not args.table_only:
        command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:])
        for path in args.protocols or sorted((ROOT / "eval" / "protocols").glob("*.yaml")):
            try:
                run_protocol(path.resolve(), args.only, args.num_samples, command, args.fast)
            except StepdistillError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    write_results_table(readme=not args.fast)
    print(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
