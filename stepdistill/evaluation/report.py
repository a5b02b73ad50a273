"""Reports: JSON records, a Markdown table with its protocol, FID-vs-cost plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

COLUMNS = [  # (header, key, format)
    ("model", "label", "{}"), ("NFE", "nfe", "{:g}"), ("FID", "fid", "{:.3f}"), ("FID layers", "fid_layers", "{:.2f}"),
    ("recall layers", "recall_layers", "{:.3f}"), ("KID", "kid", "{:.4f}"),
    ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"), ("accuracy", "accuracy", "{:.3f}"),
    ("Vendi", "vendi", "{:.2f}"), ("CLIP cos", "clip_cosine", "{:.4f}"), ("CLIP score", "clip_score", "{:.2f}"),
    ("latency ms", "latency_s", "ms"), ("img/s", "throughput_img_s", "{:.1f}"), ("peak MiB", "peak_memory_bytes", "mib"),
    ("speed-up vs T50", "speedup_vs_teacher_50", "x"), ("train min", "train_seconds", "min"),
]
TEACHER_50_SOLVERS = ["dpm++", "flow-euler", "unipc", "ddim"]  # the teacher's 50-step reference, best solver first
PROTOCOL_KEYS = ["reference", "reference_count", "num_samples", "seeds", "conditions", "feature_network", "feature_sha256",
                 "resize", "color", "quantization", "artifact_view", "precision_recall_k", "kid_subset_size", "clip_model", "device",
                 "python", "versions"]


def slug(text: str) -> str:
    """A file-name-safe slug."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "model"


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "ms":
        return f"{value * 1000:.1f}"
    if fmt == "mib":
        return f"{value / 2**20:.0f}"
    if fmt == "x":
        return f"{value:.1f}x"
    if fmt == "min":
        return f"{value / 60:.1f}"
    return fmt.format(value)


def _teacher_of(record: dict) -> str | None:
    return record.get("teacher") or (record.get("info") or {}).get("teacher")


def add_speedups(records: list[dict]) -> None:
    """``speedup_vs_teacher_50`` on every non-teacher record whose teacher's 50-step row is among ``records``.

    The ratio of batch-1 latencies (pipeline or sampler call to images) of the teacher at 50 steps
    with its best solver (DPM-Solver++ for VP teachers, Euler for flow) to the record's own.
    """
    teacher_50 = {}
    for solver in reversed(TEACHER_50_SOLVERS):
        for r in records:
            if r.get("kind") == "teacher" and r.get("steps") == 50 and r.get("solver") == solver and r.get("latency_s"):
                teacher_50[_teacher_of(r) or r["model"]] = r["latency_s"]
    for r in records:
        ref = teacher_50.get(_teacher_of(r))
        if r.get("kind") != "teacher" and ref and r.get("latency_s"):
            r["speedup_vs_teacher_50"] = ref / r["latency_s"]


def table(records: list[dict]) -> list[str]:
    """Markdown table rows; columns with no value in any record are left out."""
    add_speedups(records)
    cols = [c for c in COLUMNS if c[1] == "label" or any(r.get(c[1]) is not None for r in records)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in cols) + " |")
    return lines


def protocol_lines(protocol: dict) -> list[str]:
    out = []
    for key in PROTOCOL_KEYS:
        if protocol.get(key) is not None:
            value = protocol[key]
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v) if isinstance(value, dict) else value
            out.append(f"- {key.replace('_', ' ')}: {value}")
    return out


def write_report(records: list[dict], out: Path, title: str = "stepdistill eval") -> dict:
    """``results.json`` and ``report.md`` (table, protocol, grids) in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    lines = [f"# {title}", "", *table(records), ""]
    if records:
        lines += ["## Protocol", "", *protocol_lines(records[0]["protocol"]),
                  "- NFE: denoiser-network evaluations per image, counted by a forward hook; a guided step counts 2 "
                  "(conditional and unconditional rows), batched or not", "- latency: one image (batch 1); "
                  "img/s at the cost batch size; peak memory as recorded per row (`memory_kind` in results.json)",
                  "- speed-up vs T50: the teacher's 50-step latency (DPM-Solver++, or Euler for flow teachers) over the "
                  "row's, both measured in this run (only when that teacher row is part of it)",
                  "- train min: wall-clock training time of a run directory or exported run (from its metrics.jsonl)", ""]
        conditions = {r["label"]: r["protocol"].get("conditions") for r in records if r.get("protocol")}
        if len(set(conditions.values())) > 1:
            lines += ["## Conditions", ""] + [f"- {label}: {c}" for label, c in conditions.items()] + [""]
        skipped = [(r["label"], k, why) for r in records for k, why in (r.get("protocol", {}).get("metrics_skipped") or {}).items()]
        if skipped:
            lines += ["## Metrics not measured", ""] + [f"- {label}: {k}: {why}" for label, k, why in skipped] + [""]
        lines += ["## Samples", ""] + [f"**{r['label']}**\n\n![{slug(r['label'])}]({Path(r['sample_grid']).relative_to(out)})\n"
                                       for r in records if r.get("sample_grid")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"json": str(out / "results.json"), "markdown": str(out / "report.md")}


def plot_fid_vs_cost(records: list[dict], path: Path, x_key: str, x_label: str) -> Path:
    """FID against NFE or latency: one line per (model, solver) of teachers, points for students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        x, y = r.get(x_key), r.get("fid")
        if x is None or y is None:
            continue
        x = x * 1000 if x_key == "latency_s" else x
        if r["kind"] == "teacher":
            curves.setdefault(f"{r['model']} {r['solver']}", []).append((x, y))
        else:
            ax.scatter([x], [y], marker="*", s=120, zorder=3, label=f"{r['model']} ({r['steps']} step)")
    for name, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("FID (digits features)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
