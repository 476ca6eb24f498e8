"""Evaluation on hand-made cases: identical conditioning agrees perfectly, different does not."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from xling.train import evaluation as ev

EN = ["a red circle on the left", "a blue square on the right"]
ZH = ["左边的红色圆形", "右边的蓝色正方形"]


@dataclass
class _Out:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class MirrorStudent:
    """A "perfect translator": gives each Chinese prompt the teacher's own embedding of its English translation
    (looked up from one teacher call, so the numbers are bit-identical to what the teacher is sampled with)."""

    def __init__(self, pipe, translation: dict[str, str], noise: float = 0.0) -> None:
        en = list(translation.values())
        cond, uncond = ev.teacher_conditioning(pipe, en)
        self.table = {zh: cond.prompt_embeds[i] for i, zh in enumerate(translation)}
        self.table[""] = uncond.prompt_embeds[0]
        self.noise = noise

    def __call__(self, prompts):
        embeds = torch.stack([self.table[p] for p in prompts])
        if self.noise:
            embeds = embeds + self.noise * torch.randn(
                embeds.shape, generator=torch.Generator().manual_seed(0)
            )
        return _Out(embeds)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_path: Path):
    return ev.load_pipeline(tiny_sd1_path)


def test_latent_mse_and_psnr_hand_values() -> None:
    a = torch.zeros(2, 4, 3, 3)
    assert torch.equal(ev.latent_mse(a, a), torch.zeros(2))
    b = a.clone()
    b[1] += 2.0
    assert torch.allclose(ev.latent_mse(a, b), torch.tensor([0.0, 4.0]))
    img = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert ev.psnr(img, img) == math.inf
    # every pixel off by one grey level: 10 log10(255^2 / 1)
    assert ev.psnr(img, img + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)
    # pooled MSE: one perfect pair does not make the batch infinite
    mixed = img.copy()
    mixed[1] += 16
    assert math.isfinite(ev.psnr(img, mixed))
    with pytest.raises(ValueError, match="differ in shape"):
        ev.psnr(img, img[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        ev.latent_mse(a, a[:1])


def test_embedding_alignment_cases() -> None:
    g = torch.Generator().manual_seed(0)
    t = ev.Conditioning(torch.randn(2, 5, 8, generator=g))
    same = ev.embedding_alignment(t, t)
    assert same["token_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["pooled_cosine"] is None
    negated = ev.embedding_alignment(ev.Conditioning(-t.prompt_embeds), t)
    assert negated["token_cosine"] == pytest.approx(-1.0, abs=1e-6)
    # A student of another length has no token correspondence, only the mean cosine.
    other = ev.embedding_alignment(ev.Conditioning(torch.randn(2, 3, 8, generator=g)), t)
    assert other["token_cosine"] is None and -1.0 <= other["mean_cosine"] <= 1.0
    # Masked-out student tokens do not count: garbage there leaves the cosine at 1.
    s = t.prompt_embeds.clone()
    s[:, 3:] = torch.randn(2, 2, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)
    assert ev.embedding_alignment(ev.Conditioning(s, attention_mask=mask), t)[
        "token_cosine"
    ] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch size and width"):
        ev.embedding_alignment(ev.Conditioning(torch.randn(2, 5, 7)), t)


def test_sample_is_seeded(pipe) -> None:
    cond, uncond = ev.teacher_conditioning(pipe, EN)
    a = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2)
    b = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2, batch_size=1)
    assert a.images.dtype == np.uint8 and a.images.shape == (2, 32, 32, 3)
    # Batching changes a row only by float reassociation; the same call twice is bit-identical.
    assert torch.allclose(a.latents, b.latents, atol=1e-4)
    again = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2)
    assert ev.agreement(a, again) == {"latent_mse": 0.0, "psnr": math.inf}
    c = ev.sample(pipe, cond, uncond, [5, 6], num_inference_steps=2)
    assert ev.agreement(a, c)["latent_mse"] > 0
    with pytest.raises(ValueError, match="equal length"):
        ev.sample(pipe, cond, uncond, [0], num_inference_steps=2)


def test_attention_alignment_zero_for_identical(pipe) -> None:
    cond, _ = ev.teacher_conditioning(pipe, EN)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = ev.attention_alignment(pipe, cond, cond, images, timesteps=(500,))
    assert same == pytest.approx(0.0, abs=1e-10)
    other, _ = ev.teacher_conditioning(pipe, list(reversed(EN)))
    assert ev.attention_alignment(pipe, other, cond, images, timesteps=(500,)) > 1e-8


def test_attention_alignment_sdxl_uses_pooled_conditions(tiny_sdxl_path: Path) -> None:
    from xling.core import Teacher

    pipe = ev.load_pipeline(tiny_sdxl_path)
    cond, _ = ev.teacher_conditioning(pipe, EN)
    assert cond.pooled_prompt_embeds is not None
    teacher = Teacher.from_pipeline(pipe)
    images = torch.rand(
        2, 3, teacher.resolution, teacher.resolution, generator=torch.Generator().manual_seed(0)
    )
    images = images * 2 - 1
    assert ev.attention_alignment(teacher, cond, cond, images, timesteps=(500,)) == pytest.approx(
        0.0, abs=1e-10
    )
    other, _ = ev.teacher_conditioning(pipe, list(reversed(EN)))
    # A pipeline and the Teacher wrapping it are the same model.
    assert ev.attention_alignment(pipe, other, cond, images, timesteps=(500,)) == ev.attention_alignment(
        teacher, other, cond, images, timesteps=(500,)
    )
    with pytest.raises(ValueError, match="share B"):
        ev.attention_alignment(teacher, cond, cond, images[:1])


def test_reference_cache_samples_the_teacher_once(pipe) -> None:
    from xling.train.evaluation.pairs import compare

    student = MirrorStudent(pipe, dict(zip(ZH, EN)), noise=1.0)
    cache: dict = {}
    kwargs = dict(
        seeds=(0, 1), num_inference_steps=2, guidance_scale=3.0, batch_size=8, reference_cache=cache
    )
    first = compare(pipe, student, EN, ZH, **kwargs)
    assert first.rows == [0, 0, 1, 1] and first.seeds == [0, 1, 0, 1] and len(cache) == 1
    again = compare(pipe, student, EN, ZH, **kwargs)
    assert again.teacher_samples is first.teacher_samples and len(cache) == 1
    assert again.agreement == first.agreement and first.agreement["latent_mse"] > 0


def test_evaluate_pairs_perfect_student_agrees_exactly(pipe, tmp_path: Path) -> None:
    student = MirrorStudent(pipe, dict(zip(ZH, EN)))
    result = ev.evaluate_pairs(student, pipe, EN, ZH, seeds=(0, 1), num_inference_steps=2, num_examples=2)
    assert result.agreement["latent_mse"] == 0.0
    assert result.agreement["psnr"] == math.inf
    assert result.alignment["token_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(result.examples) == 4 and result.examples[0]["zh"] == ZH[0]

    noisy = ev.evaluate_pairs(
        MirrorStudent(pipe, dict(zip(ZH, EN)), noise=1.0), pipe, EN, ZH, seeds=(0,), num_inference_steps=2
    )
    assert noisy.agreement["latent_mse"] > 0 and math.isfinite(noisy.agreement["psnr"])
    assert noisy.alignment["token_cosine"] < 0.999

    paths = ev.write_report(result, tmp_path / "report", title="hand-made")
    assert set(paths) == {"report", "metrics", "grid"}
    text = paths["report"].read_text()
    assert "# hand-made" in text and "| 0 | inf |" in text and ZH[1] in text
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["agreement"] == {"latent_mse": 0.0, "psnr": "inf"}
    from PIL import Image

    assert Image.open(paths["grid"]).size[0] > 200


def test_student_conditioning_pads_negative_to_prompt_length(pipe, tiny_bert_path: Path) -> None:
    from xling.adapters.config import LinearHeadConfig
    from xling.adapters.encoder import LanguageEncoder
    from xling.adapters.linear import LinearHead

    encoder = LanguageEncoder.from_student(
        tiny_bert_path, LinearHead(LinearHeadConfig(student_width=48, teacher_width=32))
    )
    encoder.train()
    cond, uncond = ev.student_conditioning(encoder, ZH)
    assert cond.prompt_embeds.shape == uncond.prompt_embeds.shape
    assert cond.prompt_embeds.shape[::2] == (2, 32)
    assert encoder.training  # restored
    out = ev.sample(pipe, cond, uncond, [0, 0], num_inference_steps=2)
    assert out.images.shape == (2, 32, 32, 3)


def test_format_percent() -> None:
    assert ev.format_percent(0.875) == "87.5%"
    assert ev.format_percent(1.0) == "100.0%"
    assert ev.format_percent(None) == "n/a"
    assert ev.format_percent(float("nan")) == "n/a"


def test_bootstrap_interval() -> None:
    # Every image right (or wrong): no resample can differ.
    assert ev.bootstrap_interval([True] * 10) == (1.0, 1.0)
    assert ev.bootstrap_interval([False] * 10) == (0.0, 0.0)
    verdicts = ([True] * 15 + [False]) * 3  # 93.75% over 48 images
    low, high = ev.bootstrap_interval(verdicts)
    assert low < 45 / 48 < high <= 1.0 and 0.03 < (high - low) / 2 < 0.08  # binomial: ~3.5 points a side
    assert ev.bootstrap_interval(verdicts) == (low, high)  # seeded
    wider = ev.bootstrap_interval(verdicts[:16])  # the same rate on fewer images: a wider interval
    assert wider[1] - wider[0] > high - low
    # A ratio over paired rows: the student right exactly where the teacher is gives 1.0 on every draw.
    teacher = [True] * 40 + [False] * 8
    assert ev.bootstrap_interval(teacher, teacher) == (1.0, 1.0)
    assert all(math.isnan(x) for x in ev.bootstrap_interval([True], [False]))
    assert all(math.isnan(x) for x in ev.bootstrap_interval([]))
    assert ev.format_interval([0.875, 1.0]) == "87.5-100.0%" and ev.format_interval(None) == ""


def test_read_prompt_pairs(tmp_path: Path) -> None:
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"en": "a red circle", "zh": "红色的圆形"}\n\n{"en": "a square", "zh": "正方形"}\n')
    assert ev.read_prompt_pairs(good) == (["a red circle", "a square"], ["红色的圆形", "正方形"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"en": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        ev.read_prompt_pairs(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompt pairs"):
        ev.read_prompt_pairs(empty)


def test_write_images_names_scales_and_indexes(tmp_path: Path) -> None:
    from PIL import Image

    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    images[1] = 255
    samples = ev.Samples(torch.zeros(3, 4, 1, 1), images)
    paths = ev.write_images(
        samples, ["一", "二"], [0, 0, 1], [0, 7, 0], tmp_path, scale=2, settings={"teacher": "toy"}
    )
    assert [p.name for p in paths] == ["000-seed0.png", "000-seed7.png", "001-seed0.png"]
    assert Image.open(paths[1]).size == (8, 8) and np.asarray(Image.open(paths[1])).min() == 255
    index = json.loads((tmp_path / "images.json").read_text(encoding="utf-8"))
    assert index["teacher"] == "toy"
    assert index["images"][2] == {"file": "001-seed0.png", "prompt": "二", "seed": 0}


def test_evaluate_pairs_measures_attention_mse_on_the_teachers_images(pipe, tmp_path: Path) -> None:
    perfect = ev.evaluate_pairs(
        MirrorStudent(pipe, dict(zip(ZH, EN))), pipe, EN, ZH, seeds=(0,), num_inference_steps=2
    )
    assert perfect.alignment["attention_mse"] == pytest.approx(0.0, abs=1e-10)
    noisy = ev.evaluate_pairs(
        MirrorStudent(pipe, dict(zip(ZH, EN)), noise=1.0), pipe, EN, ZH, seeds=(0,), num_inference_steps=2
    )
    assert noisy.alignment["attention_mse"] > 1e-6
    text = ev.report_markdown(noisy)
    assert "Attention-MSE pivots: the teacher's own generation of each English prompt (seed 0)." in text
    table_row = text.split("## Alignment")[1].splitlines()[4]
    assert table_row.split("|")[-2].strip() not in ("n/a", "")  # the attention-MSE cell holds a number
    skipped = ev.evaluate_pairs(
        MirrorStudent(pipe, dict(zip(ZH, EN))),
        pipe,
        EN,
        ZH,
        seeds=(0,),
        num_inference_steps=2,
        attention_timesteps=(),
    )
    assert skipped.alignment["attention_mse"] is None
    assert "Attention MSE n/a: not computed (no attention timesteps were given)." in ev.report_markdown(
        skipped
    )


@pytest.fixture(scope="module")
def sd1_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert_path: Path, tiny_sd1_path: Path) -> Path:
    """A linear head on the tiny BERT student for the tiny SD1 teacher, which it records."""
    from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig

    torch.manual_seed(0)
    head = LinearHead(LinearHeadConfig(student_width=48, teacher_width=32))
    directory = tmp_path_factory.mktemp("sd1-adapter")
    return LanguageEncoder.from_student(tiny_bert_path, head).save_pretrained(
        directory, teacher=str(tiny_sd1_path)
    )


def test_run_report_with_a_real_teacher_scores_the_given_pairs(
    sd1_adapter: Path, tiny_sd1_path: Path, tmp_path: Path
) -> None:
    pairs = [("a red circle", "红色的圆形"), ("a blue square", "蓝色的正方形"), ("a cat", "一只猫")]
    paths = ev.write_run_report(
        adapter_dir=sd1_adapter,
        output_dir=tmp_path / "run",
        teacher=str(tiny_sd1_path),
        toy=False,
        num_prompts=2,
        seeds=(0,),
        num_inference_steps=2,
        prompt_pairs=pairs,
    )
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["settings"]["prompts"] == 2 and metrics["settings"]["teacher"] == str(tiny_sd1_path)
    assert metrics["alignment"]["attention_mse"] > 0
    text = paths["report"].read_text()
    assert "红色的圆形" in text and "蓝色的正方形" in text and "一只猫" not in text
    # none of the toy grammar's captions were scored
    assert all(en in ("a red circle", "a blue square") for en in (ex["en"] for ex in _report_rows(text)))


def _report_rows(text: str) -> list[dict[str, str]]:
    rows = text.split("| column | English | Chinese | seed |")[1].strip().splitlines()[1:]
    return [{"en": r.split(" | ")[1]} for r in rows if r.startswith("| ")]


def test_run_report_with_a_real_teacher_and_no_pairs_says_what_needs_them(
    sd1_adapter: Path, tiny_sd1_path: Path, tmp_path: Path
) -> None:
    paths = ev.write_run_report(
        adapter_dir=sd1_adapter, output_dir=tmp_path / "run", teacher=str(tiny_sd1_path), toy=False
    )
    assert set(paths) == {"report"}
    text = paths["report"].read_text()
    assert "No held-out prompt pairs were given, so nothing was scored" in text
    assert "attention MSE" in text and "CLIP score" in text and "--prompts pairs.jsonl" in text
    assert not (tmp_path / "run" / "grid.png").exists()


def test_train_step_save_records_the_teacher(
    tiny_bert_path: Path, tiny_sd1_path: Path, tmp_path: Path
) -> None:
    import os

    from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig
    from xling.train.config import RecipeConfig
    from xling.train.recipes.base import TrainStep

    head = LinearHead(LinearHeadConfig(student_width=48, teacher_width=32))
    encoder = LanguageEncoder.from_student(tiny_bert_path, head)
    relative = os.path.relpath(tiny_sd1_path)
    for teacher, recorded in (("toy", "toy"), (relative, str(tiny_sd1_path.resolve())), ("org/sd", "org/sd")):
        step = TrainStep(encoder, None, RecipeConfig(teacher=teacher, student=str(tiny_bert_path)))
        adapter = step.save(tmp_path / teacher.replace("/", "_").replace(".", "_"))["adapter"]
        record = json.loads((adapter / "config.json").read_text())["teacher"]
        assert record == {
            "name_or_path": recorded,
            "family": "sd1",
            "teacher_width": 32,
            "pooled_width": None,
        }


def test_prompt_pairs_from_rows_reads_only_what_it_needs() -> None:
    class Rows:
        def __init__(self, rows):
            self.rows, self.read = rows, []

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            self.read.append(i)
            return self.rows[i]

    # A corpus row names its caption "target", a toy-world row "zh".
    rows = Rows(
        [{"en": "a cat", "zh": "一只猫"}, {"zh": "只有中文"}, {"en": "a dog", "target": "一只狗"}, {}]
    )
    assert ev.prompt_pairs_from_rows(rows, 2) == [("a cat", "一只猫"), ("a dog", "一只狗")]
    assert rows.read == [0, 1, 2]  # stops once it has its pairs
    assert ev.prompt_pairs_from_rows(None, 3) is None
    assert ev.prompt_pairs_from_rows(Rows([{"zh": "只有中文"}])) is None
