"""The one way to evaluate a model as a pure function of selected parameters.

Loss closures and modes (:mod:`.loss`), parameter selection and the flat ``[P]``
layout (:mod:`.params`), the swap of tensors into a module that keeps shared, tied and
compiled modules intact (:mod:`.call`), the objective with cloned buffers and a forked
RNG (:mod:`.objective`), the scopes every evaluation runs in (:mod:`.scopes`), batches
seen as examples (:mod:`.batch`) and the determinism check (:mod:`.determinism`).
``curvature``, ``gradients`` and ``regions`` build on these public names only.
"""

from .batch import SplitBatch, default_batch_size
from .call import Slots, call, inner_name, unwrap
from .determinism import check_deterministic
from .loss import (
    LossFn,
    Mode,
    NonFiniteLoss,
    as_scalar,
    check_loss_fn,
    check_mode,
    criterion_loss,
)
from .objective import Objective, check_objective, network
from .params import ParamLayout, ParamSelection, select_params
from .scopes import (
    differentiable_attention,
    evaluation,
    forward_ad_losses,
    full_float32,
    model_device,
    no_autocast,
    rng_fork,
    semantics,
)

__all__ = [
    "NonFiniteLoss",
    "LossFn",
    "Mode",
    "Objective",
    "ParamLayout",
    "ParamSelection",
    "Slots",
    "SplitBatch",
    "as_scalar",
    "call",
    "check_deterministic",
    "check_loss_fn",
    "check_mode",
    "check_objective",
    "criterion_loss",
    "default_batch_size",
    "differentiable_attention",
    "evaluation",
    "forward_ad_losses",
    "full_float32",
    "inner_name",
    "model_device",
    "no_autocast",
    "network",
    "rng_fork",
    "select_params",
    "semantics",
    "unwrap",
]
