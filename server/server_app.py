"""The coordinator's Flower ServerApp: reads the run config and runs the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.federation_config import FederationConfig
from server.federation import Federation

app = ServerApp()


def _log(text: str) -> None:
    print(f"[server] {text}", flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    _log(f"run folder {config.run_dir}; {config.num_rounds} rounds of {config.local_iterations} local iterations")
    Federation(grid, config, log=_log).run_all()
