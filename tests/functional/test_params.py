import pytest
import torch

from tests.cases import cnn
from trainprobe.curvature import ParamLayout


def test_flatten_unflatten_round_trip_matches_parameters_to_vector():
    model = cnn()
    model[0].bias.requires_grad_(False)
    layout = ParamLayout.trainable(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    vector = layout.flatten(params)
    expected = torch.nn.utils.parameters_to_vector(params.values())
    assert torch.equal(vector, expected)
    assert layout.size == expected.numel() and "0.bias" not in layout.names
    back = layout.unflatten(vector)
    assert all(torch.equal(back[n], p) for n, p in params.items())


def test_layout_errors_name_the_problem():
    layout = ParamLayout.of({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"expected a vector of shape \[10\], got \(9,\)"):
        layout.unflatten(torch.zeros(9))
    with pytest.raises(ValueError, match=r"missing tensors for \['b'\]"):
        layout.flatten({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"a has shape \(3, 2\), the layout expects \(2, 3\)"):
        layout.flatten({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"got no parameters"):
        ParamLayout.of({})
