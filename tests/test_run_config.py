"""One declaration of the run config (common/run_config.py) and everything that takes it from there:
pyproject's `[tool.flwr.app.config]`, FederationConfig, the round config the server sends and what
the sites read from it, `fedliver train`, the demo, TrainerConfig. A run that cannot work fails at
once, in one line."""

from __future__ import annotations

import argparse
import re
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import _trainer_config, app as client_app
from client.trainer import TrainerConfig
from common import run_config
from common.run_config import parse_mirror_axes
from common.federation_config import FederationConfig, parse_patch, parse_sites, parse_spacing
from common.phases import parse_phase_list
from common.postprocessing import Postprocessing
from inprocess_grid import InProcessGrid
from server.federation import PROTOCOL_KEYS, Federation
from server.server_app import read_config
from server.strategy import PairAggregator

REPO = Path(__file__).resolve().parents[1]
D = run_config.defaults()


def _pyproject_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# ------------------------------------------------------------------------------------- the schema
def test_pyproject_declares_the_schema_keys_and_defaults():
    pyproject = _pyproject_config()
    assert list(pyproject) == list(D)  # same keys, same order
    assert run_config.validate(pyproject) == D  # same types (an int is a valid float) and values
    assert len(D) > 50


def test_every_key_is_typed_and_explained():
    for key in run_config.KEYS:
        assert key.type in (bool, int, float, str), key
        assert type(key.default) is key.type, key
        assert key.help and "\n" not in key.help, key


@pytest.mark.parametrize("given, line", [
    ({"local-iteration": 5}, "unknown run-config key 'local-iteration' (did you mean 'local-iterations'?)"),
    ({"num-rounds": 5}, "unknown run-config key 'num-rounds' (did you mean 'num-server-rounds'?)"),
    ({"local-iterations": "5x"}, "run-config 'local-iterations': expected int, got str '5x'"),
    ({"local-norm": 1}, "run-config 'local-norm': expected bool, got int 1"),
    ({"net-width": True}, "run-config 'net-width': expected int, got bool True"),
    ({"learning-rate": "0.1"}, "run-config 'learning-rate': expected float, got str '0.1'"),
    ({"sites": 4}, "run-config 'sites': expected str, got int 4"),
])
def test_unknown_keys_and_wrong_types_fail_in_one_line(given, line):
    with pytest.raises(ValueError) as error:
        run_config.validate(given)
    assert str(error.value) == line
    with pytest.raises(ValueError, match=re.escape(line)):
        FederationConfig.from_run_config(given)


def test_an_int_is_a_valid_float_and_missing_keys_take_the_defaults():
    values = run_config.validate({"learning-rate": 1, "round-timeout": 60})
    assert values["learning-rate"] == 1.0 and type(values["learning-rate"]) is float
    assert type(values["round-timeout"]) is float
    assert {k: v for k, v in values.items() if k not in ("learning-rate", "round-timeout")} == {
        k: v for k, v in D.items() if k not in ("learning-rate", "round-timeout")}


def test_several_problems_are_one_line():
    with pytest.raises(ValueError) as error:
        run_config.validate({"local-iteration": 5, "seed": 1.5})
    assert "\n" not in str(error.value)
    assert "'local-iteration'" in str(error.value) and "run-config 'seed': expected int, got float 1.5" in str(error.value)


def test_the_server_app_refuses_a_bad_run_config_in_one_line(capsys):
    with pytest.raises(ValueError) as error:
        read_config({**_pyproject_config(), "local-iterations": "5x"})
    assert str(error.value) == "run-config 'local-iterations': expected int, got str '5x'"
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback
    assert capsys.readouterr().out == "[server] cannot start: run-config 'local-iterations': expected int, got str '5x'\n"
    assert read_config(_pyproject_config()) == FederationConfig.from_run_config({})


