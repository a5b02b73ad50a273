"""Batches of conditions (and optional real samples) for training, resumable from a generator state."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...contract import StepdistillError
from ...objectives.base import Batch


class RealData:
    """Real samples [N, *shape] (and optional labels [N]) drawn uniformly with a generator."""

    def __init__(self, samples: Tensor, labels: Tensor | None = None):
        if len(samples) == 0:
            raise StepdistillError("the real dataset is empty")
        self.samples, self.labels = samples, labels

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, len(self.samples), (n,), generator=generator)
        return self.samples[idx], None if self.labels is None else self.labels[idx]


class BatchSampler:
    """Makes one ``Batch`` per call from a conditioner; its position is its generator's state."""

    def __init__(self, conditioner, sample_shape, batch_size: int, seed: int, device="cpu", real: RealData | None = None):
        self.conditioner, self.sample_shape, self.batch_size = conditioner, tuple(sample_shape), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device, self.real = device, real

    def conditions(self, n: int, generator: torch.Generator):
        cond, null = self.conditioner(n, generator)
        return to_device(cond, self.device), to_device(null, self.device)

    def next(self) -> Batch:
        cond, null = self.conditions(self.batch_size, self.generator)
        real = real_labels = None
        if self.real is not None:
            samples, labels = self.real.draw(self.batch_size, self.generator)
            real = samples.to(self.device)
            real_labels = None if labels is None else labels.to(self.device)
        return Batch(self.batch_size, self.sample_shape, cond, null, real, self.conditions, self.device, real_labels)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def to_device(cond, device):
    if cond is None:
        return None
    return {k: (v.to(device) if isinstance(v, Tensor) else to_device(v, device) if isinstance(v, dict) else v) for k, v in cond.items()}


def load_real(spec: str, teacher, sample_shape) -> RealData | None:
    """``""`` or ``none`` (no data), ``teacher`` (exact samples of an analytic teacher), ``digits``, or an image folder
    (VAE-encoded batch by batch for a latent teacher)."""
    if not spec or spec.strip().lower() == "none":
        return None
    if spec == "teacher":
        if teacher.sample_data is None:
            raise StepdistillError("data.real=teacher needs an analytic teacher; use digits or an image folder")
        g = torch.Generator().manual_seed(12345)
        cond, _ = teacher.conditioner(8192, g)
        return RealData(teacher.sample_data(8192, g, cond), cond.get("class_labels"))
    if spec == "digits":
        from .digits import load_digits_images

        images, labels = load_digits_images("train", resolution=sample_shape[-1])
        return RealData(_check_shape(images, sample_shape, "digits"), labels)
    if teacher.codec is not None:  # a latent teacher: images are read and VAE-encoded per batch
        return ImageFolderLatents(image_files(Path(spec)), teacher.codec, sample_shape)
    return RealData(_check_shape(load_image_folder(Path(spec), sample_shape), sample_shape, spec))


class ImageFolderLatents:
    """Real latents of an image folder for a latent teacher, made per draw (any number of images:
    only the file list is held): the drawn images are loaded, resized to the VAE's pixel size and
    encoded by the teacher's own codec (``latent_dist.sample`` from the sampler's generator)."""

    labels = None

    def __init__(self, files: list[Path], codec, sample_shape):
        self.files, self.codec, self.sample_shape = files, codec, tuple(sample_shape)
        vae = codec.vae.config
        factor = 2 ** (len(vae.get("block_out_channels", (0,))) - 1)
        self.pixel_shape = (int(vae.get("in_channels", 3)), sample_shape[-2] * factor, sample_shape[-1] * factor)

    def __len__(self) -> int:
        return len(self.files)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, None]:
        idx = torch.randint(0, len(self.files), (n,), generator=generator).tolist()
        images = read_images([self.files[i] for i in idx], self.pixel_shape)  # [n, C, H, W] in [-1, 1]
        latents = self.codec.encode(images, generator)  # [n, c, h, w]
        return _check_shape(latents, self.sample_shape, "image folder (VAE-encoded)"), None


def _check_shape(x: Tensor, shape, what: str) -> Tensor:
    if tuple(x.shape[1:]) != tuple(shape):
        raise StepdistillError(
            f"real data {what!r} has samples of shape {tuple(x.shape[1:])}, but the teacher makes {tuple(shape)} "
            "(mismatched resolution or channels; latent teachers need latents, not images)"
        )
    return x


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under a folder (sorted); one-line error if none."""
    if not folder.is_dir():
        raise StepdistillError(f"real-image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise StepdistillError(f"real-image folder {str(folder)!r} has no .png/.jpg images")
    return files


def read_images(files: list[Path], shape) -> Tensor:
    """Images resized (bicubic) to shape (C, H, W), in [-1, 1]: [N, C, H, W]."""
    from PIL import Image
    import numpy as np

    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    arrays = [np.asarray(Image.open(p).convert(mode).resize((w, h), Image.BICUBIC), dtype=np.float32) for p in files]
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1
    return x[:, None] if c == 1 else x.permute(0, 3, 1, 2)


def load_image_folder(folder: Path, shape) -> Tensor:
    """Every PNG/JPEG in a folder, resized to the sample shape, in [-1, 1]: [N, C, H, W]."""
    return read_images(image_files(folder), shape)
