"""Without CUDA, Triton kernels run in its interpreter; the variable must be set before triton is imported. Every
process the suite starts writes its threads' stacks if it dies by a signal (faulthandler)."""

import os

from sparse_transformer import threads

threads.configure()  # the suite gives way to other work on the machine, as train.py does

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a train.py or sample.py the suite runs that dies by a signal shows its stacks


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than the work, and on shared CI cores threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
