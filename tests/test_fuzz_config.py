"""Property-based: malformed recipes and overrides end in a clear error or a valid config, never a traceback."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdistill.cli import main
from stepdistill.config import RunConfig, load_config
from stepdistill.contract import StepdistillError

SECTIONS = ["teacher", "student", "fake_score", "discriminator", "objective", "data", "train", "nonsense"]
KEYS = ["name", "init", "lr", "times", "steps", "batch_size", "guidance_scale", "critic_ratio", "dtype", "mixed_precision",
        "lora_rank", "betas", "conditions", "real", "t_min", "seed", "parts", "weight", "lr_schedule", "bogus_key"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["dmd", "lcm", "scm", "compose", "digits-unet", "analytic:ring8",
                                                             "lora", "copy", "fit", "bf16", "[1.0, 0.5]", "{a: 1}", "1e-4"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)), max_leaves=6)
override = st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(SECTIONS), st.sampled_from(KEYS),
              st.one_of(st.text(max_size=10), st.integers().map(str), st.floats().map(str), st.just("[1, 2]"))),
    st.text(max_size=15),  # anything at all, e.g. no "=" or no section
)
recipe = st.one_of(st.dictionaries(st.sampled_from(SECTIONS), values, max_size=5), values)

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(recipe=recipe, overrides=st.lists(override, max_size=3))
def test_config_loader_never_tracebacks(tmp_path, recipe, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        cfg = load_config(str(path), overrides)
    except StepdistillError as e:
        assert str(e) and "\n" not in str(e).strip(), "errors are one line"
        return
    assert isinstance(cfg, RunConfig)


@FUZZ
@given(recipe=recipe, overrides=st.lists(override, max_size=3))
def test_cli_answers_with_an_exit_code(tmp_path, capsys, recipe, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"name": "digits-unet"}} | (recipe if isinstance(recipe, dict) else {})))
    try:
        code = main(["plan", str(path), *[o for o in overrides if "=" in o and not o.startswith("-")]])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


def _leaf_keys():
    """Every config key of the sections (section, key, annotated type), from the dataclasses themselves."""
    import dataclasses
    import typing

    from stepdistill.config import NetworkConfig, StudentConfig, TeacherConfig, TrainConfig, DataConfig

    out = []
    for section, cls in [("teacher", TeacherConfig), ("student", StudentConfig), ("fake_score", NetworkConfig),
                         ("discriminator", NetworkConfig), ("data", DataConfig), ("train", TrainConfig)]:
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    from stepdistill.objectives.registry import get_objective_class

    dmd = get_objective_class("dmd")
    out += [("objective", f.name, typing.get_type_hints(dmd)[f.name]) for f in dataclasses.fields(dmd) if f.init]
    return out


KEYED = _leaf_keys()
edge = st.one_of(st.integers(-2**40, 2**40), st.sampled_from([0, -1, 1, 2**32, 2**32 - 1, 0.0, 1.0, 0.999, -0.5, 1e-300, 1e300]),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "[]", "[.nan]",
                                                                                  "[1.0, 2.0]", "[0.9, 0.999]", "{}", "yes", ""]))


@FUZZ
@given(picks=st.lists(st.tuples(st.sampled_from(KEYED), edge), min_size=1, max_size=4))
def test_every_key_gives_a_one_line_error_or_a_checked_config(picks):
    import math

    overrides = [f"{s}.{k}={v}" for (s, k, _), v in picks]
    try:
        cfg = load_config("toy2d/dmd", overrides)
    except StepdistillError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip()
        return
    # a config that loads holds the promised ranges
    t = cfg.train
    assert t.steps >= 1 and t.batch_size >= 1 and t.grad_accum >= 1 and t.log_every >= 1
    assert t.checkpoint_every >= 0 and t.sample_every >= 0 and t.keep_checkpoints >= 0 and 0 <= t.seed < 2**32
    for net in (cfg.student, cfg.fake_score, cfg.discriminator):
        assert net.lr > 0 and net.grad_clip >= 0 and all(0 <= b < 1 for b in net.betas) and net.mlp_hidden >= 1 and net.fit_steps >= 0
    assert 0 <= cfg.student.ema_decay < 1

    def finite(x):
        if isinstance(x, dict):
            return all(finite(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(finite(v) for v in x)
        return not isinstance(x, float) or math.isfinite(x)

    from stepdistill.config import to_dict

    assert finite(to_dict(cfg)), overrides
