"""CPS as the challenge winners used it: confident pseudo-labels, a gate on the cross term, phases balanced."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from client.data_loading import BatchBuilder, augmentation_params, build_training_transforms
from client.losses import CrossPseudoLoss, confident_mask
from client.trainer import CPSTrainer, TrainerConfig
from common.label_transfer_config import LabelTransferConfig
from common.preprocessing import PreprocessingCache
from test_data_loading import small_liver_cases
from test_trainer import PATCH, _equal_weights, _quiet, _tiny_plans

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(margin: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax of class 1 is sigmoid(margin)."""
    return torch.stack([torch.zeros_like(margin), margin], dim=1)


def test_confident_mask_thresholds_the_teachers_softmax():
    teacher = _logits(torch.tensor([[[0.1, 3.0, -3.0, -0.5]]]))  # p(1) = .52, .95, .05, .38
    mask = confident_mask(teacher, 0.9)
    assert mask.shape == (1, 1, 1, 4)
    assert mask.flatten().tolist() == [False, True, True, False]


def test_confident_cross_term_counts_only_confident_voxels():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 2, 4, 8, 8, generator=g)
    margin = torch.randn(2, 4, 8, 8, generator=g) * 3
    teacher = _logits(margin)
    plain = CrossPseudoLoss("ce", num_outputs=1)
    confident = CrossPseudoLoss("ce", num_outputs=1, confidence=0.9)
    target = (margin > 0).long()
    keep = (torch.sigmoid(margin.abs()) > 0.9).float()
    expected = (F.cross_entropy(student, target, reduction="none") * keep).mean()
    assert torch.allclose(confident(student, teacher), expected, atol=1e-6)
    assert 0 < keep.mean() < 1 and not torch.allclose(confident(student, teacher), plain(student, teacher))
    # A teacher confident everywhere: the plain cross term; confident nowhere: nothing to learn.
    assert torch.allclose(confident(student, _logits(torch.sign(margin) * 10)),
                          plain(student, _logits(torch.sign(margin) * 10)), atol=1e-6)
    assert float(confident(student, _logits(margin * 0))) == 0.0
    # Dice+CE variant: unconfident voxels carry nnU-Net's ignore label; finite and different.
    dice_ce = CrossPseudoLoss("dice_ce", num_outputs=1, confidence=0.9)(student, teacher)
    assert torch.isfinite(dice_ce) and not torch.allclose(dice_ce, CrossPseudoLoss("dice_ce", 1)(student, teacher))
    with pytest.raises(ValueError):
        CrossPseudoLoss("ce", confidence=1.0)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("refinements")
    plans = _tiny_plans()
    cache = PreprocessingCache(root / "cache", plans)
    cases = small_liver_cases(root, 4)
    return {"plans": plans,
            "labeled": [cache.get(c, "GED4", with_mask=True) for c in cases[:2]],
            # 3 T2 volumes and one GED4: uniform drawing shows T2 three times as often
            "unlabeled": [cache.get(c, "T2", with_mask=False) for c in cases[:3]]
                         + [cache.get(cases[3], "GED4", with_mask=False)]}


def test_unlabeled_batches_balance_phases(volumes):
    params = augmentation_params(PATCH)
    transforms = build_training_transforms(params, None)

    def phases(balance: bool) -> Counter:
        builder = BatchBuilder(volumes["unlabeled"], 1, params, transforms, labeled=False, seed=0,
                               augment=False, balance_phases=balance)
        return Counter(builder._draw_volume().volume.phase for _ in range(400))

    balanced, uniform = phases(True), phases(False)
    assert 160 <= balanced["GED4"] <= 240          # one phase in two
    assert 60 <= uniform["GED4"] <= 140             # one volume in four


def test_gate_keeps_the_cross_term_off(volumes):
    """Gate closed: lambda 0, no cross term, the same update as supervised training of the pair."""
    config = TrainerConfig(mode="cps", batch_size=1, unlabeled_batch_size=1, seed=2, prefetch=0, log_every=0,
                           cps_confidence=0.5)
    gated = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], config, log=_quiet)
    gated.cross_term_enabled = False
    stats = gated.train(2)
    assert stats.cps == 0.0 and stats.lambda_last == 0.0
    opened = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], config, log=_quiet)
    stats = opened.train(2)
    assert stats.lambda_last > 0
    assert not _equal_weights(gated.state_dicts(), opened.state_dicts())


def test_trainer_takes_label_transfer_from_its_config(volumes):
    config = TrainerConfig(mode="supervised", batch_size=1, seed=0, prefetch=0, log_every=0,
                           label_transfer={"location_scale": 1.0, "transpose": 0.5})
    trainer = CPSTrainer(volumes["plans"], volumes["labeled"], [], config, log=_quiet)
    names = [type(getattr(t, "transform", t)).__name__ for t in trainer._labeled_builder.transforms.transforms]
    assert "LocationScaleIntensity" in names and "RandomInPlaneTranspose" in names
    assert config.label_transfer == LabelTransferConfig(location_scale=1.0, transpose=0.5)
    assert trainer.train(1).sup_a > 0


