"""What the contract tests share: the probe sets, and a watched run that checks what every
probe owes the training loop (imported by the probe test files; no test lives here)."""

from __future__ import annotations

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
        PROBES["hessian"](2, bottom=1, vectors=True, schedule=every(1)),
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
        PROBES["weight_spectrum"](2, schedule=every(1)),
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


PROBE_SETS = {
    "default": lambda model: default_probes(every_n=1),
    "curvature": lambda model: curvature_probes(),
    "gradient": lambda model: gradient_probes(),
    "analysis": analysis_probes,
}


def documented_patterns(cls) -> tuple[Key, ...]:
    """The key patterns a probe class declares (``keys``), under its class's name."""
    return cls.keys
