import os
from pathlib import Path

import pytest
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")

# Under pytest-xdist (`pytest -n 2`, what CI runs) each worker keeps to one intra-op thread: two
# workers with two threads each would oversubscribe a 2-core machine and slow every step.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (tests/_reliability.py records real outcomes)."""
    rep = yield
    if not hasattr(item, "genaf_reports"):
        item.genaf_reports = {}
    item.genaf_reports[rep.when] = rep
    return rep


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's duration (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): its batches are tiny, and on a busy 2-core machine two spinning threads make
    every step an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data():
    """A tiny Fashion-MNIST split (the real offline dataset)."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    from genaf.data import load_dataset

    return load_dataset("fashion-mnist", n_train=192, n_val=96, n_test=96, seed=0)


@pytest.fixture()
def tiny_encoder():
    from genaf.encoders import load_encoder

    return load_encoder("random:demo")


try:  # property tests explore new examples locally, and replay a fixed set in CI
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra
    pass