def test_gate_opens_on_validation_dice(volumes):
    """Pooled training checks the gate on validation volumes: unreachable -> never opens; 0.0 ->
    opens at the first check."""
    lines: list[str] = []
    config = TrainerConfig(mode="cps", batch_size=1, unlabeled_batch_size=1, seed=0, prefetch=0, log_every=0,
                           cps_gate=0.999, cps_gate_every=1)
    closed = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], config,
                        validation=volumes["labeled"][:1], log=lines.append)
    assert not closed.cross_term_enabled
    stats = closed.train(2)
    assert stats.cps == 0.0 and not closed.cross_term_enabled
    gate_lines = [line for line in lines if "CPS gate" in line]
    assert len(gate_lines) == 2 and all("cross term off" in line for line in gate_lines)
    # The same seed gives the same untrained pair: its validation Dice is what the gate sees first.
    fresh = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], config, log=_quiet)
    score = fresh.validation_dice(volumes["labeled"][:1])
    assert 0.0 < score < 0.999

    # A gate at exactly the pair's current validation Dice opens at the first check.
    at_score = TrainerConfig(**{**config.__dict__, "cps_gate": score})
    opened = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], at_score,
                        validation=volumes["labeled"][:1], log=_quiet)
    assert not opened.cross_term_enabled
    stats = opened.train(1)
    assert opened.cross_term_enabled and stats.cps > 0 and stats.lambda_last > 0


def test_phase_weights_keep_the_true_labels_share(volumes):
    """With propagated phases labeled too, GED4 keeps `labeled_share` of the labeled draws."""
    params = augmentation_params(PATCH)
    transforms = build_training_transforms(params, None)
    builder = BatchBuilder(volumes["unlabeled"], 1, params, transforms, labeled=False, seed=1, augment=False,
                           balance_phases=True, phase_weights={"GED4": 3.0, "T2": 1.0})
    drawn = Counter(builder._draw_volume().volume.phase for _ in range(400))
    assert 260 <= drawn["GED4"] <= 340                # 3 in 4

    from dataclasses import replace as with_phase
    ged4 = volumes["labeled"]
    propagated = [with_phase(v, phase=p) for v, p in zip(volumes["labeled"], ("T1", "T2"))]
    trainer = CPSTrainer(volumes["plans"], ged4 + propagated, [],
                         TrainerConfig(mode="supervised", batch_size=1, prefetch=0, labeled_share=0.5), log=_quiet)
    weights = trainer._labeled_phase_weights()
    assert weights["GED4"] / sum(weights.values()) == pytest.approx(0.5)
    assert CPSTrainer(volumes["plans"], ged4, [], TrainerConfig(mode="supervised", batch_size=1, prefetch=0),
                      log=_quiet)._labeled_phase_weights() is None


def test_strong_view_batches_are_the_same_crops_through_intensity_only(volumes):
    """Unlabeled batches carry a strong view: same shape, different values, reproducible from the seed,
    and voxel-aligned with the weak view (a monotone check: the view is a per-voxel intensity map
    times a smooth field, so it cannot be a different crop). Labeled batches never carry one."""
    from client.label_transfer import strong_view_transforms

    params = augmentation_params(PATCH)
    transforms = build_training_transforms(params, None)

    def batch(seed: int, labeled: bool = False):
        return BatchBuilder(volumes["labeled"] if labeled else volumes["unlabeled"], 2, params, transforms,
                            labeled=labeled, seed=seed, strong_view=strong_view_transforms(p=1.0)).next_batch()

    first, again, other = batch(3), batch(3), batch(4)
    assert first.strong is not None and first.strong.shape == first.data.shape
    assert torch.equal(first.strong, again.strong) and torch.equal(first.data, again.data)
    assert not torch.equal(first.strong, other.strong)
    assert not torch.allclose(first.strong, first.data)
    # Same crop: the views' edges lie in the same places, far more than another crop's do.
    def edges(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().flatten()

    def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([edges(a), edges(b)]))[0, 1])

    assert agreement(first.data, first.strong) > agreement(other.data, first.strong) + 0.1
    assert batch(3, labeled=True).strong is None


def test_strong_view_cps_teaches_from_the_weak_view(volumes):
    """With the strong view the cross term compares the students' outputs on the strong view with
    the teachers' on the weak one: a different loss and update than plain CPS from the same seed;
    supervised mode ignores the option."""
    base = dict(mode="cps", batch_size=1, unlabeled_batch_size=1, seed=2, prefetch=0, log_every=0,
                lambda_max=1.0, rampup_iterations=0)
    plain = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"], TrainerConfig(**base), log=_quiet)
    strong = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"],
                        TrainerConfig(**base, cps_strong_view=True), log=_quiet)
    assert strong._unlabeled_builder.strong_view is not None and plain._unlabeled_builder.strong_view is None
    plain_stats, strong_stats = plain.train(2), strong.train(2)
    assert plain_stats.cps > 0 and strong_stats.cps > 0 and strong_stats.cps != plain_stats.cps
    assert not _equal_weights(plain.state_dicts(), strong.state_dicts())
    supervised = CPSTrainer(volumes["plans"], volumes["labeled"], volumes["unlabeled"],
                            TrainerConfig(**{**base, "mode": "supervised"}, cps_strong_view=True), log=_quiet)
    assert supervised._unlabeled_builder is None