# ------------------------------------------------------------------------------------- FederationConfig
#: FederationConfig field -> (run-config key, how the value is parsed).
FIELDS = {
    "num_rounds": ("num-server-rounds", None), "local_iterations": ("local-iterations", None),
    "evaluate_every": ("evaluate-every", None), "net_size": ("net-size", None),
    "base_width": ("net-width", lambda v: v or None), "patch_size": ("patch-size", parse_patch),
    "target_spacing": ("target-spacing", parse_spacing),
    "batch_size": ("batch-size", None), "unlabeled_batch_size": ("unlabeled-batch-size", None),
    "learning_rate": ("learning-rate", None), "mode": ("mode", None), "cps_lambda_max": ("cps-lambda-max", None),
    "cps_rampup_rounds": ("cps-rampup-rounds", None), "cps_confidence": ("cps-confidence", None),
    "cps_gate": ("cps-gate", None), "balance_phases": ("balance-phases", None),
    "propagate_labels": ("propagate-labels", None), "weighted_by": ("weighted-by", None),
    "proximal_mu": ("proximal-mu", None), "server_momentum": ("server-momentum", None),
    "local_norm": ("local-norm", None), "local_momentum": ("local-momentum", None),
    "fp16_transport": ("fp16-transport", None), "min_train_nodes": ("min-train-nodes", None),
    "round_timeout_s": ("round-timeout", None), "node_wait_s": ("node-wait", None),
    "init_weights": ("init-weights", None), "evaluate_step": ("evaluate-step", None),
    "evaluate_train_sites": ("evaluate-train-sites", None),
    "evaluate_phases": ("evaluate-phases", lambda v: parse_phase_list(v, "evaluate-phases")),
    "agreement_volumes": ("agreement-volumes", None), "device": ("device", None), "seed": ("seed", None),
    "sites": ("sites", lambda v: tuple(parse_sites(v))),
}
AGGREGATION = {"strategy": "strategy", "server_learning_rate": "server-learning-rate", "fedopt_eta": "fedopt-eta",
               "fedopt_beta_1": "fedopt-beta-1", "fedopt_beta_2": "fedopt-beta-2", "fedopt_tau": "fedopt-tau",
               "trimmed_beta": "trimmed-beta", "num_malicious_nodes": "num-malicious-nodes",
               "num_nodes_to_select": "num-nodes-to-select", "dp": "dp", "dp_noise_multiplier": "dp-noise-multiplier",
               "dp_clipping_norm": "dp-clipping-norm", "dp_delta": "dp-delta", "int8_updates": "int8-updates"}


def test_federation_config_defaults_are_the_schema_defaults():
    config = FederationConfig.from_run_config({})
    for name, (key, parse) in FIELDS.items():
        expected = parse(D[key]) if parse else D[key]
        assert getattr(config, name) == expected, (name, key)
    for name, key in AGGREGATION.items():
        assert getattr(config.aggregation, name) == D[key], (name, key)
    assert config.aggregation.adversarial == {} and D["adversarial-sites"] == ""
    assert config.label_transfer.to_dict_hyphenated() == {k: D[k] for k in config.label_transfer.to_dict_hyphenated()}
    assert config.postprocessing == Postprocessing.parse(D["postprocessing"], D["postprocessing-phases"])
    assert config.data_root is None and D["data-root"] == ""
    assert config.run_dir == Path("runs/federation").resolve() and D["run-dir"] == ""  # empty: the fallback


# ------------------------------------------------------------------------------------- the round config
#: A value other than the default for every key a site gets in the round config.
NOT_DEFAULTS = {
    "num-server-rounds": 4, "local-iterations": 7, "mode": "supervised", "batch-size": 3, "unlabeled-batch-size": 5,
    "learning-rate": 0.02, "cps-lambda-max": 0.5, "cps-rampup-rounds": 3, "cps-confidence": 0.7,
    "balance-phases": False, "propagate-labels": False, "location-scale": 0.1, "non-contrast": 0.2,
    "random-conv": 0.3, "transpose": 0.4, "bias-field": 0.6, "cps-strong-view": True, "proximal-mu": 0.25, "local-norm": True, "local-momentum": True,
    "fp16-transport": True, "seed": 11, "evaluate-step": 0.75, "evaluate-phases": "GED4,T2",
    "postprocessing": "none", "postprocessing-phases": "GED4,T2", "agreement-volumes": 2, "mirror-axes": "0,1",
    "labeled-phases": "GED4,T2",
}


@pytest.fixture(autouse=True)
def server_task():
    # The ServerApp's messages read the running task's identity (a SuperLink sets it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def _federation(tmp_path: Path, values: dict) -> Federation:
    values = {"run-dir": str(tmp_path / "run"), "sites": "A:train,B1:train,C:eval", **values}
    return Federation(InProcessGrid(client_app, [], values), FederationConfig.from_run_config(values), log=lambda s: None)


