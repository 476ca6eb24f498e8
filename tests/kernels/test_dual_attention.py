"""Triton dual attention vs the two-SDPA reference: forward, every gradient, masks, layouts, errors.

Without CUDA the kernels run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are small; the GPU-only cases (bf16 kernels, Stable Diffusion shapes) skip cleanly without a device (bf16
on the interpreter is computed in fp32, see ops.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import xling.kernels as xk
from xling.kernels import (
    dual_attention,
    dual_attention_mse,
    dual_attention_mse_reference,
    dual_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Max-abs error over max(max-abs of the fp32 reference, 1): relative for the O(1..100) values these unit-variance
# inputs give, absolute near zero (e.g. dq for a single key, mathematically 0, is pure rounding noise).
TOL = {torch.float32: 5e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

pytestmark = pytest.mark.skipif(not xk.HAS_TRITON, reason="triton is not installed")


def make_inputs(
    b: int, h: int, n: int, m1: int, m2: int, d: int, dtype: torch.dtype, transposed: bool, seed: int = 0
) -> list[torch.Tensor]:
    """q, k1, v1, k2, v2 `[B, H, L, d]`; transposed = diffusers' `view(B, L, H, d).transpose(1, 2)` layout."""
    gen = torch.Generator().manual_seed(seed)

    def make(length: int) -> torch.Tensor:
        if transposed:
            t = torch.randn(b, length, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, length, d, generator=gen).to(DEVICE, dtype)
        return t

    return [make(n), make(m1), make(m1), make(m2), make(m2)]


def make_mask(b: int, m2: int, seed: int = 0) -> torch.Tensor:
    """Random key-padding mask `[B, M2]` with at least one attended key per row, rows differing."""
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, m2, generator=gen) < 0.6
    mask[:, 0] = True
    return mask.to(DEVICE)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (
        (actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1.0)
    ).item()


