"""Streaming NLL against references computed another way."""

import numpy as np
import torch
from helpers import random_ids, tiny_model

from sinkstream.eval.ppl import streaming_nll


@torch.no_grad()
def test_chunk_1_equals_step_by_step_and_big_cache_equals_dense():
    model = tiny_model("llama", layers=2)
    ids = random_ids(150)[0]
    ref = []  # token by token through the same cache policy, rebases included
    from sinkstream import Engine

    class NoTok:
        eos_token_id = None

    engine = Engine(model, NoTok(), n_sink=4, window=20)
    for t in range(len(ids) - 1):
        lp = torch.log_softmax(engine.step(int(ids[t]))[0], -1)
        ref.append(-float(lp[ids[t + 1]]))
    np.testing.assert_allclose(streaming_nll(model, ids, 4, 20, chunk=1, progress=False), ref, atol=1e-4)
    dense = -torch.log_softmax(model(ids[None]).logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
    chunked = streaming_nll(model, ids, 4, 200, chunk=16, progress=False)
    np.testing.assert_allclose(chunked, dense.numpy(), atol=1e-4)
