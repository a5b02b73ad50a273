"""Evaluation harness: seeded samples of teachers, students and exported pipelines, measured on one protocol.

    features.py   feature networks (digits classifier, Inception from a local file) as torchmetrics modules
    metrics.py    FID / KID (torchmetrics), improved precision-recall, diversity, accuracy
    reference.py  real reference sets, features cached per protocol key (safetensors + JSON)
    seeding.py    one seed per sample, balanced seeded conditions
    sources.py    teachers with diffusers solvers, run-directory students, exported pipelines
    cost.py       NFE counting, latency, throughput, peak memory
    clip.py       CLIP score with a local open_clip model
    harness.py    Evaluator: one sampler -> one record (metrics + protocol)
    report.py     JSON, Markdown, plots
    cli.py        ``stepdistill eval``

Import from the submodules (``from stepdistill.evaluation.harness import Evaluator``): the package
itself imports nothing, so ``stepdistill --help`` stays fast.
"""
