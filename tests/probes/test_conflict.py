"""GradConflict on problems whose gradients are known in closed form, and in training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from tests.cases import MODELS
from tests.contract import watched_run
from trainprobe.curvature import criterion_loss
from trainprobe.gradients import cosines, layer_grams, pcgrad_shift, projection_shares
from trainprobe.probes import PerLayer, StepContext, at_steps, every
from trainprobe.probes.conflict import GradConflict

CE = criterion_loss(nn.CrossEntropyLoss())


def _flat(values) -> dict[str, float]:
    """Probe values as the monitor stores them: ``PerLayer`` expanded, floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, PerLayer):
            out.update(
                {f"{key}/{n}": v for n, v in zip(value.names, value.values.tolist(), strict=True)}
            )
        else:
            out[key] = float(value)
    return out


def _measure(probe: GradConflict, model: nn.Module, data, loss_fn=CE) -> dict[str, float]:
    ctx = StepContext(
        step=0, model=model, params=dict(model.named_parameters()), batch=data, loss_fn=loss_fn
    )
    return _flat(probe.measure(ctx))


def _two_tasks(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(batch)[:, 0]  # [2]: L_t = v_tᵀ w, so g_t = v_t
    return {"second": out[1], "first": out[0]}


@pytest.mark.parametrize("degrees", [180, 120, 60])
def test_two_linear_tasks_at_a_chosen_angle(degrees):
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    angle = math.radians(degrees)
    v1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v2 = 3 * torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    got = _measure(GradConflict(by="task"), model, torch.stack([v1, v2]), _two_tasks)
    conflict = degrees > 90
    assert got["conflict/cos/first__second"] == pytest.approx(math.cos(angle), abs=1e-12)
    assert got["conflict/min_cos"] == got["conflict/mean_cos"] == got["conflict/layer_cos/weight"]
    assert got["conflict/gms/first__second"] == pytest.approx(2 * 3 / (1 + 9), rel=1e-12)
    assert got["conflict/frac_negative"] == float(conflict)
    assert (got["conflict/min_pair_a"], got["conflict/min_pair_b"]) == (0, 1)  # sorted names
    assert got["conflict/norm/first"] == pytest.approx(1)
    assert got["conflict/norm/second"] == pytest.approx(3)
    total = v1 + v2
    for name, v in (("first", v1), ("second", v2)):
        share = float(v @ total / (total @ total))
        assert got[f"conflict/grad_share/{name}"] == pytest.approx(share)
        assert got[f"conflict/loss/{name}"] == pytest.approx(float(v.sum()))  # w = (1, 1)
        assert got[f"conflict/count/{name}"] == 2
    assert got["conflict/loss_share/first"] == pytest.approx(1 / float(total.sum()))
    dot = float(v1 @ v2)
    surgery = (v1 - dot / 9 * v2) + (v2 - dot / 1 * v1) - total if conflict else 0 * total
    assert got["conflict/pcgrad_shift"] == pytest.approx(
        float(surgery.norm() / total.norm()), abs=1e-12
    )


@pytest.mark.parametrize("update", ["sum", "pcgrad", "none"])
def test_the_applied_gradient_against_each_task(update):
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    v1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v2 = 3 * torch.tensor([math.cos(2.5), math.sin(2.5)], dtype=torch.float64)  # 143°
    dot = float(v1 @ v2)
    applied = {
        "sum": v1 + v2,  # the weaker task (first) loses: cos(v1, v1 + v2) < 0
        "pcgrad": (v1 - dot / 9 * v2) + (v2 - dot * v1),
        "none": None,
    }[update]
    model.weight.grad = None if applied is None else applied.reshape(1, 2).clone()
    got = _measure(GradConflict(by="task"), model, torch.stack([v1, v2]), _two_tasks)
    if applied is None:  # an evaluation step or a checkpoint: nothing to compare
        assert not any("applied" in key for key in got)
        return
    for name, v in (("first", v1), ("second", v2)):
        expected = float(v @ applied / (v.norm() * applied.norm()))
        assert got[f"conflict/applied_cos/{name}"] == pytest.approx(expected, abs=1e-12)
    offset = float((applied - v1 - v2).norm() / (v1 + v2).norm())
    assert got["conflict/applied_offset"] == pytest.approx(offset, abs=1e-12)
    if update == "sum":
        assert got["conflict/applied_offset"] == 0 and got["conflict/applied_cos/first"] < -0.1
    else:  # projection: no task's loss rises; the step moved by PCGrad's own shift
        assert min(got["conflict/applied_cos/first"], got["conflict/applied_cos/second"]) >= 0
        assert got["conflict/applied_offset"] == pytest.approx(got["conflict/pcgrad_shift"])


def _imbalanced():
    torch.manual_seed(3)
    model = nn.Linear(3, 3).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0] * 12 + [1] * 3 + [2])[torch.randperm(16, generator=gen)]
    return model, (x, y)


