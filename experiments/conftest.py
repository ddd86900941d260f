"""What the experiments' tests share: the quick toy world, built once per test session (about 20 s)."""
import pytest

from experiments import toy_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return toy_world.build(str(tmp_path_factory.mktemp("toy")), seed=0, quick=True)
