"""The record key is the only contract between probes, detectors and panels (DESIGN.md §2)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from tests.cases import train
from tests.contract import analysis_probes, curvature_probes, gradient_probes, transformer_probes
from trainprobe.analysis import DETECTORS
from trainprobe.analysis.registry import alternatives
from trainprobe.dashboard import PANELS
from trainprobe.keys import Key, check_key, check_name
from trainprobe.probes import PROBES, default_probes
from trainprobe.store import Run

CONSUMERS = [*DETECTORS, *PANELS]

CURVATURE_PREFIXES = ("sharpness/", "hessian", "grad_subspace/")
"""Keys of the curvature probes: not default (they cost Hessian-vector products)."""
GRADIENT_PREFIXES = (
    "conflict/",
    "grad_noise/",
    "grad_spectrum/",
    "weight_spectrum/",
    "grad_flow/",
)
"""Keys of the gradient-structure probes: not default (they cost extra backward passes)."""
ANALYSIS_PREFIXES = (
    "heldout/",
    "grok/",
    "ntk/",
    "attribution/",
    "ntk_response/",
    "regions/",
    "robustness/",
)
"""Keys of the grokking, starvation and region probes: not default (they need data)."""
TRANSFORMER_PREFIXES = ("attention/", "logits/", "adam/")
"""Keys of the transformer-signal probes: not default (they read attention, outputs, Adam)."""


def is_curvature(pattern: str) -> bool:
    return pattern.startswith(CURVATURE_PREFIXES)


def is_gradient(pattern: str) -> bool:
    return pattern.startswith(GRADIENT_PREFIXES)


def is_analysis(pattern: str) -> bool:
    return pattern.startswith(ANALYSIS_PREFIXES)


def is_transformer(pattern: str) -> bool:
    return pattern.startswith(TRANSFORMER_PREFIXES)


def choices(consumer) -> list[str]:
    """Every alternative of every pattern the consumer needs (``"a | b"``: both)."""
    return [c for pattern in consumer.needs for c in alternatives(pattern)]


@pytest.fixture(scope="module")
def default_keys(tmp_path_factory) -> list[str]:
    run_dir = tmp_path_factory.mktemp("keys") / "run"
    train("cnn", steps=3, probes=default_probes(every_n=1), run_dir=run_dir)
    return Run(run_dir).keys()


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: f"{type(c).__name__}:{c.name}")
def test_default_probes_produce_every_key_a_consumer_needs(default_keys, consumer):
    for pattern in choices(consumer):
        if any(f(pattern) for f in (is_curvature, is_gradient, is_analysis, is_transformer)):
            continue  # checked against the curvature, gradient, analysis or transformer probes
        if pattern.startswith("scan/"):
            continue  # only a scan writes them: tests/scan/test_scan.py checks them on one
        assert any(fnmatchcase(k, pattern) for k in default_keys), (
            f"{consumer.name} needs {pattern!r}, which the default probes (plus a logged loss) "
            "do not write"
        )


@pytest.fixture(scope="module")
def curvature_keys(tmp_path_factory) -> list[str]:
    run_dir = tmp_path_factory.mktemp("curvature_keys") / "run"
    train("cnn", steps=2, probes=curvature_probes(), run_dir=run_dir)
    return Run(run_dir).keys()


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: f"{type(c).__name__}:{c.name}")
def test_curvature_probes_produce_every_curvature_key_a_consumer_needs(curvature_keys, consumer):
    for pattern in filter(is_curvature, choices(consumer)):
        assert any(fnmatchcase(k, pattern) for k in curvature_keys), (
            f"{consumer.name} needs {pattern!r}, which the curvature probes do not write"
        )


def test_the_curvature_split_leaves_default_keys_alone(default_keys, curvature_keys):
    assert not [k for k in default_keys if is_curvature(k)], (
        "a default probe writes curvature keys: check them against the default run instead"
    )
    assert all(is_curvature(k) for k in curvature_keys if not k.startswith("scalars/"))
    assert any(is_curvature(p) for c in CONSUMERS for p in c.needs)  # the split is in use


@pytest.fixture(scope="module")
def gradient_keys(tmp_path_factory) -> list[str]:
    """The gradient probes' keys on a CNN and on a recurrent net (sequences: grad_flow's
    through-time keys)."""
    keys = []
    for model in ("cnn", "rnn"):
        run_dir = tmp_path_factory.mktemp(f"gradient_keys_{model}") / "run"
        train(model, steps=2, probes=gradient_probes(), run_dir=run_dir)
        keys += Run(run_dir).keys()
    return sorted(set(keys))


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: f"{type(c).__name__}:{c.name}")
def test_gradient_probes_produce_every_gradient_key_a_consumer_needs(gradient_keys, consumer):
    for pattern in filter(is_gradient, choices(consumer)):
        assert any(fnmatchcase(k, pattern) for k in gradient_keys), (
            f"{consumer.name} needs {pattern!r}, which the gradient probes do not write"
        )


def test_the_gradient_split_leaves_default_keys_alone(default_keys, gradient_keys):
    assert not [k for k in default_keys if is_gradient(k)]
    assert all(is_gradient(k) for k in gradient_keys if not k.startswith("scalars/"))
    assert any(is_gradient(p) for c in CONSUMERS for p in c.needs)


@pytest.fixture(scope="module")
def analysis_keys(tmp_path_factory) -> list[str]:
    run_dir = tmp_path_factory.mktemp("analysis_keys") / "run"
    train("cnn", steps=2, probes=analysis_probes("cnn"), run_dir=run_dir)
    return Run(run_dir).keys()


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: f"{type(c).__name__}:{c.name}")
def test_analysis_probes_produce_every_analysis_key_a_consumer_needs(analysis_keys, consumer):
    for pattern in filter(is_analysis, choices(consumer)):
        assert any(fnmatchcase(k, pattern) for k in analysis_keys), (
            f"{consumer.name} needs {pattern!r}, which the analysis probes do not write"
        )


def test_the_analysis_split_leaves_default_keys_alone(default_keys, analysis_keys):
    assert not [k for k in default_keys if is_analysis(k)]
    assert all(is_analysis(k) for k in analysis_keys if not k.startswith("scalars/"))
    assert any(is_analysis(p) for c in CONSUMERS for p in choices(c))


@pytest.fixture(scope="module")
def transformer_keys(tmp_path_factory) -> list[str]:
    run_dir = tmp_path_factory.mktemp("transformer_keys") / "run"
    train("transformer", steps=2, probes=transformer_probes(), run_dir=run_dir)
    return Run(run_dir).keys()


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: f"{type(c).__name__}:{c.name}")
def test_transformer_probes_produce_every_transformer_key_a_consumer_needs(
    transformer_keys, consumer
):
    for pattern in filter(is_transformer, choices(consumer)):
        assert any(fnmatchcase(k, pattern) for k in transformer_keys), (
            f"{consumer.name} needs {pattern!r}, which the transformer probes do not write"
        )


def test_the_transformer_split_leaves_default_keys_alone(default_keys, transformer_keys):
    assert not [k for k in default_keys if is_transformer(k)]
    assert all(is_transformer(k) for k in transformer_keys if not k.startswith("scalars/"))
    assert any(is_transformer(p) for c in CONSUMERS for p in choices(c))


PROBE_RUNS = {  # probe set: (case model, probes)
    "default": ("cnn", lambda: default_probes(every_n=1)),
    "curvature": ("cnn", curvature_probes),
    "gradient": ("cnn", gradient_probes),
    "analysis": ("cnn", lambda: analysis_probes("cnn")),
    "transformer": ("transformer", transformer_probes),
}
CATCH_ALL = "other_series"


@pytest.fixture(scope="module")
def drawn_rows(tmp_path_factory) -> dict[str, tuple[Run, dict]]:
    """Per probe set: its run, and the keys each dashboard row draws from it."""
    out = {}
    for name, (model, probes) in PROBE_RUNS.items():
        run_dir = tmp_path_factory.mktemp(f"drawn_{name}") / "run"
        train(model, steps=3, probes=probes(), run_dir=run_dir)
        run = Run(run_dir)
        parts = {panel.name: panel.draw(run, ()) for panel in PANELS}
        out[name] = (run, {n: part for n, part in parts.items() if part is not None})
    return out


@pytest.mark.parametrize("probe_set", sorted(PROBE_RUNS))
def test_the_dashboard_draws_every_series_a_probe_records(drawn_rows, probe_set):
    """Every recorded key is in some row; the only exceptions are keys holding more than
    one number per step, which the catch-all row names (they are read with Run.series)."""
    run, parts = drawn_rows[probe_set]
    drawn = {key for part in parts.values() for key in part.keys}
    missing = [key for key in run.keys("") if key not in drawn]
    for key in missing:
        assert run.series(key).values.ndim > 1, f"{key} is recorded but on no dashboard row"
        assert key in parts[CATCH_ALL].description


@pytest.mark.parametrize("probe_set", sorted(PROBE_RUNS))
def test_every_probe_has_a_row_of_its_own(drawn_rows, probe_set):
    """Not only the catch-all: each probe's main series has a dedicated, explained row."""
    run, parts = drawn_rows[probe_set]
    dedicated = {key for name, part in parts.items() if name != CATCH_ALL for key in part.keys}
    probes = {key.split("/", 1)[0] for key in run.keys("")} - {"scalars"}
    for probe in probes:
        assert any(k.startswith(f"{probe}/") for k in dedicated), f"{probe} has no row of its own"
    for name, part in parts.items():
        assert len(part.description.split()) >= 6, f"row {name} does not explain itself"


