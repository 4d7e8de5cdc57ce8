"""Shared test set-up: Triton kernels run through the interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores: oversubscribed OpenMP pools spin and make
# small CPU ops 10-100x slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def tiny_category(tmp_path_factory):
    """A tiny random checkpoint with the five category tokens and [respond]."""
    from rtkern.spec import RESPOND_TOKEN, control_token_strings
    from tiny import save_scoring_model
    d = tmp_path_factory.mktemp("tiny_category")
    save_scoring_model(d, control_token_strings("category")[0] + [RESPOND_TOKEN])
    return d


def pytest_configure(config):
    from rtkern.kernels._common import interpreter_enabled, interpreter_incompatibility
    if interpreter_enabled() and interpreter_incompatibility():
        pytest.exit(interpreter_incompatibility(), returncode=4)
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU (still runs by default)")
