"""The feature tap: forward hooks that capture UNet block outputs (PEA-Diffusion's feature distillation).

PEA-Diffusion (Ma et al., 2023, arXiv:2311.17086) distils the student pass towards the teacher pass on the
outputs of every down block, the mid block and every up block of the frozen UNet. Run the UNet once per pass
inside the tap and take the features after each.

On a transformer denoiser (PixArt, Sana, SD3, Flux) the blocks are the ``transformer_blocks`` (then Flux's
``single_transformer_blocks``) and a block's feature is its IMAGE-token output ``[B, N, C]``: MMDiT blocks return
``(encoder_hidden_states, hidden_states)`` (SD3's last block ``(None, hidden_states)``, Flux's single blocks the
split ``(text, image)`` too), the cross-attention DiT blocks return ``hidden_states``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def pea_blocks(unet: nn.Module) -> tuple[str, ...]:
    """PEA's default set: ``down_blocks.0 .. down_blocks.{n-1}``, ``mid_block``, ``up_blocks.0 .. up_blocks.{n-1}``.

    Four down and four up blocks in SD 1.x / 2.x (9 features), three each in SDXL (7 features). A transformer
    denoiser without UNet blocks gives every ``transformer_blocks.{i}``, then every Flux
    ``single_transformer_blocks.{i}``.
    """
    if not any(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        return tuple(
            f"{prefix}.{i}"
            for prefix in ("transformer_blocks", "single_transformer_blocks")
            for i in range(len(getattr(unet, prefix, None) or ()))
        )
    names = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", ())))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", ())))]
    return tuple(names)


def _first_tensor(output: Any) -> Tensor:
    """A down block returns ``(hidden_states, residuals)``; mid and up blocks return ``hidden_states``."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"a tapped block returned {type(output).__name__}, expected a Tensor or a tuple of them"
        )
    return output


def _is_mmdit_block(module: nn.Module) -> bool:
    """SD3 / Flux blocks, whose output is ``(encoder_hidden_states, hidden_states)``."""
    from xling.core.joint_pivot import _block_types

    try:
        return type(module) in _block_types()
    except ImportError:  # a diffusers without these blocks has none of them
        return False


def _image_tokens(output: Any) -> Tensor:
    """An MMDiT block's image-token output, the second of ``(encoder_hidden_states, hidden_states)``."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], Tensor)):
        raise TypeError(
            f"an MMDiT block returned {type(output).__name__}, expected (encoder_hidden_states, hidden_states)"
        )
    return output[1]


class FeatureTap:
    """Context manager that records the outputs of chosen UNet blocks on every forward.

    Each forward overwrites the entries of the blocks it runs; use :meth:`take` between the teacher pass and the
    student pass. Features keep their graph (a student pass through the frozen UNet back-propagates to the student).

    Example::

        with FeatureTap(teacher.unet) as tap:
            with torch.no_grad():
                teacher.unet(z_t, t, encoder_hidden_states=E_en)
            teacher_feats = tap.take()
            teacher.unet(z_t, t, encoder_hidden_states=E_zh)
            student_feats = tap.take()  # dict name -> [B, C, h, w]

    Args:
        unet: a diffusers UNet (any ``nn.Module`` whose blocks are reachable by ``get_submodule``).
        blocks: dotted module names to tap; ``None`` = :func:`pea_blocks`.

    Attributes:
        blocks: the tapped names, in the given order.
        features: ``{name: [B, C, h, w]}`` (UNet blocks) or ``{name: [B, N, C]}`` (transformer blocks: the
            image tokens) from the latest forward.
    """

    def __init__(self, unet: nn.Module, blocks: Sequence[str] | None = None) -> None:
        if not isinstance(unet, nn.Module):
            raise TypeError(f"`unet` must be an nn.Module, got {type(unet).__name__}")
        self.unet = unet
        self.blocks: tuple[str, ...] = pea_blocks(unet) if blocks is None else tuple(blocks)
        if not self.blocks:
            raise ValueError("`blocks` is empty: nothing to tap")
        unknown = []
        for name in self.blocks:
            try:
                unet.get_submodule(name)
            except AttributeError:
                unknown.append(name)
        if unknown:
            raise ValueError(f"`blocks` names modules the UNet does not have: {', '.join(unknown)}")
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def installed(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def _hook(self, name: str, extract: Callable[[Any], Tensor]) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.features[name] = extract(output)

        return hook

    def install(self) -> FeatureTap:
        """Register one forward hook per block; returns ``self``."""
        if self.installed:
            raise RuntimeError("FeatureTap is already installed")
        for name in self.blocks:
            block = self.unet.get_submodule(name)
            extract = _image_tokens if _is_mmdit_block(block) else _first_tensor
            self._handles.append(block.register_forward_hook(self._hook(name, extract)))
        return self

    def remove(self) -> None:
        """Remove every hook this tap registered and drop the features."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the recorded features."""
        self.features = {}

    def take(self) -> dict[str, Tensor]:
        """The features of the latest forward, in :attr:`blocks` order; the tap is cleared for the next pass.

        Raises:
            RuntimeError: a block did not run since the last :meth:`take` (no forward, or a different model path).
        """
        missing = [n for n in self.blocks if n not in self.features]
        if missing:
            raise RuntimeError(
                f"no features recorded for {', '.join(missing)}: run the UNet inside the tap first"
            )
        out = {n: self.features[n] for n in self.blocks}
        self.clear()
        return out

    def __enter__(self) -> FeatureTap:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
