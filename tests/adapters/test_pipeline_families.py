"""attach() on the transformer families: PixArt-α/Σ, Sana, SD3, Flux (tiny pipelines loaded from disk).

Each family is given its embeddings by its own keyword arguments (masks for PixArt / Sana, pooled vectors for
SD3 / Flux); these tests spy on the pipeline's ``__call__`` to see exactly what it receives, and compare the
wrapper's images with the pipeline called by hand with the student's embeddings.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from xling.adapters import (
    LanguageEncoder,
    LinearHead,
    LinearHeadConfig,
    MLPAdapter,
    MLPAdapterConfig,
    WidthMismatchError,
    attach,
    load_head,
)
from xling.adapters.pipeline import pipeline_family, pipeline_widths

diffusers = pytest.importorskip("diffusers")

CAT = "一只戴帽子的猫"
MOUNTAIN = "水墨画中的山和河流"
RUN = {"num_inference_steps": 2, "output_type": "pt", "height": 32, "width": 32}
STUDENT_WIDTH = 48  # tiny_bert_path's hidden size
MASKS = ("prompt_attention_mask", "negative_prompt_attention_mask")
POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass(frozen=True)
class Case:
    family: str  # the head's teacher_family and the detected pipeline family
    pipeline: str  # diffusers class
    fixture: str  # conftest fixture of the saved pipeline folder
    width: int  # conditioning width of the tiny pipeline
    width_key: str
    pooled: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-family call arguments

    @property
    def masked(self) -> bool:
        return self.family in ("pixart", "sana")


# the PixArt / Sana pipelines snap (height, width) to their aspect-ratio bins unless told not to
_NO_BINS = {"use_resolution_binning": False}
CASES = [
    Case(
        "pixart",
        "PixArtAlphaPipeline",
        "tiny_pixart_path",
        32,
        "transformer.config.caption_channels",
        None,
        _NO_BINS,
    ),
    Case(
        "pixart",
        "PixArtSigmaPipeline",
        "tiny_pixart_sigma_path",
        32,
        "transformer.config.caption_channels",
        None,
        _NO_BINS,
    ),
    Case("sana", "SanaPipeline", "tiny_sana_path", 16, "transformer.config.caption_channels", None, _NO_BINS),
    Case(
        "sd3", "StableDiffusion3Pipeline", "tiny_sd3_path", 48, "transformer.config.joint_attention_dim", 32
    ),
    Case("flux", "FluxPipeline", "tiny_flux_path", 40, "transformer.config.joint_attention_dim", 20),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=CASES, ids=[c.pipeline for c in CASES])
def case(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The pipeline of one family loaded from its folder, and a saved adapter of its widths."""
    c: Case = request.param
    pipe = getattr(diffusers, c.pipeline).from_pretrained(request.getfixturevalue(c.fixture))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    head = LinearHead(
        LinearHeadConfig(
            student_width=STUDENT_WIDTH, teacher_width=c.width, teacher_family=c.family, pooled_width=c.pooled
        )
    )
    adapter = request.getfixturevalue("tmp_path_factory").mktemp(f"adapter-{c.pipeline}")
    LanguageEncoder.from_student(request.getfixturevalue("tiny_bert_path"), head).save_pretrained(adapter)
    return SimpleNamespace(c=c, pipe=pipe, adapter=adapter, wrapped=attach(pipe, adapter))


