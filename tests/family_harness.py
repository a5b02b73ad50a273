"""Shared by the per-family tests: offline tokenizers, a 2-round train, the toolkit's own sample,
and a stock-pipeline sample from a process that never imports stepdistill.

Tokenizers without Hub access (shared/reference/families.md section 11): CLIP BPE rebuilt from
the merges file open_clip ships; T5 (Unigram) and Gemma from a tiny hand-written vocabulary.
"""

from __future__ import annotations

import gzip
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import torch

TOL = 1e-4  # issue 14: the stock pipeline matches the toolkit's student to this (max abs, latents)


def clip_tokenizer(n_merges: int = 486, pad: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer from open_clip's merges; 486 merges keep ids < 1000 (the tiny CLIPTextConfig)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + n_merges]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, pad_token=pad)
    tok.model_max_length = 77
    return tok


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def write_prompts(folder: Path, prompts: list[str]) -> Path:
    path = Path(folder) / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def train(tmp_path: Path, teacher: Path, recipe: str, times: list[float], prompts: list[str], *extra: str, name: str = "run") -> Path:
    """Two rounds of a shipped recipe on a teacher folder (batch 2, no sample grids)."""
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    over = [f"teacher.name={teacher}", f"student.times={times}", "train.steps=2", "train.batch_size=2", "train.sample_every=0",
            "train.log_every=1", f"data.conditions=prompts:{write_prompts(tmp_path, prompts)}", "data.real=none", *extra]
    cfg = load_config(recipe, over)
    Trainer(cfg, tmp_path / name, progress=False).run()
    return tmp_path / name


def toolkit_latents(run: Path, cond: dict, seed: int) -> torch.Tensor:
    """The toolkit's student latents for ``cond``: noise and re-noising from one generator seeded ``seed``."""
    from stepdistill.sampling import few_step_sample
    from stepdistill.training.run import load_student

    student = load_student(run)
    g = torch.Generator().manual_seed(seed)
    n = next(v for v in cond.values() if torch.is_tensor(v)).shape[0]
    noise = torch.randn(n, *student.teacher.sample_shape, generator=g)
    with torch.no_grad():
        return few_step_sample(student.view, noise, cond, student.times, g)


def stock_latents(folder: Path, pipeline_class: str, call: str, out: Path, *, load_lora: Path | None = None,
                  base: Path | None = None) -> torch.Tensor:
    """Run ``DiffusionPipeline.from_pretrained(folder)`` in a fresh process that never imports stepdistill.

    ``call`` is the pipeline call's keyword arguments as Python source (``generator=g`` is given),
    with ``output_type="latent"``; the latents come back through a safetensors file. With
    ``load_lora``: load ``base`` (the teacher folder) instead and ``pipe.load_lora_weights(load_lora)``.
    """
    target = base if load_lora else folder
    code = f"""
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained({str(target)!r})
assert type(pipe).__name__ == {pipeline_class!r}, type(pipe).__name__
{"pipe.load_lora_weights(" + repr(str(load_lora)) + ")" if load_lora else ""}
pipe.set_progress_bar_config(disable=True)
g = torch.Generator().manual_seed(0)
out = pipe({call}, generator=g, output_type="latent")
x = out.images if hasattr(out, "images") else out[0]
assert "stepdistill" not in sys.modules, "the stock folder must not need stepdistill"
save_file({{"x": x.float().contiguous()}}, {str(out)!r})
print("OK", tuple(x.shape))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(str(out))["x"]


def export_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "stepdistill_export.json").read_text())
