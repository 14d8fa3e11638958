"""One pipeline (issue 10 §3): `fedliver train` and the federation's site share client/pipeline.py.

`fedliver train` is `train_locally(LocalTrainingConfig)`: the command line and a script calling the
function write the same MODEL_DIR. Pooled over centers, each center is a site with its own cache
folder, so a second run reads no file to index, fingerprint or preprocess it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import common.fingerprint as fingerprint
import common.preprocessing as preprocessing
import common.validation as validation
from client.local_training import LocalTrainingConfig, center_sites, train_locally
from client.pipeline import site_volumes, trainer_config
from client.trainer import TrainerConfig
from common.label_transfer_config import LabelTransferConfig
from common.run_config import defaults
from fedliver.cli import main
from simulations.phantoms import PhantomConfig, generate_liqa_tree

#: What `fedliver train` writes into info.json (predict and the experiments read it).
INFO_KEYS = ["kind", "mode", "iterations", "centers", "data", "size", "patch_size", "batch_size",
             "unlabeled_batch_size", "learning_rate", "encoder_lr_scale", "lambda_max", "rampup_iterations", "cps_loss",
             "cps_confidence", "cps_strong_view", "cps_gate", "balance_phases", "mirror_axes", "propagate_labels", "labeled_phases", "label_transfer",
             "unlabeled_phases", "seed", "device", "postprocessing", "init", "num_labeled", "num_unlabeled", "stats",
             "branch_agreement", "seconds"]
#: What differs between two runs of the same training: the clock and the memory.
TIMINGS = {"seconds", "seconds_per_iteration", "data_wait_per_iteration", "peak_memory_mib"}


@pytest.fixture(scope="module")
def two_centers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_phantoms")
    generate_liqa_tree(root, PhantomConfig(centers=("A", "B1"), cases=2, labeled=1, seed=5, heldout=(),
                                           validation_cases=1))
    return root


@pytest.fixture()
def reads(monkeypatch) -> dict[str, int]:
    """Input files read to validate, fingerprint, hash or preprocess them (the real functions, counted)."""
    counts = {"validated": 0, "fingerprinted": 0, "hashed": 0, "preprocessed": 0}
    for module, name, key in ((validation, "voxel_stats", "validated"), (fingerprint, "analyze_image", "fingerprinted"),
                              (preprocessing, "sha256_file", "hashed"), (preprocessing, "preprocess_image", "preprocessed")):
        real = getattr(module, name)

        def counted(*args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def _without_timings(info: dict) -> dict:
    return {k: ({s: v for s, v in value.items() if s not in TIMINGS} if k == "stats" else value)
            for k, value in info.items() if k not in TIMINGS}


def test_fedliver_train_is_train_locally_and_a_second_run_reads_no_file(two_centers, tmp_path, reads, one_thread,
                                                                        capsys):
    cache = tmp_path / "cache"
    options = dict(centers=("A", "B1"), iterations=1, patch=(16, 32, 32), batch=1, cps_gate=0.5, init="none",
                   agreement_volumes=0, log_every=1, threads=1, device="cpu", cache=cache)
    argv = ["train", "--data", str(two_centers), "--out", str(tmp_path / "cli"), "--centers", "A,B1",
            "--iterations", "1", "--patch", "16,32,32", "--batch", "1", "--cps-gate", "0.5", "--init", "none",
            "--agreement-volumes", "0", "--log-every", "1", "--threads", "1", "--device", "cpu", "--cache", str(cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert reads["validated"] and reads["fingerprinted"] and reads["preprocessed"]
    # Each center is a site with its own prepared dataset: index, fingerprints, preprocessed volumes.
    for center in ("A", "B1"):
        assert (cache / center / "index" / "files.json").is_file()
        assert any((cache / center / "fingerprint").iterdir()) and any((cache / center / "preprocessed").iterdir())
    assert sorted(p.name for p in cache.iterdir()) == ["A", "B1"]

    reads.update(dict.fromkeys(reads, 0))
    assert train_locally(LocalTrainingConfig(data=two_centers, out=tmp_path / "function", **options)) == 0
    again = capsys.readouterr().out
    assert reads == {"validated": 0, "fingerprinted": 0, "hashed": 0, "preprocessed": 0}
    sites = center_sites(LocalTrainingConfig(data=two_centers, out=tmp_path / "function", **options))
    assert [s.identity.cache_dir for s in sites] == [cache.resolve() / "A", cache.resolve() / "B1"]
    assert [s.file_checks.read for s in sites] == [0, 0] and all(s.file_checks.reused for s in sites)

    cli, function = (json.loads((tmp_path / name / "info.json").read_text()) for name in ("cli", "function"))
    assert sorted(cli) == sorted(function) == sorted(INFO_KEYS)
    assert _without_timings(cli) == _without_timings(function)  # the same training, step for step
    assert cli["kind"] == "centralized" and cli["centers"] == ["A", "B1"] and cli["init"] is None
    assert cli["num_labeled"] > 2 and cli["num_unlabeled"] > 0  # GED4 + propagated phases; unlabeled phases
    # The same lines, but for the clock, the memory and the MODEL_DIR it was given.
    def lines(text: str, out: Path) -> list[str]:
        return [re.sub(r"[\d.]+ (s/it|s|MiB)\b|data wait [\d.]+", "#", line)
                for line in text.replace(str(out), "OUT").splitlines()]
    assert lines(printed, tmp_path / "cli") == lines(again, tmp_path / "function")
    assert "CPS gate at iteration 0: validation Dice" in printed  # the validation cases reached the trainer


def test_site_volumes_pools_sites_as_each_gives_them(two_centers, tmp_path):
    from common.planning import default_test_plans

    plans = default_test_plans(patch_size=(16, 32, 32), spacing=(8.0, 6.0, 6.0))
    sites = center_sites(LocalTrainingConfig(data=two_centers, out=tmp_path / "m", centers=("A", "B1")))
    pooled = site_volumes(sites, plans, include_unlabeled=True, propagate_labels=False, with_validation=True)
    each = [site_volumes([s], plans, include_unlabeled=True, propagate_labels=False, with_validation=True)
            for s in sites]
    assert pooled.labeled == [v for e in each for v in e.labeled] and len(pooled.labeled) == 2
    assert pooled.unlabeled == [v for e in each for v in e.unlabeled] and pooled.unlabeled
    assert len(pooled.validation) == 2 and pooled.problems == []
    supervised = site_volumes(sites, plans, include_unlabeled=False, propagate_labels=False)
    assert supervised.unlabeled == [] and supervised.validation == [] and supervised.labeled == pooled.labeled


def test_one_mapping_from_run_config_names_to_the_trainer():
    # No setting: the schema's defaults, as a train message without them and TrainerConfig's own.
    assert trainer_config({}) == TrainerConfig(unlabeled_batch_size=int(defaults()["unlabeled-batch-size"]))
    transfer = LabelTransferConfig(location_scale=0.5, transpose=0.25)
    local = LocalTrainingConfig(data=Path("d"), out=Path("o"), pretrain=True, batch=3, unlabeled_batch=None, lr=0.02,
                                lambda_max=0.5, cps_confidence=0.9, balance_phases=False, mirror_axes=(0, 1),
                                label_transfer=transfer, seed=7)
    trainer = trainer_config(local.run_settings(), rampup_iterations=4, cps_gate=0.3)
    assert (trainer.mode, trainer.batch_size, trainer.unlabeled_batch_size) == ("supervised", 3, 3)
    assert (trainer.learning_rate, trainer.lambda_max, trainer.cps_confidence) == (0.02, 0.5, 0.9)
    assert (trainer.balance_phases, trainer.mirror_axes, trainer.label_transfer, trainer.seed) == (False, (0, 1), transfer, 7)
    assert (trainer.rampup_iterations, trainer.cps_gate, trainer.proximal_mu) == (4, 0.3, 0.0)
    # The run config writes mirror axes as text; both forms map alike.
    assert trainer_config({"mirror-axes": "0,1"}).mirror_axes == (0, 1)
