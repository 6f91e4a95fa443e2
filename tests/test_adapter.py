"""The delta rule of the spec, for every module kind, against fp64 references and the layers' own forward passes."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.core import Module

g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def test_scale_is_alpha_over_rank_from_fp32_alpha():
    m = Module("x", rnd(3, 5), rnd(4, 3), alpha=0.1)
    assert m.scale == float(torch.tensor(0.1, dtype=torch.float32)) / 3
    assert m.kind == "linear" and m.shape == (4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_delta_matches_fp64_and_forward(dtype):
    A, B = rnd(6, 40).to(dtype), rnd(24, 6).to(dtype)
    m = Module("l", A, B, alpha=12.0)
    ref = (12.0 / 6) * (B.double() @ A.double())
    d = m.delta()
    assert d.dtype == torch.float32
    assert torch.allclose(d.double(), ref, rtol=1e-6, atol=1e-5)
    # the LoRA forward path x A^T B^T * s equals x dW^T
    x = rnd(3, 40).double()
    assert torch.allclose(x @ d.double().T, (x @ A.double().T @ B.double().T) * 2.0, rtol=1e-5, atol=1e-4)


def test_conv_delta_equals_conv_then_1x1_conv():
    A, B = rnd(3, 4, 3, 3), rnd(5, 3, 1, 1)
    m = Module("c", A, B, alpha=1.5)
    assert m.kind == "conv" and m.shape == (5, 4, 3, 3)
    x = rnd(2, 4, 9, 9).double()
    lora_path = F.conv2d(F.conv2d(x, A.double(), padding=1), B.double()) * (1.5 / 3)
    merged = F.conv2d(x, m.delta(torch.float64), padding=1)
    assert torch.allclose(merged, lora_path, rtol=1e-10, atol=1e-10)
    assert torch.allclose(m.delta().double(), m.delta(torch.float64), rtol=1e-6, atol=1e-6)


def test_conv1d_kernel():
    A, B = rnd(2, 3, 5), rnd(4, 2, 1)
    m = Module("c1", A, B, alpha=2.0)
    x = rnd(1, 3, 11).double()
    assert torch.allclose(
        F.conv1d(x, m.delta(torch.float64)), F.conv1d(F.conv1d(x, A.double()), B.double()), atol=1e-10
    )


def test_embedding_delta_matches_peft_embedding_path():
    # PEFT: lora_embedding_A [r, num], lora_embedding_B [dim, r]; out = emb(x, A.T) @ B.T * s.
    num, dim, r = 30, 8, 3
    peft_A, peft_B = rnd(r, num).double(), rnd(dim, r).double()
    m = Module("e", A=peft_B.T.float(), B=peft_A.T.float(), alpha=6.0, kind="embedding")
    assert m.shape == (num, dim)
    ids = torch.tensor([0, 5, 29, 5])
    ref = F.embedding(ids, peft_A.T) @ peft_B.T * 2.0
    assert torch.allclose(F.embedding(ids, m.delta(torch.float64)), ref, atol=1e-10)


def test_linear_t_matches_gpt2_conv1d():
    # GPT-2 Conv1D: y = x @ W with W [in, out]; PEFT fan_in_fan_out: lora_A [r, in], lora_B [out, r].
    inp, out, r = 12, 20, 4
    peft_A, peft_B = rnd(r, inp).double(), rnd(out, r).double()
    m = Module("h.0.attn.c_attn", A=peft_B.T.float(), B=peft_A.T.float(), alpha=8.0, kind="linear_t")
    assert m.shape == (inp, out)
    x = rnd(2, inp).double()
    assert torch.allclose(x @ m.delta(torch.float64), (x @ peft_A.T @ peft_B.T) * 2.0, atol=1e-10)


@pytest.mark.parametrize("axis", [0, 1])
def test_dora_apply_matches_fp64_formula(axis):
    W = rnd(16, 10)
    A, B = rnd(4, 10), rnd(16, 4)
    mag = rnd(W.shape[axis]).abs() + 0.5
    m = Module("d", A, B, alpha=4.0, magnitude=mag, dora_axis=axis)
    V = W.double() + (B.double() @ A.double())
    norm = V.norm(dim=1 - axis, keepdim=True)
    ref = V / norm * (mag.double()[:, None] if axis == 0 else mag.double()[None, :])
    assert torch.allclose(m.apply(W).double(), ref, rtol=1e-5, atol=1e-6)


def test_apply_weighted_and_unmerge_is_subtraction():
    W, A, B = rnd(8, 6), rnd(2, 6), rnd(8, 2)
    m = Module("x", A, B, alpha=2.0)
    assert torch.allclose(
        m.apply(W, weight=0.5).double(), W.double() + 0.5 * (B.double() @ A.double()), atol=1e-6
    )
    assert torch.allclose(m.apply(m.apply(W), sign=-1.0), W, atol=1e-6)


def test_num_params_counts_every_tensor():
    m = Module("x", rnd(2, 6), rnd(8, 2), alpha=1.0, bias=rnd(8), magnitude=rnd(8), dora_axis=0)
    assert m.num_params == 12 + 16 + 8 + 8
    assert math.isclose(m.scale, 0.5)