def run_op(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: list[torch.Tensor],
    mask2: torch.Tensor | None,
    mse: bool,
    upstream: torch.Tensor | None,
    grad_q: bool = True,
    grad_kv: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Run `fn` on leaf copies of `inputs`, backpropagate, return (o1, o2 or loss, [dq, dk2, dv2])."""
    q, k1, v1, k2, v2 = (t.detach().clone() for t in inputs)
    q.requires_grad_(grad_q)
    k2.requires_grad_(grad_kv)
    v2.requires_grad_(grad_kv)
    o1, second = fn(q, k1, v1, k2, v2, mask2=mask2)
    # The MSE is scaled by numel (a sum of squares) so fp16 gradients stay far from underflow.
    objective = second * o1.numel() if mse else (second.float() * upstream).sum()
    objective.backward()
    return o1, second, [q.grad, k2.grad, v2.grad]


def check_against_reference(
    inputs: list[torch.Tensor],
    mask2: torch.Tensor | None,
    mse: bool,
    grad_q: bool = True,
    grad_kv: bool = True,
) -> None:
    dtype = inputs[0].dtype
    tol = TOL[dtype]
    triton_fn = dual_attention_mse if mse else dual_attention
    ref_fn = dual_attention_mse_reference if mse else dual_attention_reference
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(inputs[0].shape, generator=gen).to(DEVICE)

    o1, second, grads = run_op(triton_fn, inputs, mask2, mse, upstream, grad_q, grad_kv)
    gold = [t.float() for t in inputs]
    r1, r_second, r_grads = run_op(ref_fn, gold, mask2, mse, upstream, grad_q, grad_kv)

    assert o1.dtype == dtype and o1.shape == inputs[0].shape
    assert not o1.requires_grad and o1.grad_fn is None
    assert rel_err(o1, r1) < tol
    if mse:
        assert second.dtype == torch.float32 and second.dim() == 0
        assert abs(second.item() - r_second.item()) <= tol * r_second.item()
    else:
        assert second.dtype == dtype
        assert rel_err(second, r_second) < tol
    for name, g, r, wanted in zip(("q", "k2", "v2"), grads, r_grads, (grad_q, grad_kv, grad_kv)):
        if not wanted:
            assert g is None, name
            continue
        assert g is not None and g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [40, 64, 80])
@pytest.mark.parametrize("m2", [1, 7, 77, 100])
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
def test_matches_reference(
    mse: bool, m2: int, d: int, dtype: torch.dtype, masked: bool, transposed: bool
) -> None:
    # B = 2 with a mask (each batch element has its own); N = 17 ends in a 1-row query tile (16-row tiles on
    # the interpreter), and 77 / 100 keys cross a partial key chunk.
    b = 2 if masked else 1
    m1 = 77 if m2 != 77 else 7  # branch 1 with another (also awkward) key length
    inputs = make_inputs(b, 2, 17, m1, m2, d, dtype, transposed, seed=m2 * 1000 + d)
    mask2 = make_mask(b, m2, seed=m2) if masked else None
    check_against_reference(inputs, mask2, mse)


@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize(("grad_q", "grad_kv"), [(False, True), (True, False)], ids=["kv-only", "q-only"])
def test_partial_gradients(mse: bool, grad_q: bool, grad_kv: bool) -> None:
    # IAP's case: q comes from a frozen no-grad UNet pass, only the student's k2, v2 need gradients.
    inputs = make_inputs(2, 2, 20, 77, 9, 40, torch.float32, transposed=True)
    check_against_reference(inputs, make_mask(2, 9), mse, grad_q=grad_q, grad_kv=grad_kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("empty", [[1], [0, 1]], ids=["one-empty", "all-empty"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
def test_fully_masked_row_gives_zero_output_and_gradient(
    mse: bool, impl: str, empty: list[int], dtype: torch.dtype
) -> None:
    # The one rule for a batch element that attends to nothing (mask2[b] all False), kernels and reference
    # alike: o2[b] = 0 exactly and exactly zero gradient to q[b], k2[b], v2[b], never NaN.
    inputs = make_inputs(2, 2, 17, 7, 5, 40, dtype, transposed=False)
    mask2 = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    mask2[empty] = False
    if impl == "triton":
        fn = dual_attention_mse if mse else dual_attention  # the Triton path here (see test_dispatch_...)
        check_against_reference(inputs, mask2, mse)
    else:
        fn = dual_attention_mse_reference if mse else dual_attention_reference
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    o1, second, grads = run_op(fn, inputs, mask2, mse, upstream)

    attended = [b for b in range(2) if b not in empty]
    if mse:
        # o2 is not returned: the loss must be the MSE to o2 = 0 for the empty elements, plain attention
        # (every key attended) for the others, with the returned o1 as the target.
        q, _, _, k2, v2 = (t.float() for t in inputs)
        o2 = torch.nn.functional.scaled_dot_product_attention(q, k2, v2)
        o2[empty] = 0.0
        expected = ((o1.float() - o2) ** 2).mean()
        assert torch.isfinite(second) and abs(second.item() - expected.item()) <= TOL[dtype] * expected.item()
    else:
        assert torch.equal(second[empty], torch.zeros_like(second[empty]))
        assert all(second[b].abs().sum() > 0 for b in attended)
    for name, g in zip(("q", "k2", "v2"), grads):
        assert g is not None and torch.isfinite(g).all(), name
        assert torch.equal(g[empty], torch.zeros_like(g[empty])), name
        assert all(g[b].abs().sum() > 0 for b in attended), name


def test_custom_scale() -> None:
    inputs = make_inputs(1, 2, 16, 7, 7, 64, torch.float32, transposed=False)
    o1, o2 = dual_attention(*inputs, scale=0.3)
    r1, r2 = dual_attention_reference(*inputs, scale=0.3)
    assert rel_err(o1, r1) < 1e-4 and rel_err(o2, r2) < 1e-4
    assert rel_err(o2, dual_attention(*inputs)[1]) > 1e-2  # the scale is really used


def test_mse_is_deterministic() -> None:
    inputs = make_inputs(2, 2, 33, 77, 13, 80, torch.float16, transposed=True)
    mask2 = make_mask(2, 13)
    runs = [run_op(dual_attention_mse, inputs, mask2, True, None) for _ in range(2)]
    (o1_a, loss_a, grads_a), (o1_b, loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and torch.equal(o1_a, o1_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


def test_dual_attention_is_deterministic() -> None:
    inputs = make_inputs(1, 2, 33, 7, 77, 40, torch.float32, transposed=False)
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (_, o2_a, grads_a), (_, o2_b, grads_b) = (
        run_op(dual_attention, inputs, None, False, upstream) for _ in range(2)
    )
    assert torch.equal(o2_a, o2_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


def test_dispatch_picks_triton_here() -> None:
    q = make_inputs(1, 1, 16, 1, 1, 40, torch.float32, False)[0]
    assert xk.use_triton(q) == (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    q, k1, v1, k2, v2 = make_inputs(1, 1, 16, 3, 3, 40, torch.float32, False)
    _, o2 = dual_attention(q.requires_grad_(), k1, v1, k2, v2)
    _, loss = dual_attention_mse(q, k1, v1, k2, v2)
    assert type(o2.grad_fn).__name__ == "DualAttentionFunctionBackward"
    assert type(loss.grad_fn).__name__ == "DualAttentionMSEFunctionBackward"


@pytest.mark.parametrize("mse", [False, True])
def test_teacher_mask_masks_branch_one_on_the_reference(mse: bool) -> None:
    """``mask1`` (a padded teacher text, e.g. PixArt's T5 mask) masks branch 1; the Triton kernels take no
    branch-1 mask, so the call runs on the reference and branch 2 is what the unmasked call gives."""
    q, k1, v1, k2, v2 = make_inputs(2, 2, 16, 7, 6, 40, torch.float32, False)
    mask1, mask2 = make_mask(2, 7, seed=3), make_mask(2, 6)
    mask1[1] = False  # no teacher key at all: o1 = 0, never NaN
    q.requires_grad_()
    o1, second = (dual_attention_mse if mse else dual_attention)(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2)
    assert o1.grad_fn is None and "DualAttention" not in type(second.grad_fn).__name__
    attend = mask1[:1, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q[:1], k1[:1], v1[:1], attn_mask=attend)
    torch.testing.assert_close(o1[:1], expected)
    assert torch.equal(o1[1], torch.zeros_like(o1[1]))
    _, o2 = dual_attention_reference(q, k1, v1, k2, v2, mask2=mask2)
    torch.testing.assert_close(second, torch.nn.functional.mse_loss(o2.float(), o1.float()) if mse else o2)
    with pytest.raises(ValueError, match=r"mask1 must have shape \[B, M1\] = \(2, 7\)"):
        dual_attention(q, k1, v1, k2, v2, mask1=mask1[:, :6])


_BAD = [
    ("q", lambda t: t[0][0], ValueError, "q must be 4-D"),
    ("k1", lambda t: t[1][:, :1], ValueError, "k1 shape"),
    ("v2", lambda t: t[4][:, :, :2], ValueError, "v2 shape"),
    ("k2", lambda t: t[3][..., :8], ValueError, "k2 shape"),
    ("v1", lambda t: t[2].double(), TypeError, "v1 has dtype torch.float64"),
    ("k2", lambda t: t[3].half(), TypeError, "k2 has dtype torch.float16 but q has torch.float32"),
    ("q", lambda t: t[0].numpy(), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize(
    "fn", [dual_attention, dual_attention_mse, dual_attention_reference], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    ("arg", "corrupt", "exc", "message"), _BAD, ids=[f"{a}-{m[:12]}" for a, _, _, m in _BAD]
)
def test_bad_inputs_raise(
    fn: Callable[..., object],
    arg: str,
    corrupt: Callable[[list[torch.Tensor]], object],
    exc: type,
    message: str,
) -> None:
    inputs = [t.cpu() for t in make_inputs(2, 2, 16, 5, 6, 40, torch.float32, False)]
    names = ["q", "k1", "v1", "k2", "v2"]
    inputs[names.index(arg)] = corrupt(inputs)
    with pytest.raises(exc, match=message):
        fn(*inputs)


@pytest.mark.parametrize(
    ("mask2", "exc", "message"),
    [
        (torch.ones(2, 6, dtype=torch.int64), TypeError, "mask2 must be a bool tensor"),
        (torch.ones(2, 5, dtype=torch.bool), ValueError, r"mask2 must have shape \[B, M2\] = \(2, 6\)"),
        (torch.ones(6, dtype=torch.bool), ValueError, "mask2 must have shape"),
    ],
)
def test_bad_mask_raises(mask2: torch.Tensor, exc: type, message: str) -> None:
    inputs = make_inputs(2, 2, 16, 5, 6, 40, torch.float32, False)
    with pytest.raises(exc, match=message):
        dual_attention(*inputs, mask2=mask2.to(DEVICE))


def test_bad_scale_and_head_dim_raise() -> None:
    inputs = make_inputs(1, 1, 16, 5, 6, 40, torch.float32, False)
    with pytest.raises(ValueError, match="scale must be a positive"):
        dual_attention_mse(*inputs, scale=-1.0)
    wide = make_inputs(1, 1, 16, 2, 2, 320, torch.float32, False)
    with pytest.raises(ValueError, match="head dims up to 256, got d=320"):
        dual_attention(*wide)


def test_imports_and_falls_back_without_triton() -> None:
    # A fresh interpreter where `import triton` fails and TRITON_INTERPRET is unset: the package imports and
    # dual_attention runs the reference (the env of this process is left alone).
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, xling.kernels as xk\n"
        "assert not xk.HAS_TRITON\n"
        "q, k1, v1, k2, v2 = (torch.randn(1, 2, 5, 8) for _ in range(5))\n"
        "o1, o2 = xk.dual_attention(q, k1, v1, k2, v2)\n"
        "r1, r2 = xk.dual_attention_reference(q, k1, v1, k2, v2)\n"
        "assert torch.equal(o2, r2) and not xk.use_triton(q)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs on Triton's CPU interpreter (TRITON_INTERPRET=1)"
)


@interpreter
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_bf16_on_the_interpreter_matches_reference(mse: bool, masked: bool) -> None:
    # The interpreter's bf16 tl.dot is wrong (outputs near 1e8); ops.py computes bf16 in fp32 there and casts
    # back, so outputs and gradients are bf16 and within bf16 tolerance of the fp32 reference.
    inputs = make_inputs(2, 2, 17, 77, 9, 40, torch.bfloat16, transposed=True, seed=3)
    assert xk.use_triton(inputs[0])
    check_against_reference(inputs, make_mask(2, 9) if masked else None, mse)


@interpreter
def test_bf16_on_the_interpreter_runs_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # The upcast must feed the Triton kernels (fp32), not quietly take the reference.
    import xling.kernels.ops as ops

    seen: list[torch.dtype] = []
    kernel = ops.dual_attention_triton

    def spy(q: torch.Tensor, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(q.dtype)
        return kernel(q, *rest)

    monkeypatch.setattr(ops, "dual_attention_triton", spy)
    o1, o2 = dual_attention(*make_inputs(1, 1, 16, 5, 6, 40, torch.bfloat16, False))
    assert seen == [torch.float32]
    assert o1.dtype == o2.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- GPU-only cases


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize(
    ("m2", "d", "masked"), [(77, 40, True), (1, 64, False), (100, 80, True), (77, 160, False)]
)
def test_bf16_matches_reference(mse: bool, m2: int, d: int, masked: bool) -> None:
    inputs = make_inputs(2, 2, 65, 77, m2, d, torch.bfloat16, transposed=True)
    check_against_reference(inputs, make_mask(2, m2) if masked else None, mse)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize(
    ("n", "h", "d", "m2", "masked"),
    [
        (4096, 8, 40, 77, False),
        (1024, 8, 80, 77, False),
        (256, 8, 160, 512, True),
        (4096, 10, 64, 77, False),
        (1024, 20, 64, 300, True),
    ],
)
def test_stable_diffusion_shapes(mse: bool, n: int, h: int, d: int, m2: int, masked: bool) -> None:
    # Full-size layers at batch 2 (fp16, diffusers layout): the specialised / autotuned builds, split dK/dV.
    inputs = make_inputs(2, h, n, 77, m2, d, torch.float16, transposed=True)
    check_against_reference(inputs, make_mask(2, m2) if masked else None, mse)
