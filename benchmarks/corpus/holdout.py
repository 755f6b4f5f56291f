"""The holdout: generated runs with known ground truth that the detectors' thresholds
were never revised on, to measure them on cases independent of the corpus
(:data:`benchmarks.corpus.CASES`). They differ from the corpus in architecture (pre-norm
residual MLP, 1-D conv, GroupNorm CNN, bag of embeddings, autoencoder, library RNN,
library transformer encoder), data (spirals, rings, waveforms, token bags, bar images, a
copy task), optimizer (RMSprop, Adagrad, Nesterov), schedule (one-cycle, step decay,
linear to zero), loop (mixup, gradient accumulation, fine-tuning a frozen stem) and in
the variant of each mishap.
``python benchmarks/detectors.py --holdout`` runs and scores them.
"""

from __future__ import annotations

from . import holdout_adam, holdout_healthy, holdout_sick, holdout_transformer
from .base import Case

HOLDOUT: tuple[Case, ...] = (
    *holdout_healthy.CASES,
    *holdout_sick.CASES,
    *holdout_transformer.CASES,
    *holdout_adam.CASES,
)
"""Every holdout case, healthy first."""

HOLDOUT_BY_NAME: dict[str, Case] = {case.name: case for case in HOLDOUT}

__all__ = ["HOLDOUT", "HOLDOUT_BY_NAME"]
