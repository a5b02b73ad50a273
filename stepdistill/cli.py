"""The ``stepdistill`` command line.

Every error a user can act on is printed as one line (``error: ...``) with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .contract import StepdistillError
from .validation import positive_int

EXAMPLES = {
    "train": "stepdistill train toy2d/dmd objective.guidance_scale=1 train.steps=200 --output-dir runs/toy",
    "recipes": "stepdistill recipes",
    "teachers": "stepdistill teachers",
    "quickstart": "stepdistill quickstart --out runs/quickstart",
    "export": "stepdistill export runs/digits runs/digits-export --steps 1",
    "plan": "stepdistill plan digits-unet/dmd student.init=lora fake_score.init=lora --batch-size 64 --device 24GB",
    "eval": "stepdistill eval digits-unet runs/a --steps 1 2 4 --num-samples 1000 --reference digits --out eval_out/a",
    "control": "stepdistill control train digits-sd --remap 3:8 --output runs/remap-3-8",
    "control train": "stepdistill control train digits-sd --remap 3:8 --output runs/remap-3-8 --steps 300",
    "control measure": "stepdistill control measure runs/digits-sd-export --lora runs/remap-3-8 --num-samples 64",
}


def _require_recipe(recipe: str) -> None:
    if not recipe.strip():
        raise StepdistillError("RECIPE is empty: give a recipe file or a shipped name (see `stepdistill recipes`)")


def _cmd_train(args) -> int:
    from .config import load_config
    from .training.trainer import train

    _require_recipe(args.recipe)
    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.output_dir or Path("runs") / (Path(args.recipe).stem or "run"))
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_recipes(args) -> int:
    from .config import list_recipes, recipes_dir

    names = list_recipes()
    if not names:
        raise StepdistillError(f"no recipes found under {recipes_dir()}: reinstall stepdistill (the wheel ships them) "
                               "or set STEPDISTILL_RECIPES to a folder of <teacher>/<objective>.yaml")
    for name in names:
        print(name)
    return 0


def _cmd_teachers(args) -> int:
    from .teachers import list_teachers

    rows = list_teachers()
    width = max(len(n) for n, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    summary = quickstart(Path(args.out), fast=args.fast, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import device_memory, estimate, format_plan

    _require_recipe(args.recipe)
    cfg = load_config(args.recipe, args.overrides)
    gib = device_memory(args.device)
    plan = estimate(cfg, args.batch_size, args.precision, args.shards, True if args.gradient_checkpointing else None)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, gib))
    if gib and plan["peak_gib"] * 1.15 + 0.75 > gib:
        return 1
    return 0


def _cmd_eval(args) -> int:
    from .evaluation.cli import run_eval

    return run_eval(args)


def _cmd_export(args) -> int:
    from .export import export_run, hub_preflight, push_to_hub

    token = hub_preflight(args.push_to_hub) if args.push_to_hub else None  # before any file is written
    meta = export_run(args.run_dir, args.out_dir, args.steps, use_ema=args.ema, lora=args.lora, dtype=args.dtype)
    summary = {"out": args.out_dir, "pipeline": meta["pipeline"], "scheduler": meta["scheduler"],
               "steps": meta["steps"], "model_card": str(Path(args.out_dir) / "README.md")}
    if args.push_to_hub:
        summary["hub_commit"] = push_to_hub(args.out_dir, args.push_to_hub, token)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_control_train(args) -> int:
    from .control import train_control_lora

    meta = train_control_lora(args.teacher, args.output, kind=args.kind, remap=args.remap, steps=args.steps, rank=args.rank,
                              lr=args.lr, batch_size=args.batch_size, remap_fraction=args.remap_fraction, seed=args.seed,
                              device=args.device, log_every=0 if args.no_progress else 50)
    print(json.dumps(meta, indent=1))
    return 0


def _cmd_control_measure(args) -> int:
    from .control import measure_control

    result = measure_control(args.pipeline, args.lora, args.remap, args.steps, args.num_samples, args.guidance_scale,
                             args.seed, args.lora_scale, args.device)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _remap_arg(text: str) -> dict[int, int]:
    """argparse type: SOURCE:TARGET digit pairs (3:8 or 3:8,1:7)."""
    from .control import parse_remap

    try:
        return parse_remap(text)
    except StepdistillError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--remap ")) from None


def _add_control(add) -> None:
    """``stepdistill control train|measure``: control LoRAs that carry from a teacher to its student."""
    from .validation import device_name, finite_float, seed_int

    control = add("control", "train a control LoRA (digit remapping) on an SD-style teacher and measure it on the teacher "
                  "and on exported students (load_lora_weights)", None)
    sub = control.add_subparsers(dest="control_command", metavar="ACTION", required=True)

    def action(name, help_text, fn):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog="example: " + EXAMPLES[f"control {name}"],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        p.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")
        p.add_argument("--seed", type=seed_int, default=0, help="seed (default 0)")
        return p

    p = action("train", "train a LoRA on a teacher's UNet with its own denoising loss on remapped digits "
               "(the source digit's captions show the target digit); writes pytorch_lora_weights.safetensors", _cmd_control_train)
    p.add_argument("teacher", help="SD-style teacher: an embedded name (digits-sd), a folder, or an exported student folder")
    p.add_argument("--output", required=True, help="LoRA folder to write (new or empty)")
    p.add_argument("--kind", default="remap", choices=["remap"], help="the control (default remap)")
    p.add_argument("--remap", type=_remap_arg, default="3:8", help="SOURCE:TARGET digit pairs, e.g. 3:8 or 3:8,1:7 (default 3:8)")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (alpha = rank; default 4)")
    p.add_argument("--lr", type=finite_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default 16)")
    p.add_argument("--remap-fraction", type=finite_float, default=0.5, help="share of each batch that is remapped (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no loss lines")
    p = action("measure", "sample a pipeline (teacher or exported student) for the remapped prompts without and with the "
               "LoRA, same seeds; prints the fraction classified as the target and the source digit", _cmd_control_measure)
    p.add_argument("pipeline", help="teacher name or folder (DDIM, its recommended CFG) or exported student folder")
    p.add_argument("--lora", required=True, help="LoRA folder (control train --output) or its .safetensors file")
    p.add_argument("--remap", type=_remap_arg, help="SOURCE:TARGET pairs (default: the ones the LoRA was trained for)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: an export's own, 20 for a teacher)")
    p.add_argument("--num-samples", type=positive_int, default=64, help="samples per source digit (default 64)")
    p.add_argument("--guidance-scale", type=finite_float, help="CFG scale for teachers (default: the teacher's recommended)")
    p.add_argument("--lora-scale", type=finite_float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--out", help="also write the result JSON here")


def _quiet_libraries() -> None:
    """Library warnings (diffusers, transformers) only with --debug: the console is for our messages."""
    import logging
    import warnings

    for name in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _one_line(message: str) -> str:
    """An error message on one line: control characters (from user input echoed back) escaped."""
    return "".join(ch if ch >= " " or ch == "\t" else repr(ch)[1:-1] for ch in str(message).strip())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``stepdistill eval: error: ... (stepdistill eval --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stepdistill",
        description="Distil a multi-step diffusion or flow teacher into a 1-4 step student.",
        epilog="example: " + EXAMPLES["quickstart"],
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_text, fn):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog="example: " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        return p

    p = add("train", "train a student from a recipe (a YAML path or a shipped recipe name)", _cmd_train)
    p.add_argument("recipe", help="recipe file, or a shipped name such as toy2d/dmd (see `stepdistill recipes`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. objective.guidance_scale=2")
    p.add_argument("--output-dir", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add("recipes", "list the shipped recipes", _cmd_recipes)
    add("teachers", "list the analytic and embedded teachers", _cmd_teachers)
    p = add("quickstart", "distil a one-step student of the embedded digits-unet teacher, export it, reload it with diffusers "
            "and report it against the teacher (about 10-15 minutes on 2 CPU cores)", _cmd_quickstart)
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--fast", action="store_true", help="a tiny run (about a minute) for CI: the same stages, numbers not meaningful")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = add("export", "write a trained student as a folder that diffusers' DiffusionPipeline.from_pretrained loads, "
            "with its scheduler and timesteps set", _cmd_export)
    p.add_argument("run_dir", help="a training run directory (the --output-dir of stepdistill train)")
    p.add_argument("out_dir", help="the folder to write (must not exist or be empty)")
    p.add_argument("--steps", type=positive_int, nargs="+", help="step counts to export (default: the run's own; consistency "
                   "students accept any)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="export the EMA weights when the run kept them (default)")
    p.add_argument("--lora", action="store_true", help="LoRA students of SD-style teachers: also write the adapter for load_lora_weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to the Hugging Face Hub repo REPO "
                   "(user/name) as one commit; token and Hub are checked before anything is written")
    p = add("plan", "estimate parameters, optimizer state and activation memory of a recipe before training "
            "(exit 1 when it will not fit --device)", _cmd_plan)
    p.add_argument("recipe", help="recipe file or shipped name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. teacher.name=/path/to/sdxl")
    p.add_argument("--batch-size", type=positive_int, help="per-device batch size (default: the recipe's)")
    p.add_argument("--precision", choices=["no", "fp32", "bf16", "fp16"], help="compute precision (default: train.mixed_precision)")
    p.add_argument("--device", help="device to check against: a size (24GB) or a name (a100-80gb, h100, rtx4090, ...)")
    p.add_argument("--shards", type=positive_int, default=1, help="FSDP shards (devices) for the trained full networks")
    p.add_argument("--gradient-checkpointing", action="store_true", help="estimate with gradient checkpointing on")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    from .evaluation.cli import add_eval_arguments

    add_eval_arguments(add("eval", "sample teachers, students (run dirs) and exported pipelines with fixed seeds; "
                           "FID, precision/recall, accuracy, NFE, latency, with the protocol", _cmd_eval))
    from .inspection import EXAMPLE as INSPECT_EXAMPLE, add_inspect_arguments, run_inspect

    EXAMPLES.setdefault("inspect", INSPECT_EXAMPLE)
    add_inspect_arguments(add("inspect", "the x0 prediction after every step of a teacher and its student, side by side, "
                              "for fixed seeds and conditions: a PNG grid and per-step diversity / distance numbers (JSON)",
                              run_inspect))
    _add_control(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may come after options (argparse stops at the first option)
        if getattr(args, "command", None) not in ("train", "plan") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    if not args.debug:
        _quiet_libraries()
    try:
        return args.fn(args)
    except StepdistillError as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a filesystem failure at the boundary (read-only or full disk, a file where a folder goes)
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {_one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