def test_every_detectors_evidence_has_a_dedicated_row(drawn_rows):
    """A finding links to the rows whose keys its detector reads: each detector's keys
    must be drawn by a row other than the catch-all."""
    dedicated = {
        key
        for _, parts in drawn_rows.values()
        for name, part in parts.items()
        if name != CATCH_ALL
        for key in part.keys
    }
    recorded = {key for run, _ in drawn_rows.values() for key in run.keys("")}
    for detector in DETECTORS:
        for pattern in choices(detector):
            written = [k for k in recorded if fnmatchcase(k, pattern)]
            if not written:
                continue  # e.g. scalars the user logs: checked by the tests above
            assert any(k in dedicated for k in written), (
                f"detector {detector.name}: no dedicated row draws {pattern!r}"
            )


def test_every_catch_all_family_of_the_probes_is_explained(drawn_rows):
    """Each family the probes leave to the catch-all row is explained by the meanings its
    probe declared (read from the run's metadata), never by the plain fallback line."""
    for probe_set, (_, parts) in drawn_rows.items():
        if CATCH_ALL not in parts:
            continue
        for item in parts[CATCH_ALL].menu:
            label = item.label.rsplit(" (", 1)[0]
            assert not item.description.startswith("Series the "), (
                f"{probe_set}: the family {label} has no declared meaning"
            )


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("hessian/eig_0", True),
        ("norms/grad/encoder.0.weight", True),
        ("regions/train/layer/net.1", True),
        ("conflict/cos/0__1", True),
        ("norms/grad/Block.W_q", True),
        ("norms", False),
        ("Norms/grad", False),
        ("norms/Grad", False),
        ("norms//x", False),
        ("norms/grad/", False),
        ("norms/grad_/x", False),
    ],
)
def test_check_key(key, ok):
    if ok:
        assert check_key(key) == key
    else:
        with pytest.raises(ValueError, match=r"is not 'probe/metric\[/layer\]' with a lower_snake"):
            check_key(key)


