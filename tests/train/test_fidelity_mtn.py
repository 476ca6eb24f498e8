"""MTN's paper preset against GlueGen's public code (salesforce/GlueGen ``multilingual-gluenet/
train_gluenet_multi.py``): the total loss of one fixed tiny SD 1.x batch and every gradient, computed here from
GlueGen's formulas (its translator and decoder written in ``test_import_gluegen``, its discriminator and losses
here), must equal the recipe step's; a real-teacher config builds GlueNet's depth-5 post-norm translator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import FIXED_EN as EN
from tests.train.conftest import FIXED_ZH as ZH
from tests.train.conftest import tiny_config
from tests.train.test_import_gluegen import gluenet_forward, xlmr77  # noqa: F401 (xlmr77: a fixture)
from xling.train.config import load_config
from xling.train.data import Batch
from xling.train.recipes import get_recipe


def test_real_teacher_config_is_the_public_code():
    cfg = load_config("mtn", {"teacher": "org/real-model"})
    assert (cfg.translator, cfg.num_blocks, cfg.positions, cfg.output_norms) == (
        "gluenet",
        5,
        "all",
        "gluegen",
    )
    assert cfg.student_scale == pytest.approx(1 / 3) and cfg.distill_weights == "gluegen"
    assert (cfg.mse_weight, cfg.reconstruction_weight, cfg.adversarial_weight) == (1e4, 1e4, 0.1)
    assert (cfg.grl_scale, cfg.discriminator) == (0.1, "gluegen")
    assert (cfg.lr, cfg.batch_size, cfg.warmup_steps, cfg.max_grad_norm, cfg.weight_decay) == (
        1e-4,
        32,
        0,
        0,
        0,
    )
    assert (cfg.lr_scheduler, cfg.lr_decay_stages, cfg.lr_decay_gamma) == ("step", 4, 0.5)
    # The toy world keeps xling's translator and loss, what reached 100% there.
    toy = load_config("mtn")
    assert toy.lr_scheduler == "cosine"
    assert (toy.translator, toy.positions, toy.output_norms, toy.distill_weights) == (
        "xling",
        "masked",
        "none",
        "uniform",
    )
    assert (toy.num_blocks, toy.student_scale, toy.mse_weight, toy.grl_scale, toy.discriminator) == (
        2,
        1.0,
        1.0,
        1.0,
        "xling",
    )


def test_step_schedule_is_gluegens_steplr_over_4_epochs():
    # train_gluenet_multi.py:184, :292-294: StepLR(step_size=1, gamma=0.5) stepped after each of 4 epochs.
    from xling.train.loop import build_lr_scheduler

    epoch = 3  # updates per epoch
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    ours = build_lr_scheduler(ours_opt, "step", 0, 4 * epoch, stages=4, gamma=0.5)
    theirs_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    theirs = torch.optim.lr_scheduler.StepLR(theirs_opt, step_size=1, gamma=0.5)
    for update in range(4 * epoch):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12), update
        ours_opt.step()
        ours.step()
        theirs_opt.step()
        if (update + 1) % epoch == 0:
            theirs.step()
    assert ours.get_last_lr()[0] == pytest.approx(1e-4 / 8)  # held at the last stage


def _gluegen_names(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """xling's translator parameters under GlueGen's names (``channel`` = ``net_sen``, ``transition`` = ``tail``)."""
    rename = {"channel": "net_sen", "token": "net_tok", "transition": "tail"}
    return {".".join(rename.get(p, p) for p in k.split(".")): v for k, v in module.named_parameters()}


def test_total_loss_and_gradients_follow_gluegens_formulas(tiny_sd1_path, xlmr77, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, XLMRobertaModel

    cfg = load_config("mtn", tiny_config(tiny_sd1_path, xlmr77, tmp_path))
    torch.manual_seed(0)
    step = get_recipe("mtn").build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    step.train()
    head = step.encoder.head
    assert len(head.encoder.blocks) == 5 and len(head.decoder.blocks) == 5  # a real run: GlueNet's depth
    assert isinstance(head.encoder.blocks[0].channel[1], torch.nn.LayerNorm)  # post-norm: Linear, LayerNorm
    total, logs = step(Batch(en=EN, zh=ZH, index=torch.arange(4)))
    total.backward()
    trainable = {n: p for n, p in step.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in trainable.items()}
    step.zero_grad()

    # GlueGen's step, train_gluenet_multi.py:220-261, "src" the English CLIP, "tar" the target language.
    with torch.no_grad():
        clip_tok = CLIPTokenizer.from_pretrained(tiny_sd1_path, subfolder="tokenizer")
        clip = CLIPTextModel.from_pretrained(tiny_sd1_path, subfolder="text_encoder").eval()
        ids = clip_tok(
            EN, truncation=True, max_length=77, padding="max_length", return_tensors="pt"
        ).input_ids
        feat_src = clip(ids).last_hidden_state  # [B, 77, D]
        tokenizer = AutoTokenizer.from_pretrained(xlmr77)
        tokens = tokenizer(ZH, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
        feat_tar = (
            XLMRobertaModel.from_pretrained(xlmr77).eval()(**tokens).last_hidden_state / 3
        )  # [B, 77, d]
    loss_distill, loss_rec, loss_adv = _gluegen_terms(step, feat_src, feat_tar)
    loss = loss_distill + loss_rec + loss_adv
    assert logs["mse"].item() * 1e4 == pytest.approx(loss_distill.item(), rel=1e-4)
    assert logs["reconstruction"].item() * 1e4 == pytest.approx(loss_rec.item(), rel=1e-4)
    assert logs["adversarial"].item() * 0.1 == pytest.approx(loss_adv.item(), rel=1e-4)
    assert total.item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    _assert_same_grads(trainable, grads)

    # The adversarial term alone (weight-0 terms leave the total): its reversed gradient, scale 0.1, reaches
    # the translator; the 1e4-weighted terms would hide a wrong scale above.
    step.zero_grad()
    step.config.mse_weight = step.config.reconstruction_weight = 0.0
    step(Batch(en=EN, zh=ZH, index=torch.arange(4)))[0].backward()
    grads = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
    assert grads.keys() == {n for n in trainable if not n.startswith("encoder.head.decoder.")}
    step.zero_grad()
    _gluegen_terms(step, feat_src, feat_tar)[2].backward()
    _assert_same_grads({n: trainable[n] for n in grads}, grads)


def _assert_same_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        # (the discriminator's first bias feeds a BatchNorm: its gradient is 0 up to rounding on both sides)
        atol = max(1e-4 * grads[name].abs().max().item(), 1e-6)
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=atol, msg=name)


def _gluegen_terms(
    step: torch.nn.Module, feat_src: torch.Tensor, feat_tar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GlueGen's ``loss_distill``, ``loss_rec``, ``loss_adv`` (weighted), train_gluenet_multi.py:228-257, on the
    step's own parameters: ``feat_src`` the English CLIP states ``[B, 77, D]``, ``feat_tar`` XLM-R's / 3."""
    from xling.adapters.mixer import GLUEGEN_POSITION_NORMS

    head = step.encoder.head
    tensor_norm = torch.tensor(GLUEGEN_POSITION_NORMS).reshape(77, 1)
    feat_src_over = feat_src / (tensor_norm / 2)
    feat_tar_ad = gluenet_forward(feat_tar, _gluegen_names(head.encoder))  # adapter
    feat_tar_rec = gluenet_forward(feat_tar_ad, _gluegen_names(head.decoder))  # adapter_rec
    mean = feat_src.mean(dim=0)  # [77, D]
    norm = (mean - mean[-1]).abs().mean(dim=1)
    norm = norm / norm.mean()
    norm[-1] = (norm[-2] + norm[-3]) / 2
    norm = norm.reshape(1, 77, 1)

    lin1, bn, lin2 = step.discriminator.net[0], step.discriminator.net[1], step.discriminator.net[3]

    def discriminator(x: torch.Tensor) -> torch.Tensor:  # Discriminator(768, 2), model.py:29-46
        z = F.linear(x.reshape(-1, x.shape[-1]), lin1.weight, lin1.bias)
        z = F.relu(F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
        return F.log_softmax(F.linear(z, lin2.weight, lin2.bias), dim=1)

    reversed_ad = -0.1 * feat_tar_ad + (1.1 * feat_tar_ad).detach()  # value x, gradient -0.1 (eta=0.1)
    n_tok = feat_src.shape[0] * 77
    loss_adv = 0.1 * (
        F.nll_loss(discriminator(feat_src), torch.zeros(n_tok, dtype=torch.long))
        + F.nll_loss(discriminator(reversed_ad), torch.ones(n_tok, dtype=torch.long))
    )
    loss_distill = 10000 * (((feat_tar_ad - feat_src_over) ** 2) * norm).mean()
    loss_rec = 10000 * ((feat_tar_rec - feat_tar) ** 2).mean()
    return loss_distill, loss_rec, loss_adv
