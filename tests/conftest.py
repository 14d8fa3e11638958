import os

# Busy-waiting OpenMP threads slow torch down many times over when processes share the cores
# (a CI runner, the Ray workers of a simulation, the other pytest-xdist workers); must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one torch thread each, inherited by the processes they start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402

# Modules that run for minutes through real processes (heartbeat expiry, SuperLink round trips,
# Ray start-up, fresh ClientApp processes). Started first, each on its own xdist worker
# (`--dist loadfile`), so that the rest of the suite fills the cores beside them instead of
# leaving one of them to run alone at the end.
LONGEST_FIRST = (
    "test_faults.py",
    "test_deploy_guide.py",
    "test_simulation_e2e.py",
    "test_real_federation.py",
    "test_run_fails_fast.py",
    "test_deploy_federation.py",
    "test_federation.py",
    "test_labeled_phases.py",
    "test_dicom_seg.py",
    "test_nnunet_export.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, the rest in collection order (a stable sort keeps each module's order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def one_thread():
    """Keep a test's torch work on one thread: the two cores are shared with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