def test_the_round_config_carries_run_config_keys_by_their_names_and_values(tmp_path):
    assert set(NOT_DEFAULTS) <= set(D) and all(NOT_DEFAULTS[k] != D[k] for k in NOT_DEFAULTS)
    values = {**NOT_DEFAULTS, "strategy": "fedprox"}
    config = dict(_federation(tmp_path, values).round_config(3, "{}", "abc", cps_enabled=False))
    assert set(config) - set(D) <= set(PROTOCOL_KEYS), set(config) - set(D) - set(PROTOCOL_KEYS)
    assert {k: config[k] for k in config if k in D} == NOT_DEFAULTS  # every one it sends, as given
    assert config["server-round"] == 3 and config["cps-enabled"] is False and config["plans-sha256"] == "abc"
    assert "threads" not in config  # no site reads it any more (torch's own choice, as before)


def test_what_the_strategy_adds_is_a_schema_or_protocol_key(tmp_path):
    values = {"strategy": "fedprox", "proximal-mu": 0.1, "int8-updates": True, "dp": "client-fixed"}
    federation = _federation(tmp_path, values)
    current = {"a.w": np.zeros(3, np.float32), "b.w": np.ones(3, np.float32)}
    content = PairAggregator(federation.config, 2).configure(1, current, federation.round_config(1, "{}", "x"), [1, 2])
    sent = dict(content["config"])
    assert set(sent) - set(D) <= set(PROTOCOL_KEYS), set(sent) - set(D) - set(PROTOCOL_KEYS)
    assert sent["int8-updates"] is True and sent["proximal-mu"] == 0.1 and "clipping_norm" in sent


def test_the_site_trains_with_what_the_server_configured(tmp_path):
    federation = _federation(tmp_path, NOT_DEFAULTS)
    c = federation.config
    trainer = _trainer_config(federation.round_config(2, "{}", "x"), "cpu")
    assert (trainer.mode, trainer.batch_size, trainer.unlabeled_batch_size) == (c.mode, c.batch_size, c.unlabeled_batch_size)
    assert (trainer.learning_rate, trainer.lambda_max, trainer.cps_confidence) == (c.learning_rate, c.cps_lambda_max,
                                                                                  c.cps_confidence)
    assert trainer.rampup_iterations == c.rampup_iterations == 3 * 7  # cps-rampup-rounds x local-iterations
    assert trainer.proximal_mu == c.proximal_mu and trainer.balance_phases is c.balance_phases
    assert trainer.label_transfer == c.label_transfer
    assert trainer.mirror_axes == c.mirror_axes == (0, 1)
    assert trainer.cps_strong_view is c.cps_strong_view is True
    assert trainer.seed == c.seed + 1000 * 2  # each round samples anew, as before


#: Where the sites read a message's config or the run config.
SITE_SOURCES = ("client/client_app.py", "client/pipeline.py", "client/adversarial.py", "client/update_encoding.py")
READ = re.compile(r'(?<!node_)(run_)?config(?:\.get\(|\[)"([\w-]+)"|setting\(\w+(?:\.(run_config))?, "([\w-]+)"\)|(?<![\w.])get\("([\w-]+)"\)')


def test_every_key_a_site_reads_is_sent_under_that_name(tmp_path):
    federation = _federation(tmp_path, {"strategy": "fedprox", "proximal-mu": 0.1})
    content = PairAggregator(federation.config, 2).configure(
        1, {"a.w": np.zeros(3, np.float32)}, federation.round_config(1, "{}", "x"), [1, 2])
    sent = set(content["config"])
    sent |= {"evaluate-test", "clipping_norm"}  # evaluate messages; Flower's client-side DP wrapper
    from_message, from_run_config = set(), set()
    for source in SITE_SOURCES:
        for match in READ.finditer((REPO / source).read_text()):
            run_cfg, key = match.group(1) or match.group(3), match.group(2) or match.group(4) or match.group(5)
            (from_run_config if run_cfg else from_message).add(key)
    assert {"local-iterations", "cps-rampup-rounds", "fp16-transport", "postprocessing", "seed"} <= from_message
    assert from_message <= sent, from_message - sent  # nothing renamed on the way, nothing never sent
    assert from_run_config <= set(D), from_run_config - set(D)
    assert "threads" not in from_message | from_run_config


# ------------------------------------------------------------------------------------- fedliver train, the demo
def _train_defaults() -> argparse.Namespace:
    from fedliver.commands import train

    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers())
    return parser.parse_args(["train", "--data", "d", "--out", "o"])


