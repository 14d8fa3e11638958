"""The run folder: plans, a MODEL_DIR per round, the best one, and what resuming needs.

    run_dir/
      plans.json, plans.sha256        the federated plans, pinned by hash
      checkpoints/round_0003/         MODEL_DIR of the global pair after round 3
      checkpoints/best/               MODEL_DIR with the best validation GED4 Dice so far (training
                                      sites' validation cases; absent when no site has any)
      server_state.json               last complete round, best round, history of every round
      strategy_state.safetensors      the strategy's buffers (FedAvgM momentum, FedAdam/FedYogi moments)
                                      and the DP accountant's ledger, for resuming

A round counts as complete once `server_state.json` names it; it is written last (atomically),
so a crash mid-round resumes from the round before with the same numbering.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from common.atomic_write import atomic_directory, atomic_path, atomic_write_json
from common.model_dir import load_model_dir, save_model_dir
from common.planning import plans_hash, read_plans, write_plans
from common.weights import flatten, to_torch, unflatten


@dataclass
class ServerState:
    last_round: int = 0
    best_round: int = 0
    best_score: float = -1.0  # pooled validation GED4 Dice of best_round
    history: list[dict] = field(default_factory=list)  # one entry per completed round


class RunFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    # plans ---------------------------------------------------------------------------------
    @property
    def plans_file(self) -> Path:
        return self.root / "plans.json"

    def save_plans(self, plans: dict) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        return write_plans(plans, self.plans_file)

    def load_plans(self) -> dict | None:
        return read_plans(self.plans_file) if self.plans_file.is_file() else None

    # state ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "server_state.json"

    def load_state(self) -> ServerState:
        if not self.state_file.is_file():
            return ServerState()
        return ServerState(**json.loads(self.state_file.read_text()))

    def save_state(self, state: ServerState) -> None:
        atomic_write_json(self.state_file, asdict(state), indent=1)

    # models --------------------------------------------------------------------------------
    def round_dir(self, server_round: int) -> Path:
        return self.checkpoints / f"round_{server_round:04d}"

    @property
    def best_dir(self) -> Path:
        return self.checkpoints / "best"

    def save_round(self, server_round: int, flat: dict[str, np.ndarray], plans: dict, info: dict) -> Path:
        path = self.round_dir(server_round)
        save_model_dir(path, to_torch(unflatten(flat)), plans, {"round": server_round, **info})
        return path

    def load_round(self, server_round: int) -> dict[str, np.ndarray]:
        bundle = load_model_dir(self.round_dir(server_round))
        if plans_hash(bundle.plans) != plans_hash(self.load_plans() or {}):
            raise ValueError(f"{self.round_dir(server_round)}: plans differ from the run's plans.json")
        return flatten(bundle.branches)

    def promote_best(self, server_round: int) -> None:
        with atomic_directory(self.best_dir) as temporary:  # the previous best stays until the copy is whole
            shutil.copytree(self.round_dir(server_round), temporary, dirs_exist_ok=True)

    def prune(self, keep: set[int]) -> None:
        """Drop round checkpoints not in `keep` (the best one lives on in `best/`)."""
        for path in self.checkpoints.glob("round_*"):
            if int(path.name.split("_")[1]) not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # strategy state ------------------------------------------------------------------------
    @property
    def strategy_state_file(self) -> Path:
        return self.root / "strategy_state.safetensors"

    def save_strategy_state(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        """The strategy's buffers as tensors, its name and the DP accountant's ledger as JSON metadata."""
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.strategy_state_file) as temporary:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(temporary),
                      metadata={"info": json.dumps(info)})

    def load_strategy_state(self) -> tuple[dict[str, np.ndarray], dict]:
        if self.strategy_state_file.is_file():
            with safe_open(str(self.strategy_state_file), "np") as stream:
                info = json.loads((stream.metadata() or {}).get("info", "{}"))
            return load_file(str(self.strategy_state_file)), info
        legacy = self.root / "momentum.safetensors"  # runs before Flower's strategies: the FedAvgM buffer
        if legacy.is_file():
            return {f"momentum.{k}": v for k, v in load_file(str(legacy)).items()}, {"strategy": "fedavgm"}
        return {}, {}
