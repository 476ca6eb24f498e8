"""Joint dual attention (the MMDiT pivot) vs plain concatenated attention: forward, gradients, masks, errors.

The ground truth is `joint_dual_attention_reference` (torch.cat of [image; text] keys, one SDPA per branch) in
float64; the merged version must match it to rounding, on both of its image paths (PyTorch's fused kernel and
the chunked online softmax), and must never hand a gradient to the image stream or to branch 1.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from xling.kernels import (
    joint_dual_attention,
    joint_dual_attention_mse,
    joint_dual_attention_mse_reference,
    joint_dual_attention_reference,
)
from xling.kernels.joint_attention import _fused_image_part

NAMES = ("q", "k_img", "v_img", "k1", "v1", "k2", "v2")

# Max-abs error over max(max-abs of the reference, 1) (see test_dual_attention.py): float64 vs float64 is
# rounding only; fp32 / fp16 / bf16 are their forward against the float64 reference.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(
    b: int,
    h: int,
    n: int,
    m1: int,
    m2: int,
    d: int,
    dtype: torch.dtype = torch.float64,
    transposed: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """q, k_img, v_img `[B, H, N, d]`, k1, v1 `[B, H, M1, d]`, k2, v2 `[B, H, M2, d]`.

    `transposed` is diffusers' `view(B, L, H, d).transpose(1, 2)` layout (non-contiguous).
    """
    gen = torch.Generator().manual_seed(seed)

    def make(length: int) -> torch.Tensor:
        if transposed:
            return torch.randn(b, length, h, d, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(b, h, length, d, generator=gen, dtype=torch.float64).to(dtype)

    return [make(n), make(n), make(n), make(m1), make(m1), make(m2), make(m2)]


def make_mask(b: int, m: int, seed: int) -> torch.Tensor:
    """Random key-padding mask `[B, M]`, rows differing, at least one attended key per row."""
    mask = torch.rand(b, m, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0] = True
    return mask


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1.0)).item()


def run(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: list[torch.Tensor],
    mse: bool,
    grad_q: bool,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Run `fn` on leaf copies (every one but q requiring grad), backpropagate, return (o1, o2 or loss, grads)."""
    leaves = [t.detach().clone().requires_grad_(name != "q" or grad_q) for name, t in zip(NAMES, inputs)]
    o1, second = fn(*leaves, **kwargs)
    if mse:
        objective = second * o1.numel()  # a sum of squares: fp16 gradients stay far from underflow
    else:
        upstream = torch.randn(second.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        objective = (second.double() * upstream).sum()
    objective.backward()
    return o1, second, {name: t.grad for name, t in zip(NAMES, leaves)}


def check(
    inputs: list[torch.Tensor],
    mse: bool,
    grad_q: bool,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    image_chunk: int | None = None,
) -> None:
    dtype = inputs[0].dtype
    fn = joint_dual_attention_mse if mse else joint_dual_attention
    ref = joint_dual_attention_mse_reference if mse else joint_dual_attention_reference
    o1, second, grads = run(fn, inputs, mse, grad_q, mask1=mask1, mask2=mask2, image_chunk=image_chunk)
    r1, r_second, r_grads = run(ref, [t.double() for t in inputs], mse, grad_q, mask1=mask1, mask2=mask2)

    assert o1.dtype == dtype and o1.shape == inputs[0].shape
    assert not o1.requires_grad and o1.grad_fn is None
    assert rel_err(o1, r1) < TOL[dtype]
    if mse:
        assert second.dim() == 0
        assert second.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert abs(second.item() - r_second.item()) <= TOL[dtype] * r_second.item()
    else:
        assert second.dtype == dtype and second.shape == inputs[0].shape
        assert rel_err(second, r_second) < TOL[dtype]
    # The contract: o2 (or the loss) reaches k2, v2 and q when it asks; never the image stream or branch 1.
    for name in ("k_img", "v_img", "k1", "v1"):
        assert grads[name] is None, name
    assert (grads["q"] is None) == (not grad_q)
    for name in ("q", "k2", "v2") if grad_q else ("k2", "v2"):
        g, r = grads[name], r_grads[name]
        assert g is not None and r is not None and g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < TOL[dtype], (name, rel_err(g, r))


# (B, H, N_img, M1, M2, d): small ones at several batch/head counts, awkward sizes (N_img 65, M = 1, M1 != M2),
# then the big ones at B = H = 1.
SMALL = [(2, 2, 64, 77, 77, 64), (1, 3, 65, 1, 7, 128), (2, 1, 65, 77, 1, 64), (3, 2, 97, 13, 120, 64)]
BIG = [(1, 1, 1024, 77, 154, 128), (1, 1, 4096, 512, 77, 64)]


@pytest.mark.parametrize("grad_q", [False, True], ids=["kv-grad", "q-grad"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
def test_matches_concatenated_reference_float64(
    shape: tuple[int, ...], mse: bool, masked: bool, grad_q: bool
) -> None:
    b, h, n, m1, m2, d = shape
    inputs = make_inputs(b, h, n, m1, m2, d, seed=sum(shape))
    masks = {"mask1": make_mask(b, m1, 1), "mask2": make_mask(b, m2, 2)} if masked else {}
    check(inputs, mse, grad_q, **masks)


@pytest.mark.parametrize(
    ("shape", "mse", "grad_q", "image_chunk"),
    [
        (BIG[0], False, True, None),
        (BIG[0], True, True, 300),
        (BIG[1], True, False, None),
        (BIG[1], False, False, 1000),
    ],
    ids=["1024-fused-q-grad", "1024-chunked-q-grad", "4096-fused", "4096-chunked"],
)
def test_big_shapes_match_reference_float64(
    shape: tuple[int, ...], mse: bool, grad_q: bool, image_chunk: int | None
) -> None:
    # SD3 / Flux-sized image sequences (1024 and 4096 tokens) with 77..512 text tokens, masked, on both paths.
    b, h, n, m1, m2, d = shape
    masks = make_mask(b, m1, 3), make_mask(b, m2, 4)
    check(make_inputs(b, h, n, m1, m2, d, seed=n), mse, grad_q, *masks, image_chunk=image_chunk)


@pytest.mark.parametrize("image_chunk", [1, 16, 50, 65, 1000])
@pytest.mark.parametrize("grad_q", [False, True], ids=["kv-grad", "q-grad"])
def test_chunked_image_path_matches_reference(grad_q: bool, image_chunk: int) -> None:
    # The online softmax over image-key chunks (what runs off the CPU, e.g. on CUDA), with and without a q grad:
    # uneven last chunks (65 = 4 * 16 + 1), a chunk per key, one chunk bigger than N_img.
    inputs = make_inputs(2, 2, 65, 9, 30, 64, transposed=True, seed=image_chunk)
    check(inputs, False, grad_q, make_mask(2, 9, 5), make_mask(2, 30, 6), image_chunk=image_chunk)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_low_precision_forward_and_gradients(dtype: torch.dtype, mse: bool, transposed: bool) -> None:
    inputs = make_inputs(2, 2, 130, 77, 33, 64, dtype=dtype, transposed=transposed, seed=11)
    check(inputs, mse, True, make_mask(2, 77, 7), make_mask(2, 33, 8))
    check(inputs, mse, False, make_mask(2, 77, 7), make_mask(2, 33, 8))


@pytest.mark.parametrize("image_chunk", [None, 24], ids=["fused", "chunked"])
@pytest.mark.parametrize("mse", [False, True], ids=["dual", "mse"])
def test_fully_masked_text_row_falls_back_to_the_image_keys(mse: bool, image_chunk: int | None) -> None:
    # A batch element whose text is all padding still attends to the image keys: its output is plain image
    # self-attention (never NaN, unlike cross-attention's empty softmax), and its k2 / v2 get exactly zero
    # gradient, while the other element's are non-zero.
    inputs = make_inputs(2, 2, 65, 7, 5, 64, seed=13)
    mask1, mask2 = torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    mask1[1] = False
    mask2[0] = False
    check(inputs, mse, True, mask1, mask2, image_chunk=image_chunk)

    o1, o2 = joint_dual_attention(*inputs, mask1=mask1, mask2=mask2, image_chunk=image_chunk)
    q, k_img, v_img = inputs[:3]
    image_only = F.scaled_dot_product_attention(q, k_img, v_img)
    assert rel_err(o2[0], image_only[0]) < 1e-12 and rel_err(o1[1], image_only[1]) < 1e-12
    assert rel_err(o2[1], image_only[1]) > 1e-3  # the attended text really changes the other element

    _, _, grads = run(joint_dual_attention_mse if mse else joint_dual_attention, inputs, mse, True,
                      mask1=mask1, mask2=mask2, image_chunk=image_chunk)  # fmt: skip
    for name in ("q", "k2", "v2"):
        assert torch.isfinite(grads[name]).all(), name
    for name in ("k2", "v2"):
        assert torch.equal(grads[name][0], torch.zeros_like(grads[name][0])), name
        assert grads[name][1].abs().sum() > 0, name


def test_masked_text_keys_are_ignored() -> None:
    # A padded text key must not matter: changing it leaves both outputs bit-identical.
    inputs = make_inputs(1, 2, 64, 10, 12, 64, seed=17)
    mask1, mask2 = make_mask(1, 10, 9), make_mask(1, 12, 10)
    mask1[0, 3], mask2[0, 5] = False, False
    o1, o2 = joint_dual_attention(*inputs, mask1=mask1, mask2=mask2)
    changed = [t.clone() for t in inputs]
    changed[3][:, :, 3] += 5.0
    changed[6][:, :, 5] -= 5.0
    p1, p2 = joint_dual_attention(*changed, mask1=mask1, mask2=mask2)
    assert torch.equal(o1, p1) and torch.equal(o2, p2)


def test_custom_scale() -> None:
    inputs = make_inputs(1, 2, 64, 7, 9, 64, seed=19)
    o1, o2 = joint_dual_attention(*inputs, scale=0.3)
    r1, r2 = joint_dual_attention_reference(*inputs, scale=0.3)
    assert rel_err(o1, r1) < 1e-12 and rel_err(o2, r2) < 1e-12
    assert rel_err(o2, joint_dual_attention(*inputs)[1]) > 1e-2  # the scale is really used


@pytest.mark.parametrize("grad_q", [False, True], ids=["kv-grad", "q-grad"])
def test_both_image_paths_agree_and_the_fused_one_runs_on_cpu(grad_q: bool) -> None:
    # The fused CPU kernel is a private PyTorch op: if an upgrade drops it, this fails instead of every pivot
    # step quietly taking the slower chunked path.
    q, k_img, v_img = make_inputs(2, 2, 65, 1, 1, 64, dtype=torch.float32, seed=23)[:3]
    assert _fused_image_part(q.clone().requires_grad_(grad_q), k_img, v_img, 0.125) is not None
    inputs = make_inputs(2, 2, 65, 9, 30, 64, dtype=torch.float32, seed=23)
    inputs[0].requires_grad_(grad_q)
    fused = joint_dual_attention(*inputs)
    chunked = joint_dual_attention(*inputs, image_chunk=20)
    for a, b in zip(fused, chunked):
        assert rel_err(a.detach(), b.detach()) < 1e-5
    if grad_q:  # the fused path's q gradient (through _LogSumExp) against the chunked autograd one
        upstream = torch.randn(fused[1].shape, generator=torch.Generator().manual_seed(1))
        (g_fused,) = torch.autograd.grad((fused[1] * upstream).sum(), inputs[0])
        (g_chunked,) = torch.autograd.grad((chunked[1] * upstream).sum(), inputs[0])
        assert rel_err(g_fused, g_chunked) < 1e-5


@pytest.mark.parametrize(
    ("grad_q", "image_chunk"),
    [(False, None), (False, 64), (True, None)],
    ids=["fused", "chunked", "fused-q-grad"],
)
def test_graph_holds_no_image_score_matrix(grad_q: bool, image_chunk: int | None) -> None:
    # What autograd keeps for backward is O(N * (d + M2)), never the [N_img, N_kv] image scores: in the pivot's
    # case (q from a no-grad teacher pass) on every path, and with a q gradient on the fused CPU path. (The
    # chunked path with a q gradient does hold them: README, "Image path".)
    n, m2, d = 2048, 77, 64
    q, k_img, v_img, k1, v1, k2, v2 = make_inputs(1, 1, n, 77, m2, d, dtype=torch.float32, seed=29)
    for t in (q, k2, v2) if grad_q else (k2, v2):
        t.requires_grad_()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = joint_dual_attention_mse(q, k_img, v_img, k1, v1, k2, v2, image_chunk=image_chunk)
    loss.backward()
    assert 0 < sum(storages.values()) <= 8 * n * (d + m2) < n * n
    assert k2.grad is not None and v2.grad is not None and (q.grad is not None) == grad_q


def test_no_graph_under_no_grad() -> None:
    inputs = make_inputs(1, 1, 64, 5, 6, 64, seed=31)
    inputs[5].requires_grad_()
    with torch.no_grad():
        o1, o2 = joint_dual_attention(*inputs)
    assert o1.grad_fn is None and o2.grad_fn is None


_BAD = [
    ("q", lambda t: t[0][0], ValueError, "q must be 4-D"),
    (
        "k_img",
        lambda t: t[1][..., :8],
        ValueError,
        r"k_img must have shape \[B, H, N_img, d\] = \(2, 2, N_img",
    ),
    ("v_img", lambda t: t[2][:, :, :5], ValueError, r"v_img must have the shape of k_img \(2, 2, 16, 64\)"),
    ("k1", lambda t: t[3][:1], ValueError, r"k1 must have shape \[B, H, M1, d\]"),
    ("k2", lambda t: t[5][:, :, :0], ValueError, r"k2 must have shape \[B, H, M2, d\]"),
    ("v2", lambda t: t[6][:, :, :2], ValueError, "v2 must have the shape of k2"),
    ("v1", lambda t: t[4].half(), TypeError, "v1 has dtype torch.float16 but q has torch.float64; all seven"),
    ("k_img", lambda t: t[1].int(), TypeError, "k_img has dtype torch.int32; supported: float64"),
    ("v_img", lambda t: t[2].numpy(), TypeError, "v_img must be a torch.Tensor"),
]


@pytest.mark.parametrize(
    "fn",
    [joint_dual_attention, joint_dual_attention_mse, joint_dual_attention_reference],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize(
    ("arg", "corrupt", "exc", "message"), _BAD, ids=[f"{a}-{m[:14]}" for a, _, _, m in _BAD]
)
def test_bad_inputs_raise(
    fn: Callable[..., object],
    arg: str,
    corrupt: Callable[[list[torch.Tensor]], object],
    exc: type,
    message: str,
) -> None:
    inputs = make_inputs(2, 2, 16, 5, 6, 64)
    args: list[object] = list(inputs)
    args[NAMES.index(arg)] = corrupt(inputs)
    with pytest.raises(exc, match=message):
        fn(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"mask1": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "mask1 must be a bool tensor"),
        (
            {"mask1": torch.ones(2, 6, dtype=torch.bool)},
            ValueError,
            r"mask1 must have shape \[B, M1\] = \(2, 5\)",
        ),
        (
            {"mask2": torch.ones(6, dtype=torch.bool)},
            ValueError,
            r"mask2 must have shape \[B, M2\] = \(2, 6\)",
        ),
        ({"mask2": [True] * 6}, TypeError, "mask2 must be a torch.Tensor or None"),
        ({"scale": 0.0}, ValueError, "scale must be a positive finite number"),
        ({"image_chunk": 0}, ValueError, "image_chunk must be a positive int or None, got 0"),
        ({"image_chunk": 2.5}, ValueError, "image_chunk must be a positive int"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], exc: type, message: str) -> None:
    inputs = make_inputs(2, 2, 16, 5, 6, 64)
    with pytest.raises(exc, match=message):
        joint_dual_attention(*inputs, **kwargs)
