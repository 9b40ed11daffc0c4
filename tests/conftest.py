import pytest
import torch

import pgserver
from helpers import FAMILIES, tiny_model, tiny_tokenizer  # tests/ is on pytest's pythonpath (pyproject)

torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a local HF folder, for CLI tests."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (skips where PostgreSQL or psycopg is missing)."""
    why = pgserver.unavailable()
    if why:
        pytest.skip(f"no PostgreSQL test server: {why}")
    server = pgserver.PostgresServer().start()
    yield server
    server.stop()