def _closed_form(model: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    """Per-class mean gradients ``[3, 12]`` (weight row-major, then bias) and losses ``[3]``
    from the softmax cross-entropy gradient ``(p − e_y) xᵀ``, no autograd."""
    with torch.no_grad():
        p = torch.softmax(x @ model.weight.T + model.bias, dim=1)  # [B, 3]
    residual = p - F.one_hot(y, 3).double()  # [B, 3]
    per_example = torch.cat([(residual[:, :, None] * x[:, None, :]).reshape(16, 9), residual], 1)
    nll = -p[torch.arange(16), y].log()
    grads = torch.stack([per_example[y == c].mean(0) for c in range(3)])  # [3, 12]
    return grads, torch.stack([nll[y == c].mean() for c in range(3)])


@pytest.mark.parametrize("method", ["subset", "persample"])
def test_class_imbalance_against_the_closed_form(method):
    model, (x, y) = _imbalanced()
    grads, losses = _closed_form(model, x, y)
    got = _measure(GradConflict(method=method), model, (x, y))
    counts = torch.tensor([12.0, 3.0, 1.0], dtype=torch.float64)
    gram = grads @ grads.T
    cos = gram / torch.outer(gram.diagonal().sqrt(), gram.diagonal().sqrt())
    contributions = (counts / 16)[:, None] * grads
    total = contributions.sum(0)
    weight_block = grads[:, :9] @ grads[:, :9].T
    for c in range(3):
        name = f"class_{c}"
        assert got[f"conflict/count/{name}"] == counts[c]
        assert got[f"conflict/norm/{name}"] == pytest.approx(float(grads[c].norm()), rel=1e-10)
        assert got[f"conflict/loss/{name}"] == pytest.approx(float(losses[c]), rel=1e-10)
        share = float(contributions[c] @ total / (total @ total))
        assert got[f"conflict/grad_share/{name}"] == pytest.approx(share, rel=1e-9)
        loss_share = float(counts[c] * losses[c] / (counts @ losses))
        assert got[f"conflict/loss_share/{name}"] == pytest.approx(loss_share, rel=1e-10)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        key = f"class_{a}__class_{b}"
        assert got[f"conflict/cos/{key}"] == pytest.approx(float(cos[a, b]), rel=1e-9)
    pairs = torch.tensor([cos[0, 1], cos[0, 2], cos[1, 2]])
    assert got["conflict/min_cos"] == pytest.approx(float(pairs.min()), rel=1e-9)
    assert got["conflict/frac_negative"] == pytest.approx(float((pairs < 0).double().mean()))
    layer = weight_block / torch.outer(weight_block.diagonal(), weight_block.diagonal()).sqrt()
    expected = float(torch.tensor([layer[0, 1], layer[0, 2], layer[1, 2]]).mean())
    assert got["conflict/layer_cos/weight"] == pytest.approx(expected, rel=1e-9)
    assert sum(got[f"conflict/grad_share/class_{c}"] for c in range(3)) == pytest.approx(1)


def test_aligned_micro_batches_report_no_conflict():
    torch.manual_seed(0)
    model = MODELS["mlp"]().double()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 1])
    got = _measure(GradConflict(by="microbatch"), model, (x.repeat(4, 1), y.repeat(4)))
    assert got["conflict/groups"] == 4
    assert got["conflict/frac_negative"] == 0 and got["conflict/pcgrad_shift"] == 0
    assert got["conflict/min_cos"] == pytest.approx(1, abs=1e-12)
    assert got["conflict/min_gms"] == pytest.approx(1, abs=1e-12)
    assert got["conflict/grad_share/micro_3"] == pytest.approx(0.25, abs=1e-12)
    assert got["conflict/loss_share/micro_0"] == pytest.approx(0.25, abs=1e-12)


def _source_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def test_callable_ids_and_key_limits():
    torch.manual_seed(0)
    model = MODELS["mlp"]().double()
    gen = torch.Generator().manual_seed(5)
    data = {
        "x": torch.randn(12, 8, generator=gen, dtype=torch.float64),
        "y": torch.randint(0, 3, (12,), generator=gen),
        "source": torch.tensor([7, 3, 11] * 4),
    }
    full = _measure(GradConflict(by=lambda b: b["source"]), model, data, _source_loss)
    assert {k for k in full if k.startswith("conflict/norm/")} == {
        "conflict/norm/group_3",
        "conflict/norm/group_7",
        "conflict/norm/group_11",
    }
    ids = {3: "group_3", 7: "group_7", 11: "group_11"}
    worst = f"{ids[full['conflict/min_pair_a']]}__{ids[full['conflict/min_pair_b']]}"
    assert full[f"conflict/cos/{worst}"] == full["conflict/min_cos"]
    small = _measure(
        GradConflict(by=lambda b: b["source"], max_pair_groups=2, layers=False),
        model,
        data,
        _source_loss,
    )
    assert not [
        k for k in small if k.startswith(("conflict/cos/", "conflict/gms/", "conflict/layer"))
    ]
    assert small["conflict/min_cos"] == full["conflict/min_cos"]


