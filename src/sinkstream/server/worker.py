"""The model's one thread: prefills new requests and decodes all live ones together.

Continuous batching. A request (``Job``) brings its own single-row ``SinkCache`` (a session's, or a
fresh one) and the token ids to feed. The worker prefills it in chunks, one chunk per loop turn so
live answers keep flowing, then the job joins the decode batch: its row is stacked onto the batch
cache (one copy when it joins). Each decode step samples every row with its own parameters and
generator, then feeds all rows' tokens in one forward (per-row positions and mask). A finished row
leaves as its own cache again (``SinkCache.extract``), which the caller persists.

Events go back to the caller through the job's ``events`` (anything with a thread-safe ``put``; a
``queue.Queue`` by default): ``TokenEvent``s, then a ``DoneEvent`` or an ``ErrorEvent`` (``events.py``).
A job whose ``cancel`` is set (client gone) ends with ``DoneEvent("cancelled")`` and its cache must be
treated as unusable.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..cache import SinkCache
from ..decoding import RowState, eos_ids
from ..engine import forward_stream
from ..fused import select_decoder
from ..grammar import Constraint
from ..sampling import SamplingParams
from .events import DoneEvent, ErrorEvent, TokenEvent, WorkerEvent


@dataclass
class Job:
    ids: list[int]
    params: SamplingParams
    cache: SinkCache
    events: queue.Queue[WorkerEvent] = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    top_logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k likeliest
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (-100 bans a token)
    constraint: Constraint | None = None  # the grammar the answer follows (structured output, forced tool calls)
    # filled in by the worker
    fed: int = 0  # prompt tokens fed so far
    row: RowState | None = None  # the answer being decoded (sampling state, text, ids)
    logits: torch.Tensor | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.row.generated

    @property
    def text(self) -> str:  # the answer text (cut before a stop string)
        return self.row.text

    @property
    def stop_hit(self) -> bool:
        return self.row.stop_hit

    @property
    def last_unfed(self) -> bool:  # the last sampled token was not fed to the model
        return self.row.last_unfed


class Worker:
    def __init__(
        self, model, tokenizer, *, prefill_chunk: int, max_batch: int = 16, metrics=None, decode: str = "auto"
    ):
        self.model, self.tokenizer = model, tokenizer
        self.fused = select_decoder(model, decode)  # one-token steps (batched decode, 1-token chunks)
        self.device = next(model.parameters()).device
        self.prefill_chunk, self.max_batch = prefill_chunk, max_batch
        self.eos_ids = eos_ids(model, tokenizer)
        self.metrics = metrics
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.prefilling: list[Job] = []
        self.batch: list[Job] = []
        self.batch_cache: SinkCache | None = None
        self.thread = threading.Thread(target=self._run, name="sinkstream-worker", daemon=True)
        self.running = False

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        if not job.ids:
            raise ValueError("nothing to feed")
        vocab = self.model.config.get_text_config().vocab_size  # logit_bias ids checked by the caller
        job.row = RowState.start(
            self.tokenizer, job.params, self.eos_ids, self.device, job.logit_bias, vocab, prompt_ids=job.ids,
            constraint=job.constraint,
        )  # fmt: skip
        self.inbox.put(job)
        return job

    @property
    def load(self) -> int:
        return len(self.prefilling) + len(self.batch)

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self) -> None:
        while self.running:
            self._take_new(block=not (self.prefilling or self.batch))
            try:
                self._prefill_turn()
                self._decode_turn()
            except Exception as e:
                self._fail_all(f"the server's worker failed: {type(e).__name__}: {e}")

    def _take_new(self, block: bool) -> None:
        while True:
            try:
                job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if job is None:
                return
            self.prefilling.append(job)
            block = False

    def _prefill_turn(self) -> None:
        """One chunk for every job still prefilling; a job whose prompt is all fed joins the batch.
        A job that fails here fails alone (its cache is its own until it joins)."""
        for job in list(self.prefilling):
            if job.cancel.is_set():
                self.prefilling.remove(job)
                job.events.put(DoneEvent("cancelled"))
                continue
            try:
                self._prefill_chunk(job)
                if job.fed >= len(job.ids) and len(self.batch) < self.max_batch:
                    self.prefilling.remove(job)
                    self._join(job)
            except Exception as e:
                if job in self.prefilling:
                    self.prefilling.remove(job)
                job.events.put(ErrorEvent(f"{type(e).__name__}: {e}"))

    def _prefill_chunk(self, job: Job) -> None:
        if job.fed < len(job.ids):
            chunk = job.ids[job.fed : job.fed + self.prefill_chunk]
            x = torch.tensor([chunk], device=self.device)
            t0 = time.perf_counter()
            job.logits = forward_stream(self.model, job.cache, x, fused=self.fused)[0]
            job.fed += len(chunk)
            if self.metrics:
                self.metrics.prefilled(len(chunk), time.perf_counter() - t0)

    def _join(self, job: Job) -> None:
        self.batch_cache = job.cache if self.batch_cache is None else SinkCache.stack([self.batch_cache, job.cache])
        job.cache = None  # its row lives in the batch cache until it leaves
        self.batch.append(job)

    def _decode_turn(self) -> None:
        """Sample every row with its own parameters, then feed all rows' tokens in one forward.
        A row whose sampling fails (its logits, its parameters) leaves alone; a failed forward is the
        model's and ends every row of the batch."""
        if not self.batch:
            return
        logits = torch.cat([job.logits for job in self.batch])
        next_ids, keep = [], []
        for b, job in enumerate(self.batch):
            if job.cancel.is_set():
                job.events.put(DoneEvent("cancelled"))
                continue
            try:
                tid = self._sample_row(job, b, logits)
            except Exception as e:
                job.events.put(ErrorEvent(f"{type(e).__name__}: {e}"))
                continue
            if tid is not None:
                keep.append(b)
                next_ids.append(tid)
        self._leave(keep)
        if not self.batch:
            return
        if self.metrics:
            self.metrics.batch(len(self.batch))
        try:
            logits = self._step(next_ids)
        except Exception as e:
            self._fail_all(f"the model step failed: {type(e).__name__}: {e}")
            return
        for b, job in enumerate(self.batch):
            job.logits = logits[b : b + 1]
            job.row.fed()

    def _step(self, next_ids: list[int]) -> torch.Tensor:
        """Feed one token per batch row; the next logits [B, V]."""
        x = torch.tensor(next_ids, device=self.device)[:, None]
        t0 = time.perf_counter()
        logits = forward_stream(self.model, self.batch_cache, x, rows_differ=len(self.batch) > 1, fused=self.fused)[0]
        if self.metrics:
            self.metrics.stepped(len(next_ids), time.perf_counter() - t0)
        return logits

    def _sample_row(self, job: Job, b: int, logits: torch.Tensor) -> int | None:
        """Sample row ``b`` and emit its token; returns the token to feed, or None if the row finished."""
        tid = job.row.sample(logits[b : b + 1])
        if job.t_first is None:
            job.t_first = time.perf_counter()
            if self.metrics:
                self.metrics.first_token(job.t_first - job.t_submit)
        text = job.row.accept(tid)
        if text is not None:
            lp = _logprobs(logits[b], tid, job.top_logprobs) if job.top_logprobs is not None else None
            job.events.put(TokenEvent(tid, text, lp))  # text may be "" (special token, partial character)
            if self.metrics:
                self.metrics.generated(1)
        if job.row.done:
            self._finish(job, b, job.row.finish_reason)
            return None
        return tid

    def _fail_all(self, message: str) -> None:
        """End every job in flight with ``message`` and start over with an empty batch."""
        for job in self.prefilling + self.batch:
            job.events.put(ErrorEvent(message))
        self.prefilling, self.batch, self.batch_cache = [], [], None

    def _finish(self, job: Job, row: int, reason: str) -> None:
        tail = job.row.flush()
        if tail:
            job.events.put(TokenEvent(-1, tail))
        job.cache = self.batch_cache.extract([row])
        job.events.put(DoneEvent(reason))

    def _leave(self, keep: list[int]) -> None:
        """Rows not in ``keep`` leave the batch (their jobs already have their own caches)."""
        if len(keep) == len(self.batch):
            return
        self.batch = [self.batch[b] for b in keep]
        if not keep:
            self.batch_cache = None
        else:
            self.batch_cache.select_rows(keep)


def _logprobs(logits: torch.Tensor, tid: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``tid`` under ``logits`` [V] (before temperature, as OpenAI reports it),
    and the ``k`` likeliest tokens with theirs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    return float(lp[tid]), ([] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)])
