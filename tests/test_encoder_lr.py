"""The encoder's own learning rate at the sites: what a domain-randomised start knows stays in its encoder."""

from __future__ import annotations

import pytest
import torch

from client.trainer import CPSTrainer, TrainerConfig
from common.preprocessing import PreprocessingCache
from test_data_loading import small_liver_cases
from test_trainer import _quiet, _tiny_plans

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-lr")
    plans = _tiny_plans()
    cache = PreprocessingCache(root / "cache", plans)
    return plans, [cache.get(c, "GED4", with_mask=True) for c in small_liver_cases(root, 2)]


def _trained(plans, volumes, scale: float) -> tuple[dict, dict]:
    config = TrainerConfig(mode="supervised", batch_size=1, seed=3, prefetch=0, log_every=0, encoder_lr_scale=scale)
    trainer = CPSTrainer(plans, volumes, [], config, log=_quiet)
    before = {k: v.clone() for k, v in trainer.state_dicts()["a"].items()}
    trainer.train(2)
    return before, trainer.state_dicts()["a"]


def _moved(before: dict, after: dict, prefix: str, inside: bool) -> float:
    keys = [k for k in before if k.startswith(prefix) == inside and before[k].is_floating_point()]
    return max(float((after[k] - before[k]).abs().max()) for k in keys)


def test_a_frozen_encoder_stays_and_the_rest_learns(labeled):
    before, after = _trained(*labeled, scale=0.0)
    assert _moved(before, after, "conv_blocks_context.", inside=True) == 0.0
    assert _moved(before, after, "conv_blocks_context.", inside=False) > 0.0


def test_a_scaled_encoder_moves_less_and_scale_one_is_the_plain_trainer(labeled):
    plans, volumes = labeled
    _, full = _trained(plans, volumes, 1.0)
    before, slow = _trained(plans, volumes, 0.1)
    enc_full = _moved(before, full, "conv_blocks_context.", inside=True)
    enc_slow = _moved(before, slow, "conv_blocks_context.", inside=True)
    assert 0.0 < enc_slow < enc_full
    # Scale 1: one parameter group, the same update as before the option existed (same seed, same weights).
    config = TrainerConfig(mode="supervised", batch_size=1, seed=3, prefetch=0, log_every=0)
    plain = CPSTrainer(plans, volumes, [], config, log=_quiet)
    assert len(plain.optimizers["a"].param_groups) == 1
    plain.train(2)
    assert all(torch.equal(plain.state_dicts()["a"][k], full[k]) for k in full)
