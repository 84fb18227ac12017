"""Shared pytest setup: one CPU thread, no GPU (unless ``INVERSEREG_TEST_CUDA=1``), small shared fixtures.

The suite runs on CPU only (the CI machine has 2 cores and no GPU). Tests that need a *trained*
network use the bundled ``Resources/InverseReg-default.pt``; set ``INVERSEREG_TEST_MODEL`` to a
model file (e.g. a training snapshot) to run them before the bundled model is committed. Without
either, those tests (and only those) are skipped with a reason.
"""
from __future__ import annotations

import os

# before torch is imported anywhere: one thread, and the GPU hidden so "auto" means CPU, unless
# INVERSEREG_TEST_CUDA=1 asks for it (benchmarks/gpu_check.sh on a machine with a GPU): then the
# tests that need CUDA run, and "auto" may mean the GPU
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if os.environ.get("INVERSEREG_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s on a 2-core CPU (still run by default)")


@pytest.fixture(scope="session")
def small_pair():
    """A synthetic brain-like pair (48 x 56 x 48 voxels of 3.4 mm) with its true forward field:
    ``(fixed, moving, fixed_seg, moving_seg, true_forward)``."""
    from InverseRegLib.synthetic import make_pair
    return make_pair(size=(48, 56, 48), spacing=(3.4, 3.4, 3.4), seed=0, return_field=True)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """A small untrained ``default``-preset model file with non-trivial fields (see
    :func:`inversereg_testlib.small_model`)."""
    from inversereg_testlib import small_model, write_model_file
    return write_model_file(tmp_path_factory.mktemp("model") / "small.pt", small_model("default", 5e4))
