"""AttentionStats and OutputLogits against direct computations of the same forward:
``scaled_dot_product_attention`` modules (causal, grouped-query), ``nn.MultiheadAttention``
with masks, hand-written ("eager") softmax attention, and Hugging Face-style outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import AttentionStats, OutputLogits, every
from trainprobe.probes.transformer import attention_stats
from trainprobe.store import Run


class SdpaBlock(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention`` (nanoGPT-style),
    ``kv_heads < heads`` for grouped-query attention."""

    def __init__(self, d: int = 8, heads: int = 2, kv_heads: int = 2, eager: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eager = heads, kv_heads, d // heads, eager
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(d, d)

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qk(x)
        if self.eager:  # Hugging Face "eager": matmul, additive mask, softmax
            t = x.shape[1]
            mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
            weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask, dim=-1)
            y = weights @ v
        else:
            gqa = self.kv_heads != self.heads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class Decoder(nn.Module):
    def __init__(self, block: nn.Module, vocab: int = 11, d: int = 8):
        super().__init__()
        self.emb, self.block, self.head = nn.Embedding(vocab, d), block, nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(idx)))


@torch.no_grad()
def _reference(block: SdpaBlock, x: torch.Tensor) -> tuple[float, np.ndarray]:
    """Max causal logit and per-head mean entropy, computed directly."""
    q, k, _ = block.qk(x)
    k = k.repeat_interleave(block.heads // block.kv_heads, dim=1)
    logits = q @ k.transpose(-2, -1) / math.sqrt(block.head_dim)
    t = x.shape[1]
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [B, H, T]
    return float(logits.max()), entropy.mean(dim=(0, 2)).numpy()


def _run(tmp_path, model: nn.Module, probes: list, steps: int = 2):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    with trainprobe.watch(model, probes, run_dir=tmp_path / "r", on_probe_error="raise") as mon:
        for step in range(steps):
            idx = torch.randint(0, 11, (3, 6))
            with mon.step(step):
                logits = model(idx)
                F.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1)).backward()
            records.append((idx, logits.detach()))
            opt.step()
            opt.zero_grad()
    return Run(tmp_path / "r"), records


@pytest.mark.parametrize(
    ("kv_heads", "eager"), [(2, False), (1, False), (2, True)], ids=["sdpa", "gqa", "eager"]
)
def test_attention_stats_equal_the_direct_computation(tmp_path, kv_heads, eager):
    torch.manual_seed(0)
    model = Decoder(SdpaBlock(kv_heads=kv_heads, eager=eager)).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = AttentionStats(schedule=every(1))
    run, records = _run(tmp_path, model, [probe], steps=1)
    model.load_state_dict(before)  # the forward the probe saw
    top, entropy = _reference(model.block, model.emb(records[0][0]))
    assert run.series("attention/max_logit/block").values[0] == pytest.approx(top, rel=1e-5)
    assert run.series("attention/max_logit_max").values[0] == pytest.approx(top, rel=1e-5)
    mean = run.series("attention/entropy/block").values[0]
    assert mean == pytest.approx(entropy.mean(), rel=1e-5)
    lowest = run.series("attention/entropy_min_head/block").values[0]
    assert lowest == pytest.approx(entropy.min(), rel=1e-5)
    assert run.series("attention/heads/block").values[0] == 2


