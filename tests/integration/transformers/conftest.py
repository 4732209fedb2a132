import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from more threads
    yield
