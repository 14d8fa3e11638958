"""The `device` setting (auto | cpu | cuda | cuda:N) and mixed precision.

Runs on the CPU: a GPU asked for on a machine without one must fail with one line (the resolver,
`fedliver train`/`predict`, a ClientApp's train reply), and the autocast path of the trainer runs
here in bfloat16.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from client.client_app import _trainer_config, app as client_app, site_device
from client.trainer import CPSTrainer, TrainerConfig
from common.device import autocast_dtype, resolve_device
from common.planning import default_test_plans
from common.preprocessing import PreprocessingCache
from inprocess_grid import InProcessGrid
from server.messaging import broadcast
from simulations.runner import SimulationSpec, auto_gpus_per_node, gpus_per_node, write_connection
from test_data_loading import _liver_case  # pytest puts tests/ on sys.path

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the error of a machine without a CUDA GPU")
NO_GPU_LINE = "device 'cuda' requested but no CUDA GPU is available on this machine"


# --------------------------------------------------------------------------------------------- resolver
def test_auto_is_cpu_without_gpu_and_cuda_with_one():
    assert resolve_device("auto") == torch.device("cuda" if HAS_GPU else "cpu")
    assert resolve_device("auto", gpu_count=0) == torch.device("cpu")
    assert resolve_device(None, gpu_count=2) == resolve_device(" AUTO ", gpu_count=2) == torch.device("cuda")
    assert resolve_device("cpu", gpu_count=4) == torch.device("cpu")  # a GPU machine can still be told cpu


@no_gpu
def test_cuda_without_gpu_is_one_clear_line():
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as error:
            resolve_device(spec)
        assert str(error.value) == f"device {spec!r} requested but no CUDA GPU is available on this machine"


def test_cuda_index_checked_against_the_gpus_there_are():
    assert resolve_device("cuda:1", gpu_count=2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^device 'cuda:2' requested but this machine has 2 CUDA GPU\(s\) "
                                         r"\(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2", gpu_count=2)


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "cuda:x", "cuda:-1", "mps", ""])
def test_bad_spec_names_the_choices(spec):
    with pytest.raises(ValueError, match=r"is not one of auto, cpu, cuda or cuda:N$"):
        resolve_device(spec, gpu_count=1)


def test_autocast_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.float16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("off", cuda) is None
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainerConfig(autocast="int8")


# --------------------------------------------------------------------------------------------- trainer
PATCH = (16, 32, 32)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    plans = default_test_plans(PATCH)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32, 64, 64]
    cache = PreprocessingCache(root / "cache", plans)
    cases = [_liver_case(root / "raw", f"000{i}-A", seed=i) for i in range(2)]
    return plans, [cache.get(c, "GED4", with_mask=True) for c in cases], [cache.get(c, "T2", with_mask=False) for c in cases]


def _one_cps_iteration(volumes, autocast: str) -> tuple[CPSTrainer, dict, dict]:
    plans, labeled, unlabeled = volumes
    config = TrainerConfig(mode="cps", batch_size=1, unlabeled_batch_size=1, seed=0, prefetch=0, log_every=0,
                           autocast=autocast, device="cpu")
    trainer = CPSTrainer(plans, labeled, unlabeled, config, log=lambda _: None)
    before = trainer.state_dicts()
    stats = trainer.train(1, total_iterations=10)
    return trainer, before, stats


@pytest.mark.usefixtures("one_thread")
def test_bf16_autocast_cps_iteration_on_cpu(volumes):
    trainer, before, stats = _one_cps_iteration(volumes, "bf16")
    assert trainer.amp_dtype == torch.bfloat16 and trainer.grad_scaler is None  # the scaler is for CUDA fp16
    assert all(torch.isfinite(torch.tensor(v)) for v in (stats.sup_a, stats.sup_b, stats.cps, stats.total))
    assert stats.cps > 0 and stats.peak_gpu_memory_mib == 0.0
    after = trainer.state_dicts()
    for branch in ("a", "b"):
        changed = [k for k in before[branch] if not torch.equal(before[branch][k], after[branch][k])]
        assert changed and all(after[branch][k].dtype == torch.float32 for k in after[branch])  # fp32 master weights
    # Same data, same seeds: float32 differs from bf16 only by rounding, so autocast really ran.
    reference, _, exact = _one_cps_iteration(volumes, "off")
    assert reference.amp_dtype is None
    assert stats.total != exact.total and abs(stats.total - exact.total) < 0.05 * exact.total


# --------------------------------------------------------------------------------------------- ClientApp
def test_node_config_device_overrides_run_config():
    assert site_device("A", {"device": "cpu"}, {"device": "cuda"}) == torch.device("cpu")
    assert site_device("A", {}, {"device": "cpu"}) == torch.device("cpu")
    assert site_device("A", {}, {}) == resolve_device("auto")
    config = ConfigRecord({"mode": "cps", "batch-size": 1, "learning-rate": 0.01, "cps-lambda-max": 1.0,
                           "cps-rampup-rounds": 0, "seed": 0, "server-round": 1})
    trainer_config = _trainer_config(config, site_device("A", {"device": "cpu"}, {"device": "auto"}))
    assert trainer_config.device == "cpu" and trainer_config.autocast == "auto"


@no_gpu
def test_site_without_gpu_replies_one_error_line(tmp_path):
    with pytest.raises(ValueError) as error:
        site_device("B1", {}, {"device": "cuda"})  # the run config asks every site for a GPU
    assert str(error.value) == f"site B1: {NO_GPU_LINE}"
    # Through the real ClientApp and the server's reply sorting: the train reply is an error that
    # names the site and the problem, raised before the site reads any data or the message.
    node = {"site": "A", "role": "train", "data-dir": str(tmp_path / "none"), "device": "cuda"}
    grid = InProcessGrid(client_app, [node], {"device": "cpu"})
    replies, failures = broadcast(grid, {1000: "A"}, "train", RecordDict({"config": ConfigRecord({"mode": "cps"})}),
                                  group="1", timeout=10)
    assert not replies and len(failures) == 1
    assert str(failures[0]).startswith("site A (node 1000): train failed: ")
    assert f"site A: {NO_GPU_LINE}" in str(failures[0]) and "\n" not in str(failures[0])


# --------------------------------------------------------------------------------------------- CLI
@no_gpu
def test_fedliver_train_and_predict_device_cuda_exit_2_with_one_line(tmp_path):
    for command in (["train", "--data", str(tmp_path), "--out", str(tmp_path / "model"), "--init", "none"],
                    ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "model")]):
        done = subprocess.run([sys.executable, "-m", "fedliver", *command, "--device", "cuda"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"--device: {NO_GPU_LINE}"
        assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- simulation
def test_ray_gpus_per_node(tmp_path):
    assert auto_gpus_per_node(4, gpu_count=0) == 0.0
    assert auto_gpus_per_node(4, gpu_count=1) == 0.25
    assert auto_gpus_per_node(3, gpu_count=1) == 0.3333  # rounded down: 3 shares fit on one GPU
    assert auto_gpus_per_node(4, gpu_count=3) == 0.5  # a share must fit on one GPU
    assert auto_gpus_per_node(4, gpu_count=8) == 1.0
    spec = SimulationSpec(run_dir=Path("r"), run_config={}, num_supernodes=4)
    assert gpus_per_node(spec) == (auto_gpus_per_node(4) if HAS_GPU else 0.0)
    assert gpus_per_node(SimulationSpec(run_dir=Path("r"), run_config={}, num_supernodes=4, gpus_per_node=0.5)) == 0.5
    with pytest.raises(ValueError, match="whole number above 1"):
        gpus_per_node(SimulationSpec(run_dir=Path("r"), run_config={}, num_supernodes=4, gpus_per_node=1.5))
    # What the runner hands Flower's simulation backend (options.backend.client-resources).
    import tomllib

    write_connection(tmp_path, 9999, SimulationSpec(run_dir=tmp_path, run_config={}, num_supernodes=4, gpus_per_node=0.25))
    options = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    resources = next(v for v in options.values() if isinstance(v, dict))["options"]["backend"]["client-resources"]
    assert resources == {"num-cpus": 2, "num-gpus": 0.25}
