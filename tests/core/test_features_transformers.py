"""FeatureTap on transformer denoisers: every block's image-token output, for PixArt, Sana, SD3 and Flux."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.core.test_dit_pivot import _inputs as dit_inputs
from tests.core.test_dit_pivot import pixart, sana  # noqa: F401 - fixtures
from tests.core.test_joint_pivot import _inputs as mmdit_inputs
from tests.core.test_joint_pivot import flux, sd3  # noqa: F401 - fixtures
from xling.core.features import FeatureTap, pea_blocks

EXPECTED = {
    "pixart": ("transformer_blocks.0", "transformer_blocks.1"),
    "sana": ("transformer_blocks.0", "transformer_blocks.1"),
    "sd3": ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"),
    "flux": (
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ),
}
TOKENS = {"pixart": 16, "sana": 64, "sd3": 16, "flux": 16}


def _image_inputs_by_hand(model: nn.Module, blocks: tuple[str, ...]) -> tuple[list[torch.Tensor], list]:
    """Each block's image input, then ``norm_out``'s input: block i's image output is entry i + 1."""
    seen: list[torch.Tensor] = []
    handles = []

    def block_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    def norm_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    for name in blocks:
        handles.append(model.get_submodule(name).register_forward_pre_hook(block_hook, with_kwargs=True))
    handles.append(model.norm_out.register_forward_pre_hook(norm_hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family", list(EXPECTED))
def test_features_are_the_blocks_image_outputs(request, family):
    model = request.getfixturevalue(family)
    inputs = mmdit_inputs(model) if family in ("sd3", "flux") else dit_inputs(model)
    blocks = pea_blocks(model)
    assert blocks == EXPECTED[family]
    seen, handles = _image_inputs_by_hand(model, blocks)
    try:
        with FeatureTap(model) as tap, torch.no_grad():
            model(**inputs)
            features = tap.take()
    finally:
        for h in handles:
            h.remove()
    assert list(features) == list(blocks)
    assert len(seen) == len(blocks) + 1
    for i, name in enumerate(blocks):
        feat = features[name]
        assert feat.shape == (2, TOKENS[family], seen[0].shape[-1]), name
        torch.testing.assert_close(feat, seen[i + 1], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no features recorded"):
        tap.take()