def test_fedliver_train_defaults_are_the_schema_defaults():
    from fedliver.commands.train import CPU_WIDTH, UNLABELED_BATCH

    args = _train_defaults()
    shared = {"mode": "mode", "size": "net-size", "batch": "batch-size", "lr": "learning-rate",
              "lambda_max": "cps-lambda-max", "cps_confidence": "cps-confidence", "cps_gate": "cps-gate",
              "propagate_labels": "propagate-labels", "balance_phases": "balance-phases",
              "location_scale": "location-scale", "non_contrast": "non-contrast", "random_conv": "random-conv",
              "transpose": "transpose", "seed": "seed", "agreement_volumes": "agreement-volumes", "device": "device",
              "postprocessing": "postprocessing", "postprocessing_phases": "postprocessing-phases"}
    for option, key in shared.items():
        assert getattr(args, option) == D[key], (option, key)
    assert args.patch == parse_patch(D["patch-size"])
    assert args.base_width is None and CPU_WIDTH == D["net-width"]  # None: the CPU net's width for size T
    # A deliberate departure, as the demo: 1 unlabeled sample per iteration.
    assert args.unlabeled_batch == UNLABELED_BATCH == 1 != D["unlabeled-batch-size"]


def test_the_demo_departs_from_the_defaults_only_where_it_says(tmp_path):
    from simulations.demo import DEMO_DEPARTURES, DEMO_OWNED, DemoConfig

    sent = DemoConfig(run_dir=tmp_path).run_config()
    assert run_config.validate(sent)
    differs = {k for k, v in sent.items() if v != D[k]}
    assert set(DEMO_DEPARTURES) <= differs <= set(DEMO_DEPARTURES) | set(DEMO_OWNED), differs


def test_trainer_config_defaults_are_the_schema_defaults_for_shared_settings():
    trainer = TrainerConfig()
    shared = {"mode": "mode", "batch_size": "batch-size", "learning_rate": "learning-rate",
              "lambda_max": "cps-lambda-max", "cps_confidence": "cps-confidence", "cps_gate": "cps-gate",
              "balance_phases": "balance-phases", "proximal_mu": "proximal-mu", "seed": "seed"}
    for field, key in shared.items():
        assert getattr(trainer, field) == D[key], (field, key)
    assert (trainer.unlabeled_batch_size or trainer.batch_size) == D["unlabeled-batch-size"]  # None: batch_size
    assert trainer.label_transfer.to_dict_hyphenated() == {k: D[k] for k in trainer.label_transfer.to_dict_hyphenated()}
    assert trainer.mirror_axes == run_config.parse_mirror_axes(D["mirror-axes"])


# ------------------------------------------------------------------------------------- fail fast
def _identify(tmp_path: Path, data_root: str) -> str:
    values = {"sites": "A:train,B1:train,C:eval", "data-root": data_root, "run-dir": str(tmp_path / "run")}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    federation = Federation(InProcessGrid(client_app, nodes, values), FederationConfig.from_run_config(values),
                            log=lambda s: None)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        federation.identify_nodes()  # node-wait is 300 s: it must not wait for it
    assert time.monotonic() - started < 20
    assert "\n" not in str(error.value)
    return str(error.value)


def test_an_empty_data_root_fails_the_simulation_at_once_saying_what_to_do(tmp_path):
    line = _identify(tmp_path, "")
    assert line.startswith("sites A, B1, C: run config 'data-root' is empty"), line  # tests/test_run_fails_fast.py
    assert "Vendor_<X> tree" in line and "to run: `make demo`" in line and "data-root='/abs/phantoms'" in line


def test_a_missing_site_folder_fails_at_once_naming_it(tmp_path):
    (tmp_path / "phantoms" / "Vendor_C").mkdir(parents=True)  # the data root exists; A's and B1's folders do not
    line = _identify(tmp_path, str(tmp_path / "phantoms"))
    assert line.startswith("site A: ") and "no Vendor_A folder" in line, line


@pytest.mark.parametrize("text, axes", [("0,1,2", (0, 1, 2)), ("0,1", (0, 1)), ("", ()), (" 2 ,0", (2, 0))])
def test_mirror_axes_parse(text, axes):
    assert parse_mirror_axes(text) == axes


@pytest.mark.parametrize("text", ["3", "0,0", "x", "0;1"])
def test_mirror_axes_refused_in_one_line(text):
    with pytest.raises(ValueError, match="mirror-axes .*expected distinct axes among 0, 1, 2"):
        parse_mirror_axes(text)
