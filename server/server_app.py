"""The coordinator's Flower ServerApp: reads the run config and runs the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.federation_config import FederationConfig
from server.federation import Federation
from server.messaging import CannotStart

app = ServerApp()


def _log(text: str) -> None:
    print(f"[server] {text}", flush=True)


def read_config(run_config: dict) -> FederationConfig:
    """The run config checked before anything else: an unknown key (with the nearest valid one), a
    wrong type or a bad value fails the run here, in one line in the run log and as the run's
    failure details (Flower's), without the frames of the parsing code."""
    try:
        return FederationConfig.from_run_config(run_config)
    except ValueError as error:
        _log(f"cannot start: {error}")
        raise ValueError(str(error)) from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = read_config(dict(context.run_config))
    config.run_dir.mkdir(parents=True, exist_ok=True)
    _log(f"run folder {config.run_dir}; {config.num_rounds} rounds of {config.local_iterations} local iterations")
    try:
        Federation(grid, config, log=_log).run_all()
    except CannotStart as error:  # said in one line ("cannot start: ..."); fail without the waiting code's frames
        raise CannotStart(str(error)) from None
