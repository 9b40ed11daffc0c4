"""The server's worker: requests decoded together (joining and leaving the batch at different times)
give each what it would get alone, and leave with caches that continue exactly."""

import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams, SinkCache
from sinkstream.server.events import DoneEvent, ErrorEvent, TokenEvent
from sinkstream.server.worker import Job, Worker


def _drain(job):
    tokens, reason = [], None
    while reason is None:
        event = job.events.get(timeout=60)
        if isinstance(event, TokenEvent) and event.id >= 0:
            tokens.append(event.id)
        elif isinstance(event, DoneEvent):
            reason = event.reason
        elif isinstance(event, ErrorEvent):
            raise AssertionError(event.message)
    return tokens, reason


@torch.no_grad()
def test_batched_jobs_equal_alone():
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    prompts = [random_ids(n, seed=i)[0].tolist() for i, n in enumerate([5, 70, 33, 120])]
    params = [
        SamplingParams(max_new_tokens=m, temperature=t, seed=7) for m, t in [(40, 0.0), (25, 0.9), (60, 0.0), (10, 1.0)]
    ]
    alone = []
    for ids, p in zip(prompts, params):
        engine = Engine(model, tok, n_sink=4, window=24, prefill_chunk=8)
        alone.append([t.id for t in engine.generate(ids, p) if t.id >= 0])
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        jobs = [worker.submit(Job(ids, p, SinkCache(4, 24, config=model.config))) for ids, p in zip(prompts, params)]
        for job, ref in zip(jobs, alone):
            tokens, reason = _drain(job)
            assert tokens == ref
            assert reason == ("length" if len(ref) == job.params.max_new_tokens else "stop")
            assert job.row.last_unfed == (reason == "length")  # an EOS is never fed; the last of a full answer isn't
            assert job.cache.batch_size == 1 and job.cache.tokens_seen == len(job.ids) + len(ref) - job.row.last_unfed
    finally:
        worker.stop()


@torch.no_grad()
def test_a_failing_row_fails_alone():
    """A row whose logits cannot be sampled (NaN) ends its own job with an error; the rows decoded beside it
    go on and get what they would alone; the worker serves the next job."""
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    prompts = [random_ids(n, seed=i)[0].tolist() for i, n in enumerate([9, 40, 17])]
    params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3)
    alone = []
    for ids in prompts:
        engine = Engine(model, tok, n_sink=4, window=24, prefill_chunk=8)
        alone.append([t.id for t in engine.generate(ids, params) if t.id >= 0])
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        jobs = [Job(ids, params, SinkCache(4, 24, config=model.config)) for ids in prompts]
        jobs[1].logit_bias = {5: 1.0}
        for job in jobs:
            worker.submit(job)
        jobs[1].row.bias[7] = float("nan")  # this row's numerics break after its first sampled token at the latest
        event = _events_until_end(jobs[1])
        assert isinstance(event, ErrorEvent) and "NaN" in event.message
        for job, ref in zip((jobs[0], jobs[2]), (alone[0], alone[2])):
            assert _drain(job)[0] == ref
        again = worker.submit(Job(prompts[0], params, SinkCache(4, 24, config=model.config)))
        assert _drain(again)[0] == alone[0]
    finally:
        worker.stop()


def _events_until_end(job):
    while True:
        event = job.events.get(timeout=60)
        if not isinstance(event, TokenEvent):
            return event
