"""What the contract tests share: the probe sets, the table of options every probe must
refuse, and a watched run that checks what every probe owes the training loop (imported by
the probe test files; no test lives here)."""

from __future__ import annotations

import math

import torch

from tests.cases import batch, hook_count, train
from trainprobe.keys import Key
from trainprobe.probes import PROBES, default_probes, every
from trainprobe.probes.base import declared_keys
from trainprobe.store import Run

PROBE_NAMES = sorted(PROBES)


def every_step(name: str, model: str = "mlp"):
    if name == "heldout":  # it has no default data: a held-out batch is the point of it
        return PROBES[name](data=batch(model, 999), train_data=batch(model, 998), schedule=every(1))
    return PROBES[name](schedule=every(1))


def assert_same_training(a, b) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, pa), pb in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), f"{name} differs"
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(torch.as_tensor(state_a[i][key]), torch.as_tensor(state_b[i][key]))


def watched_run(tmp_path, model: str, probes: list, *, steps: int) -> tuple[Run, tuple]:
    """Train ``model`` for ``steps`` without and with ``probes`` (same seed) and check what
    every probe owes the loop: bit-identical parameters and optimizer state, the global RNG
    untouched, no hook left, and each probe writing keys, all declared in its ``keys``.

    Returns:
        The watched run (opened) and the watched ``(model, optimizer)``.
    """
    reference = train(model, steps=steps)
    rng = torch.get_rng_state()
    watched = train(model, steps=steps, probes=probes, run_dir=tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_training(reference, watched)
    assert hook_count(watched[0]) == 0
    run = Run(tmp_path / "run")
    for probe in probes:
        keys = run.keys(f"{probe.name}/")
        patterns = declared_keys(probe)
        assert keys, f"{probe.name} wrote nothing"
        undocumented = [k for k in keys if not any(p.matches(k) for p in patterns)]
        assert undocumented == [], f"{probe.name}: keys missing from its declared keys"
    return run, watched


def curvature_probes() -> list:
    """Every curvature probe, each option that adds keys switched on."""
    return [
        PROBES["hessian"](top=2, bottom=1, vectors=True, schedule=every(1)),
        *(
            PROBES[name](schedule=every(1))
            for name in ("hessian_trace", "hessian_density", "sharpness", "grad_subspace")
        ),
    ]


def gradient_probes() -> list:
    """Every gradient-structure probe, each option that adds keys switched on."""
    return [
        PROBES["conflict"](schedule=every(1)),
        PROBES["grad_noise"](schedule=every(1)),
        PROBES["grad_spectrum"](schedule=every(1)),
        PROBES["weight_spectrum"](k=2, schedule=every(1)),
        PROBES["grad_flow"](schedule=every(1)),
    ]


def analysis_probes(model: str = "cnn") -> list:
    """The grokking, starvation and region probes (LocalComplexity on piecewise-linear
    models only: it refuses the transformer's and the GRU's smooth nonlinearities)."""
    probes = [
        every_step(name, model)
        for name in ("heldout", "grok", "ntk", "attribution", "ntk_response", "robustness")
    ]
    if model in ("mlp", "cnn"):
        probes.append(PROBES["regions"](random=8, schedule=every(1)))
    return probes


def transformer_probes(model: str = "transformer") -> list:
    """The transformer-signal probes (attention statistics only where there is attention)."""
    return [
        PROBES["logits"](schedule=every(1)),
        PROBES["adam"](schedule=every(1)),
        *([PROBES["attention"](schedule=every(1))] if model == "transformer" else []),
    ]


PROBE_SETS = {
    "default": lambda model: default_probes(every_n=1),
    "transformer": transformer_probes,
    "curvature": lambda model: curvature_probes(),
    "gradient": lambda model: gradient_probes(),
    "analysis": analysis_probes,
}


def documented_patterns(cls) -> tuple[Key, ...]:
    """The key patterns a probe class declares (``keys``), under its class's name."""
    return cls.keys


_SOURCE = (  # the options every probe that evaluates the loss shares (probes.source.LossProbe)
    ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
    ({"mode": "test"}, ValueError, "mode must be 'eval' or 'train'"),
)
_CURVATURE = (
    *_SOURCE,
    ({"data": 1, "batches": [1]}, ValueError, "pass data= or batches=, not both"),
    ({"batches": iter([1])}, TypeError, "one-shot iterator"),
)
_OUTPUTS = (  # the NTK probes' shared options
    ({"max_examples": 1}, ValueError, "max_examples must be an integer >= 2, got 1"),
    ({"max_examples": 300.0}, ValueError, "max_examples must be an integer >= 2, got 300.0"),
    ({"max_memory": 0}, ValueError, "max_memory must be None or a positive integer"),
    ({"max_memory": "1GB"}, ValueError, "max_memory must be None or a positive integer"),
    (
        {"max_examples": 1024, "max_memory": 2**20},
        ValueError,
        r"max_memory=1048576 bytes cannot hold the \[n, n\] float64 kernel of n=1024 "
        r"examples \(8388608 bytes\).*pass a larger max_memory= or a smaller max_examples=",
    ),
    ({"method": "jacfwd"}, ValueError, "method must be one of"),
    ({"mode": "test"}, ValueError, "mode must be 'eval'"),
    ({"data": torch.zeros(3, 2)}, ValueError, r"needs batches \(inputs, targets\)"),
)

BAD_OPTIONS: dict[str, tuple[tuple[dict, type[Exception], str], ...]] = {
    "norms": (),
    "updates": (),
    "nonfinite": (),
    "optim": (),
    "attention": (
        ({"max_sequences": 0}, ValueError, r"max_sequences=...\) must be a positive int"),
    ),
    "logits": (({"max_rows": 0}, ValueError, r"max_rows=...\) must be a positive int"),),
    "adam": (
        ({"max_elements": 0}, ValueError, r"max_elements=...\) must be a positive int or None"),
    ),
    "amp": (),
    "activations": (
        ({"max_elements": 0}, ValueError, r"max_elements=...\) must be a positive int or None"),
        ({"modules": "0"}, TypeError, "takes a list of names, not one string"),
    ),
    "hessian": (
        *_CURVATURE,
        ({"top": 0}, ValueError, r"need top \+ bottom >= 1"),
        ({"top": 1, "bottom": -1}, ValueError, r"need top \+ bottom >= 1"),
    ),
    "hessian_trace": (
        *_CURVATURE,
        ({"method": "exact"}, ValueError, r"method must be 'hutch\+\+' or 'hutchinson'"),
    ),
    "hessian_density": _CURVATURE,
    "sharpness": _CURVATURE,
    "grad_subspace": (
        *_CURVATURE,
        ({"k": 0}, ValueError, "k must be an integer >= 1"),
        ({"gradient": "x"}, ValueError, "gradient must be 'loss' or 'step'"),
    ),
    "conflict": (
        *_SOURCE,
        ({"by": "label"}, ValueError, "by must be 'class', 'task', 'microbatch'"),
        ({"microbatches": 1}, ValueError, "microbatches must be an integer >= 2"),
        ({"max_pair_groups": -1}, ValueError, "max_pair_groups must be"),
        ({"method": "dense"}, ValueError, "method must be 'subset'"),
    ),
    "grad_noise": (
        *_SOURCE,
        ({"microbatches": 1}, ValueError, "microbatches must be None"),
        ({"microbatches": True}, ValueError, "microbatches must be None"),
        ({"method": "jit"}, ValueError, "method must be one of"),
    ),
    "grad_spectrum": (
        ({"k": 0}, ValueError, r"GradSpectrum: k must be >= 1, got 0"),
        ({"k": 2.0}, TypeError, r"GradSpectrum: k must be an int, got float 2.0"),
        ({"energy_rank": 0}, ValueError, r"GradSpectrum\(energy_rank=...\) must be >= 1"),
        ({"alpha": 1.0}, ValueError, r"GradSpectrum: alpha must be in \(0, 1\) .* got 1.0"),
        ({"alpha": "slow"}, TypeError, r"GradSpectrum: alpha must be a float in \(0, 1\)"),
        ({"exact_max": 0}, ValueError, r"GradSpectrum\(exact_max=...\) must be >= 1"),
        ({"oversample": -1}, ValueError, r"GradSpectrum\(oversample=...\) must be >= 0"),
        ({"power_iters": -1}, ValueError, r"GradSpectrum\(power_iters=...\) must be >= 0"),
        ({"seed": -1}, ValueError, r"GradSpectrum\(seed=...\) must be >= 0"),
    ),
    "weight_spectrum": (
        ({"k": -1}, ValueError, r"WeightSpectrum: k must be >= 0, got -1"),
        ({"iters": 0}, ValueError, r"WeightSpectrum\(iters=...\) must be >= 1"),
        ({"cold_iters": 0}, ValueError, r"WeightSpectrum\(cold_iters=...\) must be >= 1"),
        ({"seed": -1}, ValueError, r"WeightSpectrum\(seed=...\) must be >= 0"),
    ),
    "grad_flow": (
        ({"modules": "gru"}, TypeError, "takes a list of names, not one string"),
        ({"time_dims": {"gru": "1"}}, TypeError, "must map module names to the axis"),
        ({"profile_points": 1}, ValueError, "profile_points=...\\) must be an integer >= 2"),
    ),
    "regions": (
        ({"radius": 0}, ValueError, "radius must be a number > 0"),
        ({"dim": 0}, ValueError, "dim must be an integer >= 1"),
        ({"max_points": 0}, ValueError, "max_points must be an integer >= 1"),
        ({"max_steps": 0}, ValueError, "max_steps must be an integer >= 1"),
        ({"random": 0}, ValueError, "random must be an integer >= 1"),
        ({"train": "x"}, TypeError, r"train= must be a floating tensor \[N, \*shape\] or a batch"),
        ({"test": torch.zeros(3)}, TypeError, "test= must be a floating"),
        (
            {"directions": [[1.0, 0.0]]},
            TypeError,
            r"directions= must be a floating tensor \[k, D\]",
        ),
        ({"directions": torch.ones(2, 3, dtype=torch.long)}, TypeError, "got torch.int64 tensor"),
        (
            {"directions": torch.ones(3)},
            ValueError,
            r"directions= must be \[k, D\] with k >= 1 .* got shape \(3,\); flatten each",
        ),
        ({"directions": torch.zeros(0, 3)}, ValueError, r"got shape \(0, 3\)"),
        (
            {"directions": torch.tensor([[1.0, 0.0], [math.inf, 1.0]])},
            ValueError,
            r"directions= has NaN or infinite entries in rows \[1\]; pass finite directions",
        ),
        (
            {"directions": torch.tensor([[0.0, 0.0], [0.0, 1.0]])},
            ValueError,
            r"directions= rows \[0\] are zero .*; drop them or pass nonzero directions",
        ),
        (
            {"directions": torch.eye(2), "dim": 2},
            ValueError,
            r"pass directions= \(explicit directions\) or dim= .*, not both",
        ),
        (
            {"directions": torch.eye(2), "test": torch.zeros(4, 1, 3)},
            ValueError,
            r"directions= are \[k, 2\] but the test points have 3 features per example "
            r"\(shape \(1, 3\)\); pass directions of shape \[k, 3\]",
        ),
    ),
    "robustness": (
        ({"eps": -1.0}, ValueError, "eps must be a finite number >= 0"),
        ({"eps": math.inf}, ValueError, "eps must be a finite number >= 0"),
        ({"steps": -1}, ValueError, "steps must be an integer >= 0"),
        ({"step_size": -0.1}, ValueError, "step_size must be a finite number >= 0 or None"),
        ({"max_points": 0}, ValueError, "max_points must be an integer >= 1"),
        ({"bounds": (1.0, 0.0)}, ValueError, r"bounds must be a tuple \(low, high\)"),
        ({"data": torch.zeros(3, 2)}, ValueError, r"needs a batch \(inputs \[N, \*shape\]"),
    ),
    "heldout": (
        ({}, ValueError, "exactly one of data="),
        ({"data": batch("mlp", 0), "eval_fn": lambda m: {}}, ValueError, "exactly one"),
        (
            {"eval_fn": lambda m: {}, "train_data": batch("mlp", 0)},
            TypeError,
            "without train_data",
        ),
        ({"eval_fn": 3}, TypeError, "eval_fn must be callable"),
        ({"data": batch("mlp", 0), "criterion": "ce"}, TypeError, "criterion must be"),
        ({"data": iter([batch("mlp", 0)])}, TypeError, "one-shot iterator"),
        ({"data": []}, ValueError, "non-empty list"),
        ({"data": [torch.zeros(2)]}, ValueError, r"needs batches \(inputs, targets\)"),
        ({"data": batch("mlp", 0), "mode": "test"}, ValueError, "mode must be"),
    ),
    "grok": (({"output": 3}, TypeError, r"output must be a module name or an nn\.Module"),),
    "ntk": (*_OUTPUTS, ({"max_outputs": 0}, ValueError, "max_outputs must be an integer >= 1")),
    "attribution": (
        ({"features": {}}, TypeError, "non-empty dict"),
        ({"features": {"Easy": [0]}}, ValueError, "not lower_snake"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
    ),
    "ntk_response": (
        *_OUTPUTS,
        ({"directions": 0}, ValueError, "directions must be an integer >= 1"),
        ({"min_label_energy": 0}, ValueError, r"min_label_energy must be in"),
    ),
}
"""Options each probe refuses when it is built, with the error and the words it must say
(every probe also refuses a non-schedule and a name that is not lower_snake)."""
