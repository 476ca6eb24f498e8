"""The shared fixtures load back through the real ``from_pretrained`` paths and are what they claim."""

from __future__ import annotations

import json

import pytest
import torch


def test_sd1_pipeline_loads_and_has_real_tokenizer(tiny_sd1_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert (tiny_sd1_path / "tokenizer" / "vocab.json").is_file()
    assert (tiny_sd1_path / "tokenizer" / "merges.txt").is_file()
    # Whole words of the fixture text are single BPE tokens; unknown text falls back to byte symbols.
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    assert len(pipe.tokenizer.tokenize("zebra")) > 1
    assert (
        json.loads((tiny_sd1_path / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "epsilon"
    )


def test_sd2_pipeline_is_v_prediction_with_linear_projection(tiny_sd2_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection


def test_sdxl_pipeline_generates(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    assert pipe.unet.config.cross_attention_dim == 64
    assert pipe.text_encoder_2.config.projection_dim == 32
    image = pipe("a cat wearing a hat", num_inference_steps=1, output_type="np", height=32, width=32).images
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize(
    ("fixture", "width", "cls"), [("tiny_bert_path", 48, "[CLS]"), ("tiny_xlmr_path", 40, "<s>")]
)
def test_students_tokenize_chinese_and_encode(request, fixture, width, cls):
    from transformers import AutoModel, AutoTokenizer

    path = request.getfixturevalue(fixture)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(["一只戴帽子的猫", "a cat wearing a hat"], padding=True, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert tokens[0] == cls
    assert tokenizer.unk_token not in tokens
    assert model(**batch).last_hidden_state.shape[-1] == width
