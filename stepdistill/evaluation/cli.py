"""``stepdistill eval MODEL [MODEL ...]``: seeded samples -> FID, KID, precision/recall, accuracy,
diversity, CLIP score, NFE, latency, throughput and memory, with the protocol beside every number."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..contract import StepdistillError
from ..validation import device_name, finite_float, nonneg_int, positive_int, seed_int

EXAMPLE = ("stepdistill eval digits-unet runs/a exports/a --steps 1 2 4 --num-samples 1000 --reference digits "
           "--out eval_out/a")


def add_eval_arguments(p) -> None:
    """The ``eval`` sub-command's arguments (argparse parser ``p``)."""
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="embedded teacher name or teacher folder, training run directory, or exported pipeline folder")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4], help="step counts for teachers and pipelines (default: 1 2 4); "
                   "a run directory's student uses its own student.times")
    p.add_argument("--solvers", nargs="+", default=None, help="teacher solvers: ddim dpm++ unipc (VP), flow-euler (flow); "
                   "default: ddim dpm++ for VP teachers, flow-euler for flow teachers")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="teacher CFG scale (default: its recommended_guidance_scale); passed to pipelines when given")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="generated samples per setting (default: 1000)")
    p.add_argument("--reference", default="digits", help="real set: digits (1797), digits-train, digits-test, or an image folder")
    p.add_argument("--out", required=True, help="output folder: results.json, report.md, grids/*.png")
    p.add_argument("--batch-size", type=positive_int, default=100, help="sampling batch size (results do not depend on it)")
    p.add_argument("--seed", type=seed_int, default=0, help="base seed: sample i uses seed + i (default: 0)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local Inception weights (torch-fidelity .pth): FID/KID/PR in Inception features instead of digits features")
    p.add_argument("--tf-resize", action="store_true", help="Inception only: TF1-compatible resize (antialias=False) as TF-FID/ADM/EDM")
    p.add_argument("--clip-model", default=None, metavar="PATH", help="open_clip folder (open_clip_config.json + weights) for CLIP score")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text-to-image models: one prompt per line; sample i takes "
                   "one of them (seeded, balanced) with seed + i (default: a digit-caption teacher's own captions)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-cost", action="store_true", help="skip latency / throughput / memory")
    p.add_argument("--cost-batch-size", type=positive_int, default=64, help="batch size of the throughput measurement (default: 64)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default: ~/.cache/stepdistill/reference)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow an exported folder's own pipeline .py to load")
    p.add_argument("--no-artifact-view", action="store_true",
                   help="digits models: skip the second, artifact-sensitive feature view (FID layers, recall layers)")
    p.add_argument("--no-ema", action="store_true", help="run directories: raw student weights instead of the EMA")
    p.add_argument("--hybrid-teacher-steps", type=nonneg_int, default=None, metavar="K",
                   help="run directories and exported pipelines: also evaluate the hybrid sampler, the teacher's first K DDIM steps (CFG at "
                        "--guidance-scale or the teacher's recommended scale) of a --hybrid-schedule grid, then the student")
    p.add_argument("--hybrid-teacher", default=None, metavar="TEACHER",
                   help="exported pipelines: the teacher of the hybrid sampler (default: the one the export names)")
    p.add_argument("--hybrid-schedule", type=positive_int, default=4, metavar="N",
                   help="the teacher's step grid of the hybrid sampler: it hands over at t = 1 - K/N (default: 4)")


def _device(name: str | None):
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StepdistillError(f"--device {name}: CUDA is not available here")
    return name


def default_solvers(teacher) -> list[str]:
    return ["flow-euler"] if teacher.denoiser.schedule.kind == "flow" else ["ddim", "dpm++"]


