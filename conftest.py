"""Fixtures shared by test_mosrep.py (the method's specification) and tools/test_tools.py (the tools')."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The 2 CPU cores are shared with other jobs: intra-op threads then spin against each other and tiny
    convolutions run 2-3x slower than on one thread. Restored after each test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