def test_a_single_group_records_only_its_own_values():
    torch.manual_seed(0)
    model = MODELS["mlp"]().double()
    x = torch.randn(5, 8, dtype=torch.float64)
    got = _measure(GradConflict(), model, (x, torch.full((5,), 2)))
    assert got["conflict/groups"] == 1 and "conflict/min_cos" not in got
    assert got["conflict/grad_share/class_2"] == pytest.approx(1)


def test_pcgrad_shift_equals_explicit_gradient_surgery():
    grads = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    projected = []
    for i in range(4):
        g = grads[i].clone()
        for j in range(4):
            if j != i and g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    total = grads.sum(0)
    expected = float((torch.stack(projected).sum(0) - total).norm() / total.norm())
    assert expected > 0.01
    assert float(pcgrad_shift(grads @ grads.T)) == pytest.approx(expected, rel=1e-12)
    assert float(projection_shares(grads @ grads.T).sum()) == pytest.approx(1)
    with_zero = cosines(
        torch.cat([grads[:2], torch.zeros(1, 6, dtype=torch.float64)])
        @ torch.cat([grads[:2], torch.zeros(1, 6, dtype=torch.float64)]).T
    )
    assert with_zero[2].isnan().all() and not with_zero[:2, :2].isnan().any()


def _task_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    out = model(batch[0])
    return {"ce": F.cross_entropy(out, batch[1]), "small_logits": out.pow(2).mean()}


@pytest.mark.parametrize(
    ("model", "make"),
    [
        ("cnn", lambda: GradConflict(schedule=every(1))),
        ("cnn", lambda: GradConflict(by="microbatch", schedule=every(1))),
        ("mlp", lambda: GradConflict(by=lambda b: b[1] % 2, method="persample", schedule=every(1))),
        ("mlp", lambda: GradConflict(by="task", loss_fn=_task_loss, schedule=every(1))),
    ],
)
def test_training_is_bit_identical_and_keys_are_documented(tmp_path, model, make):
    run, _ = watched_run(tmp_path, model, [make()], steps=4)
    keys = run.keys("conflict")
    assert "conflict/min_cos" in keys and "conflict/pcgrad_shift" in keys
    for key in keys:
        assert all(math.isfinite(v) for v in run.series(key).values.ravel()), key


def test_a_missing_loss_disables_the_probe_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    data = (torch.randn(6, 8), torch.randint(0, 3, (6,)))
    with pytest.warns(RuntimeWarning, match="needs a loss: pass loss_fn= to watch"):
        with trainprobe.watch(
            model, [GradConflict(schedule=at_steps(0))], run_dir=tmp_path / "a"
        ) as mon:
            with mon.step(0, batch=data):
                pass
    with pytest.raises(ValueError, match=r"needs data: pass batch= to mon\.step"):
        _measure(GradConflict(), model, None)


@pytest.mark.parametrize(
    ("probe", "data", "loss_fn", "error", "match"),
    [
        (
            GradConflict(),
            torch.randn(4, 8),
            CE,
            ValueError,
            r"needs batches \(inputs, targets\) with integer class labels",
        ),
        (
            GradConflict(),
            (torch.randn(4, 8), torch.tensor([0, -100, 1, 1])),
            CE,
            ValueError,
            "group ids must be >= 0",
        ),
        (
            GradConflict(by="task", loss_fn=lambda m, b: {"Depth-Est": CE(m, b)}),
            (torch.randn(4, 8), torch.tensor([0, 2, 1, 1])),
            None,
            ValueError,
            r"task names \['Depth-Est'\] are not lower_snake",
        ),
        (
            GradConflict(by="task"),
            (torch.randn(4, 8), torch.tensor([0, 2, 1, 1])),
            CE,
            TypeError,
            "return a dict",
        ),
        (
            GradConflict(),
            (torch.randn(4, 8), torch.tensor([0, 2, 1, 1])),
            None,
            ValueError,
            "needs a loss: pass loss_fn= to watch",
        ),
    ],
)
def test_bad_batches_and_losses(probe, data, loss_fn, error, match):
    torch.manual_seed(0)
    with pytest.raises(error, match=match):
        _measure(probe, MODELS["mlp"](), data, loss_fn)


def test_layer_grams_sum_to_the_gram_and_check_shapes():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    layout = trainprobe.curvature.ParamLayout.trainable(model)
    grads = torch.randn(3, layout.size, dtype=torch.float64)
    torch.testing.assert_close(layer_grams(grads, layout).sum(0), grads @ grads.T)
    with pytest.raises(ValueError, match=rf"grads must be \[G, {layout.size}\]"):
        layer_grams(grads[:, 1:], layout)