def test_multihead_attention_with_masks_matches_its_own_weights(tmp_path):
    """``nn.MultiheadAttention``'s returned weights are the softmax of the logits the
    probe reconstructs from its input projections: the entropies must agree."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: not allowed
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    probe = AttentionStats(schedule=every(1), max_sequences=3)
    with trainprobe.watch(mha, [probe], run_dir=tmp_path / "r", on_probe_error="raise") as mon:
        with mon.step(0):
            out, weights = mha(
                x, x, x, attn_mask=causal, key_padding_mask=padding, average_attn_weights=False
            )
            out.sum().backward()
    run = Run(tmp_path / "r")
    p = weights.detach()  # [B, H, T, S]
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean(dim=(0, 2))
    name = "attention/entropy/model"
    assert run.series(name).values[0] == pytest.approx(float(entropy.mean()), rel=1e-6)
    q, k, _ = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k = (t.reshape(3, 5, 2, 4).transpose(1, 2) for t in (q, k))
    logits = (q @ k.transpose(-2, -1) / 2).masked_fill(causal, float("-inf"))
    logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    top = run.series("attention/max_logit/model").values[0]
    assert top == pytest.approx(float(logits.max()), rel=1e-6)


def test_attention_stats_helper_on_one_hot_and_uniform_rows():
    uniform = torch.zeros(1, 1, 2, 4)
    one_hot = torch.tensor([[[[50.0, -50.0, -50.0, -50.0]]]])
    top, entropy = attention_stats(torch.cat([uniform, torch.cat([one_hot] * 2, 2)], 1))
    np.testing.assert_allclose(entropy.numpy(), [math.log(4), 0.0], atol=1e-6)
    np.testing.assert_allclose(top.numpy(), [0.0, 50.0])
    masked = torch.tensor([[[[1.0, float("-inf")], [float("-inf"), float("-inf")]]]])
    top, entropy = attention_stats(masked)  # a fully masked row adds no entropy
    assert float(top[0]) == 1.0 and float(entropy[0]) == 0.0


@dataclass
class HFOutput:
    logits: torch.Tensor


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, idx):
        logits = self.inner(idx)
        return {"tensor": logits, "hf": HFOutput(logits), "dict": {"logits": logits}}[self.kind]


@pytest.mark.parametrize("kind", ["tensor", "hf", "dict"])
def test_output_logits_equal_logsumexp_of_the_output(tmp_path, kind):
    torch.manual_seed(0)
    inner = Decoder(SdpaBlock()).double()
    model = Wrapped(inner, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainprobe.watch(
        model, [OutputLogits(schedule=every(1))], run_dir=tmp_path / "r", on_probe_error="raise"
    ) as mon:
        idx = torch.randint(0, 11, (3, 6))
        with mon.step(0):
            logits = inner(idx)
            out = model(idx)
            (logits.sum() * 0 + (out if kind == "tensor" else logits).square().mean()).backward()
        opt.step()
    run = Run(tmp_path / "r")
    log_z = torch.logsumexp(logits.detach().reshape(-1, 11), -1)
    expected = {
        "logits/log_z_mean": log_z.mean(),
        "logits/log_z_max": log_z.max(),
        "logits/log_z_rms": log_z.square().mean().sqrt(),
        "logits/max": logits.max(),
    }
    for key, value in expected.items():
        assert run.series(key).values[0] == pytest.approx(float(value), rel=1e-6), key


def test_bad_options_and_a_missing_module_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_sequences=...\) must be a positive int"):
        AttentionStats(max_sequences=0)
    with pytest.raises(ValueError, match=r"max_rows=...\) must be a positive int"):
        OutputLogits(max_rows=0)
    model = Decoder(SdpaBlock())
    probe = OutputLogits(module="lm_head", schedule=every(1))
    with pytest.warns(RuntimeWarning, match=r"no module named 'lm_head'"):
        with trainprobe.watch(model, [probe], run_dir=tmp_path / "r") as mon:
            with mon.step(0):
                model(torch.randint(0, 11, (2, 3))).sum().backward()


def test_the_tap_leaves_no_mode_behind_when_the_forward_raises(tmp_path):
    from torch.overrides import _get_current_function_mode_stack

    model = Decoder(SdpaBlock())
    probe = AttentionStats(schedule=every(1))
    with trainprobe.watch(model, [probe], run_dir=tmp_path / "r") as mon:
        with pytest.raises(IndexError), mon.step(0):
            model(torch.full((2, 3), 99))  # an index out of the embedding's range
        with mon.step(1):
            model(torch.randint(0, 11, (2, 3))).sum().backward()
    assert _get_current_function_mode_stack() == []
    assert Run(tmp_path / "r").series("attention/max_logit_max").steps.tolist() == [1]