def samplers_for(spec: str, steps: list[int], solvers: list[str] | None = None, guidance_scale: float | None = None,
                 device="cpu", trust_remote_code: bool = False, use_ema: bool = True, hybrid: tuple[int, int] | None = None,
                 prompts: list[str] | None = None, hybrid_teacher: str | None = None):
    """Yield the ``ModelSampler``s one MODEL argument stands for (teacher x solver x steps, a student (and its
    hybrid with ``hybrid`` = (k, N)), pipeline x steps (and its hybrid; ``hybrid_teacher`` overrides the
    export's teacher)).

    ``prompts`` (``--prompts``) replace the prompts of prompt-conditioned models; a text-to-image model
    without them is a one-line error (digit-caption teachers keep their captions).
    """
    from . import sources

    kind = sources.model_kind(spec)
    if kind == "student":
        yield sources.use_prompts(sources.student_sampler(spec, device, use_ema, model=spec), prompts)
        if hybrid is not None:
            yield sources.use_prompts(sources.hybrid_sampler(spec, hybrid[0], hybrid[1], guidance_scale, device, use_ema,
                                                             model=spec), prompts)
        return
    if kind == "pipeline":
        for n in sources.export_steps(spec, steps):
            yield sources.use_prompts(sources.pipeline_sampler(spec, n, guidance_scale, device, trust_remote_code, model=spec),
                                      prompts)
            if hybrid is not None:
                from .hybrid import pipeline_hybrid_sampler

                yield sources.use_prompts(pipeline_hybrid_sampler(spec, n, hybrid[0], hybrid[1], guidance_scale, device,
                                                                  trust_remote_code, hybrid_teacher, prompts, model=spec), prompts)
        return
    from ..teachers import load_teacher

    if not prompts and sources.text_teacher_needs_prompts(spec):
        raise StepdistillError(f"{spec!r} is a text-to-image teacher: give --prompts FILE (one prompt per line)")
    teacher = load_teacher(spec, prompts=prompts)
    fitting = default_solvers(teacher)
    chosen = fitting if solvers is None else [s for s in solvers if s in (sources.FLOW_SOLVERS if fitting == ["flow-euler"] else sources.VP_SOLVERS)]
    if not chosen:
        raise StepdistillError(f"none of the solvers {solvers} fits teacher {spec!r}; try {', '.join(fitting)}")
    for solver in chosen:
        for n in steps:
            yield sources.use_prompts(sources.teacher_sampler(teacher, solver, n, guidance_scale, device, model=spec), prompts)


def evaluate_models(models: list[str], out: Path, settings, steps: list[int], solvers=None, guidance_scale=None,
                    device="cpu", clip_model=None, trust_remote_code=False, use_ema=True, log=print,
                    hybrid: tuple[int, int] | None = None, prompts: list[str] | None = None,
                    hybrid_teacher: str | None = None) -> list[dict]:
    """Evaluate every sampler of every MODEL; write results.json, report.md and grids into ``out``."""
    from .harness import Evaluator, metric_plan, summary
    from .report import slug, write_report

    for spec in models:  # fail fast on a bad MODEL before any sampling
        from .sources import model_kind, needs_prompts

        model_kind(spec)
        if not prompts and needs_prompts(spec):
            raise StepdistillError(f"{spec!r} is a text-to-image model: give --prompts FILE (one prompt per line)")
        if needs_prompts(spec):  # and on metrics a text-to-image model cannot get here, before loading anything
            metric_plan(settings, bool(clip_model), spec, False, prompts)
    if hybrid is not None:
        from .hybrid import check_hybrid

        check_hybrid(*hybrid)
        if not any(model_kind(spec) in ("student", "pipeline") for spec in models):
            raise StepdistillError("--hybrid-teacher-steps needs a training run directory or an exported pipeline among the MODELs "
                                   "(a student and its teacher)")
        from .hybrid import check_export_teacher

        for spec in models:
            if model_kind(spec) == "pipeline":
                check_export_teacher(spec, hybrid_teacher)
    evaluator = Evaluator(settings, device, clip_model, log)
    records = []
    for spec in models:
        for sampler in samplers_for(spec, steps, solvers, guidance_scale, device, trust_remote_code, use_ema, hybrid, prompts,
                                    hybrid_teacher):
            start = time.time()
            record = evaluator.evaluate(sampler, out / "grids" / f"{slug(sampler.label)}.png")
            record["eval_seconds"] = round(time.time() - start, 1)
            records.append(record)
            log(f"{sampler.label}: {summary(record)}  ({record['eval_seconds']} s)")
    write_report(records, out)
    return records


def run_eval(args) -> int:
    """The ``stepdistill eval`` command."""
    from .harness import EvalSettings

    if any(n < 1 for n in args.steps):
        raise StepdistillError(f"--steps must be positive integers, got {args.steps}")
    device = _device(args.device)
    prompts = None
    if args.prompts:
        from ..conditioning import read_prompt_file

        prompts = read_prompt_file(args.prompts)
    settings = EvalSettings(prompts=args.prompts, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                            reference=args.reference, feature_net="inception" if args.inception_weights else "digits",
                            inception_weights=args.inception_weights, inception_antialias=not args.tf_resize,
                            artifact_view=not args.no_artifact_view, cost=not args.no_cost, cost_batch_size=args.cost_batch_size, cache_dir=args.cache_dir)
    out = Path(args.out)
    records = evaluate_models(args.models, out, settings, args.steps, args.solvers, args.guidance_scale, device,
                              args.clip_model, args.trust_remote_code, not args.no_ema,
                              hybrid=None if args.hybrid_teacher_steps is None else (args.hybrid_teacher_steps, args.hybrid_schedule),
                              prompts=prompts, hybrid_teacher=args.hybrid_teacher)
    print(json.dumps({"results": str(out / "results.json"), "report": str(out / "report.md"), "evaluations": len(records)}))
    return 0
