"""Local CPS training: losses, schedules, FedProx, determinism, supervised ablation, learning."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.losses import (CrossPseudoLoss, cps_lambda, deep_supervision_weights, hard_labels, poly_lr,
                           proximal_term, supervised_loss)
from client.trainer import BRANCHES, CPSTrainer, TrainerConfig
from common.pretrained import load_initial_weights
from common.inference import sliding_window_predict
from common.metrics import dice
from common.model_dir import save_model_dir
from common.planning import default_test_plans
from common.preprocessing import PreprocessingCache
from test_data_loading import _liver_case  # pytest puts tests/ on sys.path

PATCH = (16, 32, 32)


def _tiny_plans() -> dict:
    """The test plans with STU-Net base width 4: same structure, a few seconds per test."""
    plans = default_test_plans(PATCH)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32, 64, 64]
    return plans


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    plans = _tiny_plans()
    cache = PreprocessingCache(root / "cache", plans)
    cases = [_liver_case(root / "raw", f"000{i}-A", seed=i) for i in range(3)]
    return {  # the third case plays an unlabeled case (its GED4 without mask)
        "root": root,
        "plans": plans,
        "labeled": [cache.get(c, "GED4", with_mask=True) for c in cases[:2]],
        "unlabeled": [cache.get(c, "T2", with_mask=False) for c in cases[:2]]
                     + [cache.get(cases[2], "GED4", with_mask=False)],
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # the CPUs are shared


def _quiet(_line: str) -> None:
    pass


def _equal_weights(x: dict, y: dict) -> bool:
    return all(torch.equal(x[b][k], y[b][k]) for b in ("a", "b") for k in x[b])


# --------------------------------------------------------------------------------------------- schedules
def test_cps_lambda_ramp():
    assert math.isclose(cps_lambda(0, 2.0, 100), 2.0 * math.exp(-5))
    assert math.isclose(cps_lambda(50, 2.0, 100), 2.0 * math.exp(-5 * 0.25))
    assert cps_lambda(100, 2.0, 100) == cps_lambda(10_000, 2.0, 100) == 2.0
    assert cps_lambda(0, 1.5, 0) == 1.5  # no ramp-up
    values = [cps_lambda(t, 1.0, 40) for t in range(41)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100), 0.01 * 0.5**0.9)
    assert math.isclose(poly_lr(0.01, 99, 100), 0.01 * 0.01**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0 == poly_lr(0.01, 150, 100)


def test_deep_supervision_weights_like_nnunet():
    w = deep_supervision_weights(5)
    assert np.allclose(w, np.array([8, 4, 2, 1, 0]) / 15)
    assert len(supervised_loss(5).weight_factors) == 5


# --------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["ce", "dice_ce"])
def test_cross_term_has_no_gradient_through_target(kind):
    torch.manual_seed(0)
    student = [torch.randn(2, 2, 4, 8, 8, requires_grad=True), torch.randn(2, 2, 2, 4, 4, requires_grad=True)]
    teacher = [torch.randn(2, 2, 4, 8, 8, requires_grad=True), torch.randn(2, 2, 2, 4, 4, requires_grad=True)]
    loss = CrossPseudoLoss(kind, num_outputs=2)(student, teacher)
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert student[0].grad is not None and float(student[0].grad.abs().sum()) > 0
    assert student[1].grad is None or float(student[1].grad.abs().sum()) == 0  # lowest head weight 0
    if kind == "ce":  # the original CPS: CE against the other net's argmax
        expected = F.cross_entropy(student[0], teacher[0].argmax(1))
        assert torch.allclose(loss, expected)


def test_hard_labels_equal_argmax():
    logits = torch.randn(2, 2, 3, 4, 5)
    logits[0, :, 0] = 0.5  # ties: argmax picks class 0
    assert torch.equal(hard_labels(logits), logits.argmax(1, keepdim=True))
    three = torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(hard_labels(three), three.argmax(1, keepdim=True))


def test_proximal_term_zero_at_reference_positive_away():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    assert float(proximal_term(net, reference, 0.1).detach()) == 0.0
    with torch.no_grad():
        net[0].weight.add_(0.5)
    term = proximal_term(net, reference, 0.1)
    expected = 0.5 * 0.1 * net[0].weight.numel() * 0.25
    assert term > 0 and math.isclose(float(term.detach()), expected, rel_tol=1e-4)
    term.backward()
    assert torch.allclose(net[0].weight.grad, torch.full_like(net[0].weight, 0.1 * 0.5))
    assert float(proximal_term(net, reference, 0.0).detach()) == 0.0


# --------------------------------------------------------------------------------------------- trainer
def test_config_validation_and_alias():
    with pytest.raises(ValueError):
        TrainerConfig(mode="semi")
    with pytest.raises(ValueError):
        TrainerConfig(cps_loss="mse")
    assert TrainerConfig(rampup=7).rampup_iterations == 7


def test_cps_training_is_deterministic(data):
    """Same seed + data -> identical weights, background prefetching included; stats and signals filled in."""
    config = TrainerConfig(mode="cps", batch_size=1, seed=3, rampup_iterations=4, log_every=1, prefetch=2)
    lines: list[str] = []
    first = CPSTrainer(data["plans"], data["labeled"], data["unlabeled"], config, log=lines.append)
    second = CPSTrainer(data["plans"], data["labeled"], data["unlabeled"], config, log=_quiet)
    assert _equal_weights(first.state_dicts(), second.state_dicts())
    start = first.state_dicts()
    assert not torch.equal(start["a"]["seg_outputs.4.weight"], start["b"]["seg_outputs.4.weight"])

    stats = first.train(2, start_iteration=1, total_iterations=10)
    second.train(2, start_iteration=1, total_iterations=10)
    assert _equal_weights(first.state_dicts(), second.state_dicts())
    assert not _equal_weights(first.state_dicts(), start)
    assert not any(t.name == "fedliver-prefetch" for t in threading.enumerate())

    assert stats.mode == "cps" and stats.iterations == 2 and len(stats.history) == 2
    assert stats.num_labeled == 2 and stats.num_unlabeled == 3
    assert stats.cps > 0 and stats.sup_a != 0 and stats.sup_b != 0
    assert math.isclose(stats.lambda_last, cps_lambda(2, 1.0, 4))
    assert math.isclose(stats.lr_last, poly_lr(0.01, 2, 10))
    assert all(math.isclose(g["lr"], poly_lr(0.01, 2, 10)) for g in first.optimizers["a"].param_groups)
    assert stats.seconds_per_iteration > 0 and stats.peak_memory_mib > 50
    assert len(lines) == 2 and "s/it" in lines[-1] and "MiB" in lines[-1]
    assert set(stats.to_dict()) >= {"sup_a", "sup_b", "cps", "total", "seconds_per_iteration", "peak_memory_mib"}

    agreement = first.branch_agreement(data["unlabeled"], max_per_phase=1)
    assert set(agreement) == {"GED4", "T2"} and all(0.0 <= v <= 1.0 for v in agreement.values())

    other = CPSTrainer(data["plans"], data["labeled"], data["unlabeled"], TrainerConfig(seed=4), log=_quiet)
    assert not _equal_weights(other.state_dicts(), start)


def test_supervised_mode_ignores_unlabeled(data):
    config = TrainerConfig(mode="supervised", batch_size=1, seed=0, prefetch=0, log_every=0)
    with_unlabeled = CPSTrainer(data["plans"], data["labeled"], data["unlabeled"], config, log=_quiet)
    without = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
    stats = with_unlabeled.train(2)
    without.train(2)
    assert stats.num_unlabeled == 0 and stats.cps == 0.0 and stats.lambda_last == 0.0
    assert _equal_weights(with_unlabeled.state_dicts(), without.state_dicts())
    with pytest.raises(ValueError):
        CPSTrainer(data["plans"], [], data["unlabeled"], config, log=_quiet)


def test_fedprox_pulls_towards_reference(data):
    """A huge mu keeps the weights at the reference; mu = 0 lets them move."""
    base = dict(mode="supervised", batch_size=1, seed=0, prefetch=0, log_every=0)
    moved = {}
    for mu in (0.0, 1e4):
        trainer = CPSTrainer(data["plans"], data["labeled"], [], TrainerConfig(proximal_mu=mu, **base), log=_quiet)
        reference = trainer.state_dicts()
        trainer.train(2, reference=reference)
        after = trainer.state_dicts()["a"]
        moved[mu] = sum(float((after[k] - reference["a"][k]).pow(2).sum()) for k in after)
    assert moved[1e4] < moved[0.0]


def test_supervised_training_learns_easy_task(data):
    config = TrainerConfig(mode="supervised", batch_size=1, seed=0, oversample_foreground=1.0, log_every=0)
    trainer = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
    image, seg, _ = data["labeled"][0].load()

    def train_dice() -> float:
        probs = sliding_window_predict(trainer.nets["a"], torch.from_numpy(np.array(image)), PATCH)
        return dice(probs.argmax(0).numpy(), np.asarray(seg[0]) > 0)

    before = train_dice()
    stats = trainer.train(12)
    losses = stats.history
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0
    assert train_dice() > before


def test_initial_weights_from_model_dir(data, tmp_path):
    """--init with a MODEL_DIR: branch a's body goes into both nets, heads keep their own init."""
    donor = CPSTrainer(data["plans"], data["labeled"], [], TrainerConfig(mode="supervised", seed=11), log=_quiet)
    save_model_dir(tmp_path / "pre", donor.state_dicts(), data["plans"], {"mode": "supervised"})
    config = TrainerConfig(mode="supervised", seed=0, pretrained=str(tmp_path / "pre"))
    trainer = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
    donor_a, got = donor.state_dicts()["a"], trainer.state_dicts()
    body = [k for k in donor_a if not k.startswith("seg_outputs.")]
    assert all(torch.equal(got[b][k], donor_a[k]) for b in ("a", "b") for k in body)
    assert not torch.equal(got["a"]["seg_outputs.4.weight"], got["b"]["seg_outputs.4.weight"])

    wrong = _tiny_plans()
    wrong["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64, 128, 128]
    from common.stunet import build_stunet_from_plans
    with pytest.raises((ValueError, RuntimeError)):
        load_initial_weights(build_stunet_from_plans(wrong), tmp_path / "pre")


# --------------------------------------------------------------------------------------------- CLI
def test_fedliver_train_writes_model_dir(tmp_path, capsys):
    """`fedliver train` on a tiny LiQA tree: index, fingerprint, plan, preprocess, CPS, MODEL_DIR."""
    from common.model_dir import load_model_dir
    from fedliver.cli import main

    for i in range(3):
        case = _liver_case(tmp_path / "liqa" / "Vendor_A", f"000{i + 1}-A-S1", seed=i)
        if i == 2:  # an unlabeled case: its GED4 is an unlabeled sample
            case.masks["GED4"].unlink()
    out = tmp_path / "runs" / "model"
    rc = main(["train", "--data", str(tmp_path / "liqa"), "--centers", "A", "--out", str(out), "--iterations", "2",
               "--patch", "16,32,32", "--base-width", "4", "--batch", "1", "--threads", "1", "--log-every", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "s/it" in printed and "MiB" in printed and "branch agreement" in printed
    bundle = load_model_dir(out)
    assert set(bundle.branches) == {"a", "b"}
    assert bundle.plans["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 32]
    info = bundle.info
    assert info["mode"] == "cps" and info["centers"] == ["A"] and info["iterations"] == 2
    # labeled: 2 GED4 + their cases' T2 under the propagated GED4 mask (the default);
    # unlabeled: the unlabeled case's T2 and GED4
    assert info["propagate_labels"] and info["num_labeled"] == 4 and info["num_unlabeled"] == 2
    assert "initial weights: " in printed and info["init"].endswith("stunet_T4_synth.safetensors")
    assert info["stats"]["seconds_per_iteration"] > 0 and set(info["branch_agreement"]) == {"GED4", "T2"}
    assert (tmp_path / "runs" / "cache").is_dir()  # default cache: <out>/../cache

    rc = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m2"), "--iterations", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "missing" in err[0]


def test_momentum_carried_between_rounds(data):
    """A trainer given the last round's momentum steps by exactly lr * m^2 * buffer more than a fresh one
    (Nesterov SGD: buf = m buf + g; w -= lr (g + m buf)); shapes that no longer match are left out."""
    config = TrainerConfig(mode="supervised", batch_size=1, seed=0, prefetch=0, log_every=0, weight_decay=0.0)
    previous = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
    previous.train(2)
    weights, buffers = previous.state_dicts(), previous.momentum_buffers()
    trained = {f"{b}.{name}" for b in BRANCHES for name, p in previous.nets[b].named_parameters() if p.grad is not None}
    assert set(buffers) == trained  # the deepest head is outside deep supervision: no gradient, no momentum
    assert any(np.abs(v).max() > 0 for v in buffers.values())

    after = {}
    for keep in (True, False):
        trainer = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
        trainer.load_state_dicts(weights)
        if keep:
            assert trainer.load_momentum_buffers(buffers) == len(buffers)
        trainer.train(1, start_iteration=0, total_iterations=10)
        after[keep] = trainer.state_dicts()
    lr, m = poly_lr(0.01, 0, 10), config.momentum
    for name in (key.removeprefix("a.") for key in buffers if key.startswith("a.")):
        expected = -lr * m * m * torch.from_numpy(buffers[f"a.{name}"])
        assert torch.allclose(after[True]["a"][name] - after[False]["a"][name], expected, atol=1e-6), name

    fresh = CPSTrainer(data["plans"], data["labeled"], [], config, log=_quiet)
    wrong = {k: (np.zeros((1,), np.float32) if k.endswith("seg_outputs.4.weight") else v) for k, v in buffers.items()}
    assert fresh.load_momentum_buffers(wrong) == len(buffers) - 2
    roundtrip = fresh.momentum_buffers()
    assert set(roundtrip) == set(buffers) - {"a.seg_outputs.4.weight", "b.seg_outputs.4.weight"}
    assert all(np.array_equal(roundtrip[k], buffers[k]) for k in roundtrip)