def _spy(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> list[dict[str, Any]]:
    """Record the keyword arguments of every call of ``pipe`` (the real ``__call__`` still runs)."""
    seen: list[dict[str, Any]] = []
    original = type(pipe).__call__

    @functools.wraps(original)
    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        assert not args, "the wrapper passes keyword arguments only"
        seen.append(dict(kwargs))
        return original(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    return seen


def _by_hand(c: Case, out_pos: Any, out_neg: Any | None, rows: slice, neg_rows: slice) -> dict[str, Any]:
    """The pipeline arguments for the student's encodings, written out per family (the rules under test)."""
    kw: dict[str, Any] = {"prompt_embeds": out_pos.prompt_embeds[rows]}
    if out_neg is not None:
        kw["negative_prompt_embeds"] = out_neg.prompt_embeds[neg_rows]
    if c.masked:
        kw["prompt_attention_mask"] = out_pos.attention_mask[rows]
        kw["negative_prompt_attention_mask"] = out_neg.attention_mask[neg_rows]
        kw["negative_prompt"] = None  # the pipelines' default "" cannot be given with negative embeds
    if c.pooled is not None:
        kw["pooled_prompt_embeds"] = out_pos.pooled_prompt_embeds[rows]
        if out_neg is not None:
            kw["negative_pooled_prompt_embeds"] = out_neg.pooled_prompt_embeds[neg_rows]
    return kw


def test_family_widths_and_detection(case):
    c, wrapped = case.c, case.wrapped
    assert wrapped.family.name == c.family
    assert (wrapped.cross_attention_dim, wrapped.needs_pooled, wrapped.pooled_width) == (
        c.width,
        c.pooled is not None,
        c.pooled,
    )
    assert pipeline_widths(case.pipe) == (c.width, c.pooled is not None, c.pooled)


def test_chinese_prompt_equals_the_pipeline_called_by_hand(case, monkeypatch):
    c, pipe, wrapped = case.c, case.pipe, case.wrapped
    seen = _spy(monkeypatch, pipe)
    image = wrapped(prompt=CAT, generator=_gen(), **RUN, **c.extra).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    kw = seen[-1]
    assert kw.get("prompt") is None
    embeds = kw["prompt_embeds"]
    assert embeds.ndim == 3 and embeds.shape[0] == 1 and embeds.shape[2] == c.width
    expected_keys = {"prompt_embeds"}
    if c.family != "flux":  # Flux gets no negative branch by default (distilled guidance)
        expected_keys.add("negative_prompt_embeds")
        assert kw["negative_prompt_embeds"].shape == embeds.shape
    if c.masked:
        expected_keys |= set(MASKS)
        for name in MASKS:
            assert kw[name].shape == embeds.shape[:2] and kw[name].dtype == torch.long
        assert "negative_prompt" in kw and kw["negative_prompt"] is None
    if c.pooled is not None:
        expected_keys |= {POOLED[0]} if c.family == "flux" else set(POOLED)
        assert kw["pooled_prompt_embeds"].shape == (1, c.pooled)
    made = {k for k in kw if k.endswith(("prompt_embeds", "attention_mask"))}
    assert made == expected_keys
    if not wrapped.family.repeats_embeds:
        assert kw["num_images_per_prompt"] == 1

    with torch.no_grad():
        if c.family == "flux":
            kwargs = _by_hand(c, wrapped.encoder([CAT]), None, slice(0, 1), slice(0, 0))
        else:  # the pipelines' own default negative prompt is ""
            both = wrapped.encoder([CAT, ""])
            kwargs = _by_hand(c, both, both, slice(0, 1), slice(1, 2))
    if c.masked:
        assert torch.equal(kw["prompt_attention_mask"], kwargs["prompt_attention_mask"].long())
        assert int(kw["prompt_attention_mask"].sum()) < kw["prompt_attention_mask"].shape[1]  # padded
    by_hand = pipe(**kwargs, generator=_gen(), **RUN, **c.extra).images
    assert torch.equal(image, by_hand)
    # the prompt matters
    other = wrapped(prompt=MOUNTAIN, generator=_gen(), **RUN, **c.extra).images
    assert not torch.equal(other, image)


def test_negative_prompts_string_list_none(case, monkeypatch):
    c, pipe, wrapped = case.c, case.pipe, case.wrapped
    pair = [CAT, MOUNTAIN]
    one = wrapped.encode_prompt(pair, negative_prompt="模糊的照片")
    assert one["negative_prompt_embeds"].shape == one["prompt_embeds"].shape
    assert torch.equal(one["negative_prompt_embeds"][0], one["negative_prompt_embeds"][1])  # broadcast
    each = wrapped.encode_prompt(pair, negative_prompt=["模糊的照片", "黑白的"])
    assert not torch.equal(each["negative_prompt_embeds"][0], each["negative_prompt_embeds"][1])
    if c.masked:
        assert each["negative_prompt_attention_mask"].shape == each["prompt_attention_mask"].shape
    if c.pooled is not None:
        assert each["negative_pooled_prompt_embeds"].shape == (2, c.pooled)
    with pytest.raises(ValueError, match="negative_prompt"):
        wrapped.encode_prompt(pair, negative_prompt=["a", "b", "c"])
    none = wrapped.encode_prompt(pair)
    if c.family == "flux":
        assert set(none) == {"prompt_embeds", "pooled_prompt_embeds"}
    else:
        with torch.no_grad():
            empty = wrapped.encoder([*pair, "", ""]).prompt_embeds[2:]
        assert torch.equal(none["negative_prompt_embeds"], empty)

    seen = _spy(monkeypatch, pipe)
    base = wrapped(prompt=CAT, generator=_gen(), **RUN, **c.extra).images
    negated = wrapped(prompt=CAT, negative_prompt="模糊的照片", generator=_gen(), **RUN, **c.extra).images
    if c.family == "flux":
        # without true CFG the pipeline has no negative branch, so none is passed and nothing changes
        assert "negative_prompt_embeds" not in seen[-1] and seen[-1].get("negative_prompt") is None
        assert torch.equal(negated, base)
        true_cfg = wrapped(
            prompt=CAT, negative_prompt="模糊的照片", true_cfg_scale=2.0, generator=_gen(), **RUN, **c.extra
        ).images
        kw = seen[-1]
        assert kw["negative_prompt_embeds"].shape == kw["prompt_embeds"].shape
        assert kw["negative_pooled_prompt_embeds"].shape == (1, c.pooled)
        assert not torch.equal(true_cfg, base)
    else:
        assert seen[-1]["negative_prompt_embeds"].shape == seen[-1]["prompt_embeds"].shape
        assert not torch.equal(negated, base)


def test_num_images_per_prompt(case, monkeypatch):
    c, pipe, wrapped = case.c, case.pipe, case.wrapped
    seen = _spy(monkeypatch, pipe)
    gens = [_gen(s) for s in range(4)]  # one generator per image, so each image can be made again alone
    images = wrapped(prompt=[CAT, MOUNTAIN], num_images_per_prompt=2, generator=gens, **RUN, **c.extra).images
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    kw = seen[-1]
    if wrapped.family.repeats_embeds:  # PixArt repeats given embeddings and masks itself
        assert kw["num_images_per_prompt"] == 2 and kw["prompt_embeds"].shape[0] == 2
    else:  # SD3 and Flux do not repeat given embeddings; Sana repeats its masks out of order
        assert kw["num_images_per_prompt"] == 1 and kw["prompt_embeds"].shape[0] == 4
        rows = [n for n in kw if n.endswith(("prompt_embeds", "attention_mask"))]
        for name in rows:
            t = kw[name]
            assert torch.equal(t[0], t[1]) and torch.equal(t[2], t[3]), name
        assert not torch.equal(kw["prompt_embeds"][0], kw["prompt_embeds"][2])
        if c.masked:  # the two prompts have different lengths, and each keeps its own mask
            assert kw["prompt_attention_mask"][0].sum() != kw["prompt_attention_mask"][2].sum()
    # each prompt alone, with the same generators, makes the same two images
    for i, prompt in enumerate((CAT, MOUNTAIN)):
        alone = wrapped(
            prompt=prompt,
            num_images_per_prompt=2,
            generator=[_gen(s) for s in (2 * i, 2 * i + 1)],
            **RUN,
            **c.extra,
        ).images
        torch.testing.assert_close(alone, images[2 * i : 2 * i + 2], atol=1e-5, rtol=1e-4)


def test_wrong_width_names_the_family_key(case, tiny_bert_path):
    c, pipe = case.c, case.pipe

    def encoder(**widths: Any) -> LanguageEncoder:
        cfg = {"student_width": STUDENT_WIDTH, "teacher_width": c.width, "pooled_width": c.pooled, **widths}
        return LanguageEncoder.from_student(tiny_bert_path, LinearHead(LinearHeadConfig(**cfg)))

    with pytest.raises(WidthMismatchError) as err:
        attach(pipe, encoder(teacher_width=c.width + 3))
    assert f"teacher_width {c.width + 3} != {c.width_key} {c.width}" in str(err.value)
    assert c.pipeline in str(err.value)
    if c.pooled is not None:
        with pytest.raises(WidthMismatchError, match=r"transformer\.config\.pooled_projection_dim"):
            attach(pipe, encoder(pooled_width=c.pooled + 1))
        with pytest.raises(WidthMismatchError, match="no pooled output"):
            attach(pipe, encoder(pooled_width=None))
    else:  # PixArt and Sana take no pooled vector, so a head's pooled width does not matter
        assert attach(pipe, encoder(pooled_width=7)).pooled_width is None


def test_prompt_with_embeddings_raises(case):
    c, wrapped = case.c, case.wrapped
    embeds = wrapped.encode_prompt(CAT)
    with pytest.raises(TypeError, match="not both"):
        wrapped(prompt=CAT, prompt_embeds=embeds["prompt_embeds"], **RUN, **c.extra)
    own = {
        "pixart": {"prompt_attention_mask": torch.ones(1, 2)},
        "sana": {"negative_prompt_attention_mask": torch.ones(1, 2)},
        "sd3": {"prompt_3": "a cat"},
        "flux": {"prompt_2": "a cat"},
    }[c.family]
    with pytest.raises(TypeError, match=next(iter(own))):
        wrapped(prompt=CAT, **own)
    # prompt=None passes through: the caller's own embeddings go to the pipeline and give the same image
    image = wrapped(prompt=None, **embeds, generator=_gen(), **RUN, **c.extra).images
    assert torch.equal(image, wrapped(prompt=CAT, generator=_gen(), **RUN, **c.extra).images)


def test_family_from_config_keys_when_the_class_is_hidden():
    """A compiled transformer hides its class; the config keys still name the family."""

    def pipe(**config: Any) -> Any:
        transformer = SimpleNamespace(config=_Config(config))
        return SimpleNamespace(transformer=transformer)

    assert pipeline_family(pipe(caption_channels=32, norm_type="ada_norm_single")).name == "pixart"
    assert pipeline_family(pipe(caption_channels=16, num_cross_attention_heads=2)).name == "sana"
    sd3 = pipe(joint_attention_dim=48, pooled_projection_dim=32, caption_projection_dim=24)
    assert pipeline_family(sd3).name == "sd3" and pipeline_widths(sd3) == (48, True, 32)
    flux = pipe(joint_attention_dim=40, pooled_projection_dim=20, guidance_embeds=True)
    assert pipeline_family(flux).name == "flux" and pipeline_widths(flux) == (40, True, 20)
    with pytest.raises(TypeError, match="not a supported pipeline"):
        pipeline_family(pipe(in_channels=4))
    with pytest.raises(TypeError, match="no `unet` or `transformer`"):
        pipeline_family(SimpleNamespace())


class _Config(dict):
    """A diffusers-like frozen config: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_head_configs_saved_before_the_new_families_still_load(family, tmp_path):
    """config.json files as xling wrote them for SD 1.x / SDXL heads load unchanged."""
    pooled = 32 if family == "sdxl" else None
    torch.manual_seed(0)
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=48, teacher_width=64, teacher_family=family, pooled_width=pooled, hidden_width=16
        )
    )
    head.save_pretrained(tmp_path)
    digest = json.loads((tmp_path / "config.json").read_text())["weights_sha256"]
    # written by hand with the fields of the release before the transformer families (and before `pooled`)
    old = {
        "head_type": "mlp",
        "student_width": 48,
        "teacher_width": 64,
        "teacher_family": family,
        "pooled_width": pooled,
        "student_model": None,
        "language": "zh",
        "format_version": 1,
        "hidden_width": 16,
        "num_layers": 3,
        "layer_norm_eps": 1e-5,
        "weights_sha256": digest,
    }
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2) + "\n")
    loaded = load_head(tmp_path)
    assert loaded.config.teacher_family == family and loaded.config.pooled_width == pooled
    assert loaded.config.pooled == "masked"  # the default of a field added later
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(loaded(x).prompt_embeds, head(x).prompt_embeds)


def test_a_pipeline_without_negative_inputs_gets_none(tiny_bert_path):
    """Sana Sprint's ``__call__`` takes no negative embeddings (no CFG): none are passed, masks still are."""
    seen: list[dict[str, Any]] = []

    class SanaSprintLike:
        transformer = SimpleNamespace(
            config=_Config(caption_channels=16, num_cross_attention_heads=2), dtype=torch.float32
        )
        device = _execution_device = torch.device("cpu")

        def __call__(
            self,
            prompt: Any = None,
            prompt_embeds: Any = None,
            prompt_attention_mask: Any = None,
            num_images_per_prompt: int = 1,
            guidance_scale: float = 4.5,
        ) -> str:
            seen.append({k: v for k, v in locals().items() if k != "self"})
            return "images"

    head = LinearHead(LinearHeadConfig(student_width=STUDENT_WIDTH, teacher_width=16, teacher_family="sana"))
    wrapped = attach(SanaSprintLike(), LanguageEncoder.from_student(tiny_bert_path, head))
    assert wrapped.family.name == "sana"
    assert wrapped(prompt=[CAT, MOUNTAIN], num_images_per_prompt=3) == "images"
    kw = seen[-1]
    assert kw["prompt"] is None and kw["num_images_per_prompt"] == 1
    assert kw["prompt_embeds"].shape[:1] == kw["prompt_attention_mask"].shape[:1] == (6,)
