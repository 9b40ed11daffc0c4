"""The model's one thread: prefills new requests and decodes all live ones together.

It runs in a thread of its own (``start``), or in the caller's thread (``run``): ``sinkstream serve``
gives it the process's main thread and serves HTTP from another, because OpenMP (libgomp, which the
kernels' parallel loops run on) starts a parallel region several times faster from the main thread
than from any other, and a decode step is hundreds of small parallel regions.

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
from ..decoding import BatchStep, DecodeBatch, RowState, RowStep, eos_ids
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
    row: RowState | None = None  # the answer being decoded (sampling state, text, ids, how it ended)
    logits: torch.Tensor | None = None  # after the prompt: the first token's
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


class Worker:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        prefill_chunk: int | None = None,
        max_batch: int = 16,
        metrics=None,
        decode: str = "auto",
    ):
        self.model, self.tokenizer = model, tokenizer
        self.fused = select_decoder(model, decode)  # one-token steps (batched decode, 1-token chunks)
        self.device = next(model.parameters()).device
        self.prefill_chunk, self.max_batch = prefill_chunk, max_batch
        self.eos_ids = eos_ids(model, tokenizer)
        self.metrics = metrics
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.prefilling: list[Job] = []
        self.decoding = DecodeBatch()  # its owners are the jobs, in the batch cache's row order
        self.batch_cache: SinkCache | None = None
        self.thread = threading.Thread(target=self._run, name="sinkstream-worker", daemon=True)
        self.running, self.until = False, lambda: False

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a thread of its own."""
        self.running = True
        self.thread.start()

    def run(self, until=lambda: False) -> None:
        """Run the loop in the caller's thread until ``stop`` (or ``until()`` turns true)."""
        self.running, self.until = True, until
        self._run()

    @property
    def alive(self) -> bool:
        return self.running and (self.thread.is_alive() or self.thread.ident is None)

    def stop(self) -> None:
        self.running = False
        self.inbox.put(None)
        if self.thread.ident is not None:
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
    def batch(self) -> list[Job]:
        return self.decoding.owners

    @property
    def load(self) -> int:
        return len(self.prefilling) + len(self.batch)

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self) -> None:
        while self.running and not self.until():
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
            n = job.cache.prefill_chunk(self.prefill_chunk)  # half the row's window, unless configured
            chunk = job.ids[job.fed : job.fed + n]
            x = torch.tensor([chunk], device=self.device)
            t0 = time.perf_counter()
            job.logits = forward_stream(self.model, job.cache, x, fused=self.fused)[0]
            job.fed += len(chunk)
            if self.metrics:
                self.metrics.prefilled(len(chunk), time.perf_counter() - t0)

    def _join(self, job: Job) -> None:
        self.batch_cache = job.cache if self.batch_cache is None else SinkCache.stack([self.batch_cache, job.cache])
        job.cache = None  # its row lives in the batch cache until it leaves
        self.decoding.add(job.row, job.logits, owner=job)

    def _decode_turn(self) -> None:
        """One step of the decode loop (``DecodeBatch``): every row samples and takes its token with its
        own parameters, then the rows that go on are fed in one forward. A row whose sampling fails
        (its logits, its parameters) leaves alone; a failed forward is the model's and ends every row
        of the batch."""
        if not self.batch:
            return
        jobs, logits = list(self.batch), torch.cat(self.decoding.logits)
        step = self.decoding.step(isolate=True, cancelled=lambda job: job.cancel.is_set())
        for b, (job, outcome) in enumerate(zip(jobs, step.rows)):
            self._report(job, b, outcome, logits)
        self._leave(step)
        if not self.batch:
            return
        if self.metrics:
            self.metrics.batch(len(self.batch))
        try:
            logits = self._step(step.next_ids)
        except Exception as e:
            self._fail_all(f"the model step failed: {type(e).__name__}: {e}")
            return
        self.decoding.fed(logits)

    def _report(self, job: Job, b: int, outcome: RowStep, logits: torch.Tensor) -> None:
        """Send row ``b``'s outcome to its job: its token (with logprobs when asked), and when the answer
        ended its last text, its own cache and the reason; or its error, or that it was cancelled."""
        if outcome.cancelled:
            job.events.put(DoneEvent("cancelled"))
            return
        if outcome.error is not None:
            job.events.put(ErrorEvent(f"{type(outcome.error).__name__}: {outcome.error}"))
            return
        if job.t_first is None:
            job.t_first = time.perf_counter()
            if self.metrics:
                self.metrics.first_token(job.t_first - job.t_submit)
        if outcome.text is not None:
            lp = _logprobs(logits[b], outcome.token, job.top_logprobs) if job.top_logprobs is not None else None
            job.events.put(TokenEvent(outcome.token, outcome.text, lp))  # text may be "" (special token, partial char)
            if self.metrics:
                self.metrics.generated(1)
        if job.row.done:
            if outcome.tail:
                job.events.put(TokenEvent(-1, outcome.tail))
            job.cache = self.batch_cache.extract([b])
            job.events.put(DoneEvent(job.row.finish_reason))

    def _step(self, next_ids: list[int]) -> torch.Tensor:
        """Feed one token per batch row; the next logits [B, V]."""
        x = torch.tensor(next_ids, device=self.device)[:, None]
        t0 = time.perf_counter()
        logits = forward_stream(self.model, self.batch_cache, x, rows_differ=len(self.batch) > 1, fused=self.fused)[0]
        if self.metrics:
            self.metrics.stepped(len(next_ids), time.perf_counter() - t0)
        return logits

    def _fail_all(self, message: str) -> None:
        """End every job in flight with ``message`` and start over with an empty batch."""
        for job in self.prefilling + self.batch:
            job.events.put(ErrorEvent(message))
        self.prefilling, self.decoding, self.batch_cache = [], DecodeBatch(), None

    def _leave(self, step: BatchStep) -> None:
        """The rows that did not go on leave the batch cache (a finished row's job has its own copy)."""
        if not step.keep:
            self.batch_cache = None
        elif step.dropped:
            self.batch_cache.select_rows(step.keep)


def _logprobs(logits: torch.Tensor, tid: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``tid`` under ``logits`` [V] (before temperature, as OpenAI reports it),
    and the ``k`` likeliest tokens with theirs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    return float(lp[tid]), ([] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)])
