import os

# Busy-waiting OpenMP threads slow torch down many times over when processes share the cores
# (a CI runner, the Ray workers of a simulation); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Keep a test's torch work on one thread: the two cores are shared with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