def test_check_name():
    assert check_name("grad_subspace_top1", "x") == "grad_subspace_top1"
    for bad in ("Top1", "top__1", "_top", "top-1", "", None, 3):
        with pytest.raises(ValueError, match=r"x: .* is not a lower_snake name"):
            check_name(bad, "x")


def test_key_patterns_match_within_their_parts():
    eig = Key("hessian/eig_<i>", "the i-th largest eigenvalue")
    assert eig.matches("hessian/eig_12") and not eig.matches("hessian/eig_1/x")
    assert not eig.matches("hessian/bottom_0") and not eig.matches("hessian_top/eig_0")
    layer = Key("regions/<set>/layer/<module>", "per module")
    assert layer.matches("regions/train/layer/net.1") and layer.matches("regions/a/layer/b/c")
    assert not layer.matches("regions/train/total")
    moved = layer.under("regions_test")
    assert moved.pattern == "regions_test/<set>/layer/<module>"
    assert moved.matches("regions_test/train/layer/net.1") and not moved.matches(
        "regions/train/layer/net.1"
    )


@pytest.mark.parametrize(
    "pattern", ["hessian", "Hessian/eig", "hessian/Eig", "hessian/eig/", "hessian/<i", "h/<I>"]
)
def test_a_malformed_key_pattern_is_refused(pattern):
    with pytest.raises(ValueError, match=r"Key pattern"):
        Key(pattern, "meaning")


@pytest.mark.parametrize("name", sorted(PROBES))
def test_every_probe_declares_its_keys_under_its_name(name):
    keys = PROBES[name].keys
    assert keys and all(isinstance(k, Key) for k in keys)
    assert {k.probe for k in keys} == {name}
    assert len({k.pattern for k in keys}) == len(keys)
    assert all(k.meaning and "\n" not in k.meaning for k in keys)
