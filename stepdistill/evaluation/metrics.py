"""Distribution metrics on feature sets [N, D] (features from ``features.py``, computed once).

* FID and KID: torchmetrics ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed
  through an identity feature module, so one feature pass serves FID, KID and P/R and cached
  reference features plug in as they are. ``fid_from_images`` shows the equivalent direct use of
  a feature network as torchmetrics ``feature=`` (the tests check both give the same number).
* Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991, Sec. 3): k-NN balls.
* Diversity: mean pairwise feature distance, and the Vendi score (Friedman & Dieng 2023,
  arXiv:2210.02410, Eq. 1) with the cosine-similarity kernel.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .features import Precomputed


def fid(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets [N, D], [M, D] (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))  # states are float64
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def fid_from_images(feature_net: torch.nn.Module, real_uint8: Tensor, fake_uint8: Tensor) -> float:
    """FID with the feature network inside torchmetrics (``feature=`` module, uint8 input)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature_net)  # not set_dtype: it would cast the network
    metric.update(real_uint8, real=True)
    metric.update(fake_uint8, real=False)
    return float(metric.compute())


def kid(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std over random subsets.

    torchmetrics draws the subsets with the global RNG; it is forked and seeded here.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_nn_radius(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each row of x [N, D] to its k-th nearest other row: [N]."""
    out = []
    for block in x.split(chunk):
        d = torch.cdist(block.double(), x.double())  # [b, N]
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(out)


def _coverage(query: Tensor, support: Tensor, radius: Tensor, chunk: int = 1024) -> Tensor:
    """Fraction of query rows inside at least one ball B(support_j, radius_j)."""
    inside = []
    for block in query.split(chunk):
        d = torch.cdist(block.double(), support.double())  # [b, M]
        inside.append((d <= radius[None]).any(dim=1))
    return torch.cat(inside).double().mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall, arXiv:1904.06991 Eq. (1)-(2), k-NN radii (k = 3 as ADM's evaluator).

    precision = mean over fake f of 1[exists real r: |f - r| <= NN_k(r, real)]
    recall    = mean over real r of 1[exists fake f: |r - f| <= NN_k(f, fake)]
    """
    precision = _coverage(fake, real, _kth_nn_radius(real, k))
    recall = _coverage(real, fake, _kth_nn_radius(fake, k))
    return float(precision), float(recall)


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of rows of x [N, D]."""
    n = len(x)
    if n < 2:
        return float("nan")
    return float(torch.pdist(x.double()).mean()) if n <= 4096 else float(torch.cdist(x.double(), x.double()).sum() / (n * (n - 1)))


def vendi_score(x: Tensor) -> float:
    """Vendi score exp(-sum_i lambda_i log lambda_i), lambda = eigenvalues of K / N, K = cosine similarity.

    Friedman & Dieng 2023, Eq. (1); computed from the D x D Gram of normalised features (same
    non-zero eigenvalues as the N x N kernel matrix).
    """
    z = torch.nn.functional.normalize(x.double(), dim=1)  # [N, D]
    lam = torch.linalg.eigvalsh(z.T @ z / len(z)).clamp_min(0)  # [D], sums to 1
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose predicted class is the requested one."""
    return float((predicted.cpu() == labels.cpu()).double().mean())


def distribution_metrics(real: Tensor, fake: Tensor, k: int = 3, kid_subsets: int = 50, seed: int = 0) -> dict:
    """FID, KID (mean, std), precision, recall and diversity of a fake feature set against a real one."""
    kid_mean, kid_std = kid(real, fake, kid_subsets, seed=seed)
    precision, recall = precision_recall(real, fake, k)
    return {"fid": fid(real, fake), "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
            "mean_pairwise_distance": mean_pairwise_distance(fake), "vendi": vendi_score(fake)}
