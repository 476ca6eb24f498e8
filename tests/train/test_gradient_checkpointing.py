"""``gradient_checkpointing``: the student's layers recompute their activations in the backward, with the same loss
and gradients as without, for an unfrozen and a LoRA student; a frozen student is a logged no-op."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.train.conftest import make_rows, tiny_config
from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig, LoraHeadConfig
from xling.train.config import load_config
from xling.train.loop import enable_gradient_checkpointing
from xling.train.recipes import run_recipe

PROMPTS = ["左边的红色圆形", "右边的蓝色正方形", "上面的绿色三角形"]


class _Holder(nn.Module):
    """What the loop looks for in a step: its ``encoder`` (a LanguageEncoder) and that encoder's ``student``."""

    def __init__(self, encoder: LanguageEncoder) -> None:
        super().__init__()
        self.encoder = encoder


def _encoder(student: Path, mode: str) -> LanguageEncoder:
    torch.manual_seed(0)
    head = LinearHead(LinearHeadConfig(student_width=48, teacher_width=32))
    if mode == "lora":
        return LanguageEncoder.from_student(student, head, lora=LoraHeadConfig(r=4, alpha=8, dropout=0.1))
    encoder = LanguageEncoder.from_student(student, head)
    encoder.set_trainable(backbone=True)
    return encoder


def _loss_and_grads(
    encoder: LanguageEncoder, calls: list[int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    calls.clear()
    torch.manual_seed(1)  # the same dropout masks in both runs (the checkpoint replays the RNG it saw)
    out = encoder(PROMPTS)
    loss = out.prompt_embeds.pow(2).mean()  # prompt_embeds [B, L, 32]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("mode", ["unfrozen", "lora"])
def test_same_loss_and_gradients_with_checkpointing(tiny_bert_path, mode):
    encoder = _encoder(tiny_bert_path, mode)
    encoder.train()
    base = encoder.student.get_base_model() if mode == "lora" else encoder.student
    calls: list[int] = []
    # Counts the forwards of the first layer's attention: once per step without checkpointing, twice with (the
    # recompute). transformers checkpoints a layer's `forward`, inside its own hooks, so the hook sits on a child;
    # a pre-hook, since the recompute stops early, once it has the tensors the backward needs.
    base.encoder.layer[0].attention.register_forward_pre_hook(lambda *_: calls.append(1))

    loss, grads = _loss_and_grads(encoder, calls)
    assert len(calls) == 1 and not base.is_activation_checkpointing

    assert enable_gradient_checkpointing(_Holder(encoder)) is True
    assert base.is_activation_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(encoder, calls)
    assert len(calls) == 2  # recomputed in the backward: the activations were not kept

    # Measured on CPU fp32: identical to the bit (the recompute runs the same kernels on the same inputs with the
    # replayed RNG); the tolerance is fp32 round-off, in case a backend reorders a sum.
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 2
    if mode == "lora":
        assert all("lora_" in n or n.startswith("head.") for n in grads)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("head."))


def test_the_loop_turns_it_on_and_trains_the_same(recipe_config, tmp_path):
    # Cosine alignment with a LoRA student (no dropout draws differ, the loop seeds both runs alike): the losses of
    # two updates with and without checkpointing agree, and the run's student really checkpoints.
    seen: dict[str, bool] = {}

    def on_step(step, logs, module):
        seen["on"] = module.encoder.student.get_base_model().is_activation_checkpointing

    common = dict(max_steps=2, batch_size=2, lr=1e-3, method="lora", lora_r=4, lora_alpha=8)
    plain = run_recipe(
        "align", recipe_config(output_dir=tmp_path / "plain", **common), train_data=make_rows(4)
    )
    ckpt = run_recipe(
        "align",
        recipe_config(output_dir=tmp_path / "ckpt", gradient_checkpointing=True, **common),
        train_data=make_rows(4),
        on_step=on_step,
    )
    assert seen == {"on": True}
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)


def test_frozen_student_is_a_logged_no_op(recipe_config, caplog):
    # IAP training the head only: the frozen student keeps no activations for a backward, so nothing is turned on.
    seen: dict[str, bool] = {}

    def on_step(step, logs, module):
        seen["on"] = module.encoder.student.is_activation_checkpointing

    with caplog.at_level(logging.WARNING, logger="xling.train.loop"):
        run_recipe(
            "iap",
            recipe_config(max_steps=1, train_encoder=False, gradient_checkpointing=True),
            train_data=make_rows(4),
            on_step=on_step,
        )
    assert seen == {"on": False}
    assert any("student of recipe 'iap' is frozen" in r.getMessage() for r in caplog.records)


def test_a_step_without_a_student_is_refused():
    with pytest.raises(ValueError, match=r"'gradient_checkpointing'.*no Hugging Face student"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_the_option_comes_from_the_config(tiny_sd1_path, tiny_bert_path, tmp_path):
    assert (
        load_config("align", tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path)).gradient_checkpointing
        is False
    )
    config = load_config(
        "align", tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path), ["--gradient_checkpointing", "true"]
    )
    assert config.gradient_checkpointing is True
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        load_config(
            "align", tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path), {"gradient_checkpointing": "often"}
        )


def test_a_resume_may_turn_it_on(recipe_config, tmp_path):
    # It changes memory and time, not one number of the saved state, so a resume may switch it.
    common = dict(output_dir=tmp_path / "run", batch_size=2, lr=1e-3, method="lora", lora_r=4, lora_alpha=8)
    run_recipe("align", recipe_config(max_steps=1, checkpoint_every=1, **common), train_data=make_rows(4))
    resumed = run_recipe(
        "align",
        recipe_config(max_steps=2, gradient_checkpointing=True, resume="latest", **common),
        train_data=make_rows(4),
    )
    assert resumed.steps == 2 and len(resumed.losses) == 1
