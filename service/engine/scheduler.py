"""The engine: one thread that owns the model, batches queued requests across adapters and runs them.

Requests of any adapters and decoding parameters share a batch. Generation runs the left-padded prompts
through the model and then one decoding step per token over a preallocated KV cache (a CUDA graph per
batch-size bucket on the GPU); rows that finish or are abandoned leave the batch, so they stop costing
compute, and queued requests join it between steps, their prompts run a chunk per pause (``prefill_chunk``)
so that a long prompt does not hold the running rows for many steps. Prompts run past the longest prefix whose keys
and values the prefix cache holds for their weights; a prefix that several prompts taken together share, and that the
cache lacks, runs once in a pass of its own before theirs. A generation with a listener gets each token
(and, if it asks, its log-probabilities) as soon as the step that picked it ends. Scoring (NLI) is one pass over the
prompts. Adapter activation, merge and unmerge happen on this thread between steps, so no row ever runs
with weights other than its own adapter's.
"""
from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from operator import attrgetter

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import metrics
from service.engine.attention import use_packed_gqa_attention
from service.engine.decode_step import DecodeStep
from service.engine.endings import Endings
from service.engine.joining import Joining
from service.engine.merge_policy import MergePolicy
from service.engine.mlp import use_in_place_mlp
from service.engine.prefill import Prefill
from service.engine.prefix_cache import PrefixCache, weights_key
from service.engine.requests import Generation, RequestFuture, SampledToken, Scoring
from service.engine.row_mapping import map_rows, point
from service.engine.running_batch import RunningBatch
from service.errors import (
    EngineFailed,
    EngineStopped,
    NonFiniteLogits,
    QueueFull,
    QueueTimeout,
    RequestAbandoned,
    UnknownAdapter,
)
from service.lora.adapter_files import BASE_LABEL, AdapterWeights
from service.lora.registry import AdapterRegistry
from service.model.step_memory import prefill_budget
from service.settings import (
    CPU_BATCH_WINDOW_MS,
    CPU_DRAFT_TOKENS,
    CPU_PREFILL_CHUNK,
    GPU_BATCH_WINDOW_MS,
    Settings,
)

log = logging.getLogger(__name__)
REST_AFTER_S = 0.5  # seconds without work before the engine gives the last batches' memory back (Engine._rest)
SHUTTING_DOWN = "the service is shutting down"  # what a request refused as it does is told first (Engine._refusal)
STOP_WAIT_S = 10.0  # the most a stop waits for the engine thread to finish what is queued and end (Engine.stop)


@dataclass(eq=False)
class _Together:
    """The requests one ``Engine.submit_together`` call queued: the parts of one client request (a long context's
    windows, a completion's choices, a label set's scoring requests). Once a part is taken into a batch the request is
    being served (``begun``): its other parts, still queued, no longer wait for capacity, so none of them expires
    (``Engine._expire_waiting``: a request refused then would throw away the work done on its first parts), nor fails
    for its adapter's name unregistered meanwhile (``Engine._unregistered``): one answer is never failed halfway."""
    begun: bool = False


@dataclass
class _Pending:
    work: Generation | Scoring
    future: RequestFuture
    enqueued: float = field(default_factory=time.perf_counter)
    # when its wait for capacity began (max_queue_wait): its queueing, moved on by the batch windows it waited out
    waits_from: float = field(default_factory=time.perf_counter)
    together: _Together = field(default_factory=_Together)
    adapter: AdapterWeights | None = None  # the weights it runs with, bound when it was queued (Engine.bound)
    on_token: Callable[[SampledToken], None] | None = None  # a generation's listener (see Engine.submit)
    # the queue's order (Engine.submit_together): when it is due on the engine's virtual clock, and whether it is a
    # request's later part (which goes after the requests queued when it came due)
    due: tuple[Fraction, bool] = (Fraction(0), False)

    @property
    def cost(self) -> int:
        """What it takes of the engine, in tokens, as the virtual clock counts it: its prompt's, plus the tokens a
        generation may generate (its budget: decoding steps cost too, and a chat's short prompt is no short request)."""
        generated = self.work.decoding.max_new_tokens if isinstance(self.work, Generation) else 0
        return len(self.work.prompt_ids) + generated


class Engine:
    """Queue, scheduler and batched forward passes over one base model with per-row adapters."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, registry: AdapterRegistry,
                 settings: Settings):
        self.model, self.tokenizer, self.registry, self.settings = model, tokenizer, registry, settings
        self.device = registry.device
        self.pad_id = tokenizer.pad_token_id
        self.endings = Endings(model, tokenizer)
        use_packed_gqa_attention(model)
        use_in_place_mlp(model)
        cpu = self.device.type == "cpu"  # unset, these take the device's defaults (service.settings)
        self.prefill_chunk = settings.prefill_chunk if settings.prefill_chunk is not None else (
            CPU_PREFILL_CHUNK if cpu else 0)
        self.prefill_tokens = prefill_budget(settings, self.device)
        self.batch_window_ms = settings.batch_window_ms if settings.batch_window_ms is not None else (
            CPU_BATCH_WINDOW_MS if cpu else GPU_BATCH_WINDOW_MS)
        self.draft_tokens = settings.draft_tokens if settings.draft_tokens is not None else (
            CPU_DRAFT_TOKENS if cpu else 0)
        self.decoder = DecodeStep(model, registry.layers, settings.cuda_graphs, settings.max_batch)
        self.prefix_cache = PrefixCache(settings.prefix_block_tokens, settings.prefix_cache_bytes)
        self._queue: deque[_Pending] = deque()  # in order of ``due``, then of submission
        self._clock = Fraction(0)  # virtual time: each pass's tokens over the requests then queued (submit_together)
        self._controls: deque[tuple[callable, Future]] = deque()
        self._purges: deque[int] = deque()  # serials of weights whose prefix cache blocks are to go (purge_prefixes)
        self._wakeup = threading.Condition()
        self._accepting = False
        self._draining = False  # the service shuts down (drain)
        self._filling = False  # the engine thread, idle, waits out the batch window (_next_batch)
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the engine thread died, if it did (see _supervised)
        self.merge_policy = MergePolicy(settings.merge_after, settings.merge_cooldown,
                                        enabled=settings.auto_merge and not registry.quantized)
        self._taken: list[_Pending] = []  # every request the batch being served took from the queue
        self._rest_due = False  # the last batch's memory is held until the engine rests (_rest)
        self._non_finite = False  # a row of the batch being served had non-finite logits

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._supervised, name="loraswap-engine", daemon=True)
        self._thread.start()
        if self.settings.max_queue_wait:
            threading.Thread(target=self._time_queue, name="loraswap-queue-timer", daemon=True).start()

    def stop(self, timeout: float = STOP_WAIT_S) -> bool:
        """Refuse new work, finish everything queued, then stop the thread, waiting at most ``timeout`` seconds for it
        to end: whether it ended. Where it did not, an error line says so, and the thread (a daemon) is left to run:
        a lock it waits for may never be released (one a KeyboardInterrupt left held: an unbounded wait here hung
        the command's stop for ever)."""
        deadline = time.monotonic() + timeout
        self._accepting = False
        self._wake_all(timeout)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is None or not self._thread.is_alive():
            return True
        log.error("the engine thread did not end within %g s of the stop (%d requests queued): left running",
                  timeout, len(self._queue))
        return False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def requests_by_adapter(self) -> tuple[Counter[str | None], Counter[str | None]]:
        """The requests running (taken by the batch being served, not done) and those waiting (queued) now, by the
        adapter name they asked for (None: the bare base). Any thread; a request in the hand-over from queue to batch
        may be in neither."""
        taken = list(self._taken)  # one copy, made atomically: the engine thread may extend the list meanwhile
        with self._wakeup:
            waiting = Counter(pending.work.adapter for pending in self._queue)
        return Counter(pending.work.adapter for pending in taken if not pending.future.done()), waiting

    # ---- submission (any thread) -------------------------------------------------------------
    def submit(self, work: Generation | Scoring, on_token: Callable[[SampledToken], None] | None = None
               ) -> RequestFuture:
        """Queue one request; its future resolves to a GenerationResult or a list of probabilities.

        ``on_token`` (generations only) is called on the engine thread with each token as the decoding step that
        picked it ends, before the future resolves; it must return at once and should not raise (if it does, the
        error is logged and the request abandoned). The engine then leaves the time to first token to the listener's
        side to record (the streaming layer records it as its client sees it). Raises QueueFull when ``max_queue``
        requests wait, EngineFailed once the engine thread died, EngineStopped while it drains or after it stopped."""
        return self.submit_together([work], [on_token])[0]

    def submit_together(self, works: list[Generation | Scoring],
                        on_tokens: list[Callable[[SampledToken], None] | None] | None = None) -> list[RequestFuture]:
        """Queue ``works`` (with their listeners, see ``submit``) all or none, as the parts of one request, each bound
        to its weights now (``bound``): once one is taken, the others are not refused for their wait
        (``max_queue_wait``) nor for their adapter unregistered meanwhile (``_Together``). Raises QueueFull unless all
        fit in the queue, UnknownAdapter for a name not registered, and as ``submit`` otherwise.

        Queued requests are taken in order of their due time on a virtual clock, as in fair queuing (Demers, Keshav
        and Shenker, SIGCOMM 1989): each pass taken moves it on by its requests' cost (``_Pending.cost``: prompt
        tokens, plus the budget of tokens a generation may generate) over the number of client requests then queued,
        the share each would have had of that work. A request's first part is due now, each other part once its
        earlier parts' cost has passed on that clock, after the requests queued by then; a batch with room for more
        takes parts of several requests, each's in order. A request queued behind other clients' many parts (long
        contexts' windows) is thus taken before those not yet due, where FCFS over parts had it wait for every window,
        and refused it past ``max_queue_wait`` (docs/results/queue_wait_windows); the parts still come due as the
        clock runs, whatever else arrives: a request of many parts gets an equal share of the engine beside the
        others queued, so it takes longer than alone, the longer the more requests wait."""
        enqueued, together = time.perf_counter(), _Together()
        pendings = [_Pending(work, RequestFuture(), enqueued, enqueued, together=together, adapter=self.bound(work),
                             on_token=listener) for work, listener in zip(works, on_tokens or [None] * len(works))]
        with self._wakeup:
            self._refuse_unless_accepting()
            if len(self._queue) + len(pendings) > self.settings.max_queue:
                raise self._refusal(QueueFull, f"the queue is full ({len(self._queue)} requests queued, "
                                               f"{len(pendings)} more asked, {self.settings.max_queue} at most)")
            clock = self._clock
            for part, pending in enumerate(pendings):
                pending.due, clock = (clock, part > 0), clock + pending.cost
                self._queue.insert(bisect.bisect_right(self._queue, pending.due, key=attrgetter("due")), pending)
            self._wakeup.notify_all()
        return [pending.future for pending in pendings]

    def bound(self, work: Generation | Scoring) -> AdapterWeights | None:
        """The weights ``work`` runs with: ``work.weights``, bound by its caller (``Tasks``: when its request arrived,
        with the chat template its prompt was rendered with), else those its adapter's name holds now (None for the
        bare base). Raises UnknownAdapter for a name not registered, ValueError for weights of another name."""
        if work.weights is None:
            return self.registry.lookup(work.adapter)
        if work.weights.name != work.adapter:
            raise ValueError(f"the weights of {work.weights.name!r} were bound to a request for {work.adapter!r}")
        return work.weights

    def abandon(self, future: RequestFuture) -> None:
        """Withdraw a request whose caller went away: a queued one leaves the queue at once, a running one leaves
        its batch before the next decoding step (its future then fails with RequestAbandoned); either way it stops
        costing compute. A finished request is left as it is."""
        with self._wakeup:
            future.abandoned = True
            if future.cancel():
                self._queue = deque(pending for pending in self._queue if pending.future is not future)

    def end(self, future: RequestFuture) -> None:
        """Finish a generation early, as if it had met a stop (its caller saw a stop string in its text): a running
        one leaves its batch before the next decoding step after this call, its future resolving to the tokens
        generated until then with finish reason "stop" (a step or two past the one its caller saw, as the engine
        does not wait for the caller). A queued one is withdrawn as by ``abandon``; a finished one is left as it is."""
        with self._wakeup:
            future.ended = True
            if future.cancel():
                self._queue = deque(pending for pending in self._queue if pending.future is not future)

    def call(self, fn) -> Future:
        """Run ``fn()`` on the engine thread between batches (merge, unmerge)."""
        future: Future = Future()
        with self._wakeup:
            self._refuse_unless_accepting()
            self._controls.append((fn, future))
            self._wakeup.notify_all()
        return future

    def purge_prefixes(self, adapter: AdapterWeights) -> None:
        """Have the engine thread drop the prefix cache's blocks of ``adapter``'s weights once they are unregistered
        (``PrefixCache.purge``), at its next pause between two decoding steps or two batches. Does not wait for it,
        nor hold up the requests waiting to join the running batch, as an admin call (``call``) does: a review found
        every replace and delete kept all requests waiting until the running rows were done. Rows bound to those
        weights may still store blocks of them, which then age out."""
        self._purges.append(adapter.serial)

    def drain(self) -> None:
        """The service shuts down: the requests queued are served as ever, but one refused for the queue (full, or its
        wait past ``max_queue_wait``) is refused as by a server going away (``_refusal``); a batch window ends at once
        (no request comes to fill it: a review saw a 20 s window hold the exit 18 s past SIGTERM). Any thread."""
        self._draining = True
        self._wake_all(STOP_WAIT_S)

    def _wake_all(self, timeout: float) -> None:
        """Wake every thread waiting on the engine's condition (its thread, the queue's timer), waiting at most
        ``timeout`` seconds for its lock: one a KeyboardInterrupt left held is never released (an unbounded wait in
        ``stop`` hung the command's stop for ever)."""
        if self._wakeup.acquire(timeout=timeout):
            self._wakeup.notify_all()
            self._wakeup.release()

    def _refusal(self, kind: type[QueueFull], reason: str, settings: tuple[str, ...] = ()) -> Exception:
        """The refusal of a request for the queue, ``reason`` (in words; naming ``settings``): ``kind``, a 429 (the
        server is past capacity; retry later), or once the engine drains (``drain``) EngineStopped, a 503 without
        Retry-After saying the service is shutting down: a client told to retry later retried this server, which is
        going away (a review: SIGTERM with 7 requests in flight, the queued ones a 429 past ``max_queue_wait``)."""
        if self._draining:
            return EngineStopped(f"{SHUTTING_DOWN}: {reason}, and it will not be served here", settings=settings)
        return kind(f"{reason}: the server is past capacity; retry later", settings=settings)

    def _refuse_unless_accepting(self) -> None:
        """Raise EngineFailed or EngineStopped unless new work is taken (called holding ``_wakeup``)."""
        if self.failure is not None:
            raise EngineFailed(f"the engine failed: {self.failure}")
        if not self._accepting:
            raise EngineStopped("the engine is not accepting requests")

    # ---- the engine thread -------------------------------------------------------------------
    def _supervised(self) -> None:
        """The engine thread: the loop, and should it ever die, a failure every waiting caller hears of at once."""
        try:
            self._loop()
        except BaseException as exc:
            log.exception("the engine thread died")  # logged here, not raised on: the thread ends either way
            self._fail(f"{type(exc).__name__}: {exc}")
        with self._wakeup:
            self._wakeup.notify_all()  # the queue's timer, if any, ends with it (_time_queue)

    def _fail(self, reason: str) -> None:
        """Record why the engine died, refuse new work, and fail every queued, running and control request."""
        error = EngineFailed(f"the engine failed: {reason}")
        with self._wakeup:  # abandon() cancels queued futures under this lock: none can change state meanwhile
            self.failure, self._accepting = reason, False
            waiting = [pending.future for pending in [*self._queue, *self._taken]] + [f for _, f in self._controls]
            self._queue.clear()
            self._controls.clear()
            for future in waiting:
                if not future.done():
                    future.set_exception(error)

    @torch.inference_mode()  # everything on this thread: tensors it creates are updated only here
    def _loop(self) -> None:
        while True:
            self._taken = self._next_batch() or []  # from here on, _fail finds them should the loop die
            self._run_controls()
            self._purge_prefixes()
            if not self._taken:
                if not self._accepting and not self._queue:
                    return
                continue
            try:
                self._serve(list(self._taken))
            except Exception as exc:  # a failed batch fails its requests (joiners too), never the engine
                for pending in self._taken:
                    if not pending.future.done():
                        pending.future.set_exception(exc)

    def _purge_prefixes(self) -> None:
        """Drop the prefix cache blocks of the weights ``purge_prefixes`` was called for since the last time."""
        while self._purges:
            self.prefix_cache.purge(self._purges.popleft())

    def _run_controls(self) -> None:
        while self._controls:
            fn, future = self._controls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:  # its caller hears of any failure; one that is no Exception ends the loop
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for work, give the batch a short window to fill, then take requests of one kind."""
        settings = self.settings
        with self._wakeup:
            while not self._queue and not self._controls and self._accepting:
                if not self._rest_due:
                    self._wakeup.wait()
                elif not self._wakeup.wait(REST_AFTER_S):  # no work for that long: the engine rests
                    self._rest()
            self._expire_waiting()  # before the window: the window to fill a batch is not time spent waiting for one
            if not self._queue:
                return None
            started = time.perf_counter()
            deadline = started + self.batch_window_ms / 1000
            self._filling = True
            while (len(self._queue) < settings.max_batch and self._accepting and not self._controls
                   and not self._draining):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.wait(left)
            self._filling = False
            self._wakeup.notify_all()  # the queue's timer goes on once this lock is let go (_time_queue)
            if not self._queue:  # every request queued was withdrawn (its client went away) during the window
                return None
            taken = self._take(type(self._queue[0].work), self.settings.max_batch, set())
            filled = time.perf_counter()
            for pending in self._queue:  # left out of the batch: the window was no wait for capacity
                pending.waits_from += filled - max(started, pending.waits_from)
            return taken

    def _time_queue(self) -> None:
        """The queue's timer, a thread of its own while ``max_queue_wait`` bounds waits: refuses each queued request
        as its wait runs out (``_expire_waiting``), whatever the engine thread is doing meanwhile. Checked only as the
        engine thread took requests, a request waited out a whole prefill pass, adapter load or admin call first: 16 s
        for the 3 s of ``--max-queue-wait 3`` behind a long context's pass on the CPU (a review). It waits while the
        engine thread, idle, waits out the batch window: no request waits for capacity then (a review: with
        ``--batch-window-ms 3000 --max-queue-wait 1``, a lone request to an idle server was a 429 'past capacity').
        Ends once the engine accepts nothing more and its queue is empty."""
        bound = self.settings.max_queue_wait
        with self._wakeup:
            while self._accepting or self._queue:
                if self._filling:
                    self._wakeup.wait()
                    continue
                self._expire_waiting()
                waits = [pending.waits_from for pending in self._queue if not pending.together.begun]
                self._wakeup.wait(min(waits) + bound - time.perf_counter() if waits else None)

    def _expire_waiting(self) -> None:
        """Refuse (QueueTimeout) every queued request that has waited more than ``max_queue_wait`` seconds (0: none)
        and none of whose parts has been taken (``_Together``): past capacity, a request refused in bounded time can
        be sent elsewhere or later, where one left in the queue would be answered after its client gave up. Called
        holding ``_wakeup``, by the queue's timer as a wait runs out (``_time_queue``) and whenever requests are
        taken."""
        bound = self.settings.max_queue_wait
        oldest = time.perf_counter() - bound
        expired = [pending for pending in self._queue
                   if pending.waits_from < oldest and not pending.together.begun] if bound else []
        if not expired:
            return
        gone = set(map(id, expired))
        self._queue = deque(pending for pending in self._queue if id(pending) not in gone)
        error = self._refusal(QueueTimeout, f"the request waited {bound:g} s in the queue without joining a batch "
                                            "(the server's max_queue_wait)", ("max_queue_wait",))
        for pending in expired:
            pending.future.set_exception(error)  # dropped by one its caller cancelled meanwhile (RequestFuture)

    def _take(self, kind: type, room: int, adapters: set[AdapterWeights], loads: float = math.inf) -> list[_Pending]:
        """Up to ``room`` queued requests of one kind, first due first (``submit_together``), so that the adapters in
        use (``adapters`` plus theirs) fit the device slots, and at most ``loads`` adapters not resident yet. Each
        runs with the weights it was bound to when queued, even if its name was given others since (loaded in place);
        one whose name is no longer registered fails (UnknownAdapter), unless its request has begun (``_Together``).
        Their prompts, left-padded to the longest (``Prefill``), hold at most ``prefill_tokens`` tokens in all (rows x
        the longest prompt), unless one alone holds more: one prefill pass's activations and compute are bounded
        whatever the burst (the keys and values of the cached prefixes it starts from come on top). Called holding
        ``_wakeup``."""
        batch, out, longest, budget = [], set(), 0, self.prefill_tokens
        for pending in self._queue:  # the queue changes only at the end: should anything raise, no request is lost
            padded = (len(batch) + 1) * max(longest, len(pending.work.prompt_ids))
            full = batch and type(pending.work) is kind and padded > budget
            if len(batch) == room or full:
                break  # the batch or the pass is full: the rest wait for the next
            if pending.future.done():  # cancelled by its caller's asyncio task, not yet withdrawn (abandon): drop it
                out.add(id(pending))
                continue
            if self._unregistered(pending):
                pending.future.set_exception(UnknownAdapter(f"adapter {pending.work.adapter!r} was unloaded after the "
                                                            "request arrived, before it ran"))
                out.add(id(pending))
                continue
            adapter = pending.adapter
            known = adapter is None or adapter in adapters
            fits = known or len(adapters) < self.registry.max_resident
            loading = not known and loads < math.inf and not self.registry.is_resident(adapter)  # asked if bounded
            if type(pending.work) is kind and fits and loads >= loading:
                pending.together.begun = True
                batch.append(pending)
                out.add(id(pending))
                longest = max(longest, len(pending.work.prompt_ids))
                adapters.update([adapter] if adapter is not None else [])
                loads -= loading
        if batch:  # every queued request's share of this pass's cost (submit_together), exactly: ties stay ties
            self._clock += Fraction(sum(pending.cost for pending in batch),
                                    len({id(pending.together) for pending in self._queue}))
        self._queue = deque(pending for pending in self._queue if id(pending) not in out)
        return batch

    def _serve(self, batch: list[_Pending]) -> None:
        """Run a batch taken from the queue; generations go on, with requests joining, until every row is done."""
        batch = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self._apply_merge_policy({pending.adapter for pending in batch})
        running = RunningBatch(self.decoder, self.draft_tokens)
        try:
            self._run(running, self._joining(batch, running))
        except BaseException:
            self._rest()
            raise
        if self._non_finite:  # NaN keys or values may lie in the KV cache's rows: never kept for a later batch
            self._rest()
        else:
            self._rest_due = True

    def _rest(self) -> None:
        """Give the memory of the last batches back (``DecodeStep.idle``): when the engine has had no work for
        ``REST_AFTER_S``, or at once after a batch that failed or held non-finite logits. Back-to-back batches keep
        it: handed back after each, it was faulted in again by the next, 11-14 ms a request on the CPU at one client
        (docs/benchmarks.md, "CPU against llama.cpp now")."""
        self.decoder.idle()
        self._rest_due = self._non_finite = False

    def _run(self, running: RunningBatch, joining: Joining | None) -> None:
        """Decoding steps of the running rows, requests joining between them, until every row is done."""
        while True:
            joining = self._between_steps(running, joining)
            if not len(running):  # every row is done (or failed) and nothing is joining
                return
            if self._dropped_non_finite(running):
                continue
            picked, finished = running.sample(self.endings.is_stop)
            running.publish(picked, dict(finished), self.endings.ends_text)
            for row, reason in finished:
                self._finish(running.pendings[row], running.tokens[row], reason, running.first_token_at[row])
            done = {row for row, _ in finished} | self._withdrawn_rows(running)
            if done:
                kept = [row for row in range(len(running)) if row not in done]
                self._keep(running, kept)
                picked = [picked[row] for row in kept]
            if len(running):
                running.forward([tokens[-1] for tokens in picked])

    def _dropped_non_finite(self, running: RunningBatch) -> bool:
        """Fail (NonFiniteLogits) and drop the rows whose logits after their last token hold NaN or an infinity, before
        any token is sampled from them; whether there were any. The other rows go on as they were (a draft token's
        non-finite logits end its row's run of tokens in ``RunningBatch.sample``, and come again after that token
        at the next step if they are the row's own)."""
        finite = torch.isfinite(running.logits[:, 0]).all(-1).tolist()
        if all(finite):
            return False
        self._non_finite = True
        for row, ok in enumerate(finite):
            if not ok and not running.pendings[row].future.done():
                running.pendings[row].future.set_exception(NonFiniteLogits(running.pendings[row].work.adapter))
        self._keep(running, [row for row, ok in enumerate(finite) if ok])
        return True

    def _keep(self, running: RunningBatch, kept: list[int]) -> None:
        """Keep only the rows ``kept`` of ``running`` (in this order) and point the row mapping at them; an engine
        with no rows left leaves the shared row mapping alone."""
        kept_rows = running.keep(kept)
        if kept:
            self._point_kept(running, kept_rows)

    def _withdrawn_rows(self, running: RunningBatch) -> set[int]:
        """Rows whose request was abandoned or ended (``end``) and is not done. Abandoned ones fail with
        RequestAbandoned (the tokens they generated are counted all the same: the work was done); ended ones finish
        with reason "stop"."""
        rows = {row for row, pending in enumerate(running.pendings)
                if (pending.future.abandoned or pending.future.ended) and not pending.future.done()}
        for row in rows:
            pending, tokens = running.pendings[row], running.tokens[row]
            if pending.future.abandoned:
                metrics.GENERATED_TOKENS.labels(adapter=pending.work.adapter or BASE_LABEL).inc(len(tokens))
                pending.future.set_exception(RequestAbandoned("the request was abandoned by its caller"))
            else:
                self._finish(pending, tokens, "stop", running.first_token_at[row])
        return rows

    def _apply_merge_policy(self, adapters: set[AdapterWeights | None]) -> None:
        """At every admission (a new batch, or requests joining a running one; ``adapters``: the weights every row
        then in play is bound to), between two decoding steps: merge or unmerge as the policy says. A running row
        goes on with the same weights either way, in the base or in its slot. Weights no longer registered (their
        name was unloaded while their rows ran) are never merged."""
        switch = self.merge_policy.admit(adapters, self.registry.merged_weights)
        if switch.unmerge:
            self.registry.unmerge()
        if switch.merge is not None and self.registry.holds(switch.merge):
            self.registry.merge_weights(switch.merge)

    def _joining(self, pendings: list[_Pending], running: RunningBatch) -> Joining:
        """Requests just taken from the queue to join ``running``, their prompts not yet run."""
        now = time.perf_counter()
        for pending in pendings:
            metrics.QUEUE_WAIT.observe(now - pending.enqueued)
        metrics.BATCH_SIZE.observe(len(pendings))
        return self._prompts_pass(pendings, running, shared_first=True)

    def _prompts_pass(self, pendings: list[_Pending], running: RunningBatch, shared_first: bool) -> Joining:
        """The prefill pass of ``pendings``' prompts (past their cached prefixes), generations' keys and values going
        into ``running``'s KV cache, scoring requests' kept by nothing but the prefix cache; with ``shared_first``, a
        pass of the prefixes several of them share and the prefix cache lacks comes first, if any, so those run once."""
        prompts = [pending.work.prompt_ids for pending in pendings]
        weights = [weights_key(pending.adapter, self.registry.merged_weights) for pending in pendings]
        shared = self.prefix_cache.shared(weights, prompts) if shared_first else []
        if not shared:
            generations = isinstance(pendings[0].work, Generation)
            return Joining(pendings, Prefill(self.model, prompts, self.pad_id, self.device, self.prefix_cache, weights,
                                             into=running if generations else None, keep_kv=generations))
        prefixes, keys = [prompts[row][:tokens] for row, tokens in shared], [weights[row] for row, _ in shared]
        prefill = Prefill(self.model, prefixes, self.pad_id, self.device, self.prefix_cache, keys)
        return Joining(pendings, prefill, [pendings[row] for row, _ in shared])

    def _between_steps(self, running: RunningBatch, joining: Joining | None) -> Joining | None:
        """Between two decoding steps: take waiting requests (NLI first) if none are joining, make their adapters
        resident, and run the joining prompts on by one chunk (to the end when no row is running) unless this
        pause loaded an adapter. Once through, NLI requests get their answer and generations join the running
        rows (after a pass of shared prefixes, their own prompts' pass comes next). Returns the requests still
        joining."""
        self._purge_prefixes()
        if joining is None and len(running):
            joining = self._admit(running)
        while joining is not None:
            filled = self._map_rows(running, joining, to_joiners=True)
            if filled and len(running):  # a pause that made an adapter resident does no more
                break
            chunk = self.prefill_chunk
            joining.prefill.advance(max(chunk, len(running)) if chunk and len(running) else 0)
            if joining.prefill.finished and joining.leaders:  # the shared prefixes ran: now the prompts' own pass
                joining = self._prompts_pass(joining.pendings, running, shared_first=False)
            elif joining.prefill.finished:
                joining.land(running, self.settings.max_new_tokens)
                joining = None
            if len(running):
                break
        if len(running):
            self._map_rows(running, joining, to_joiners=False)
        return joining

    def _admit(self, running: RunningBatch) -> Joining | None:
        """Queued requests that fit beside the running rows (room, device slots); the merge policy sees them and the
        running rows before they join. None while an admin call waits (the batch then ends, and the call runs) or
        while the request next in line (``_queue[0]``) waits for a device slot (until every row of some adapter is
        done): otherwise a steady stream for the resident adapters would keep every slot in use, and it waiting, for
        ever."""
        in_use = {pending.adapter for pending in running.pendings}
        with self._wakeup:
            self._expire_waiting()
            if self._controls or (self._queue and self._waits_for_a_slot(self._queue[0], in_use)):
                return None
        for kind in (Scoring, Generation):
            room = self.settings.max_batch - (len(running) if kind is Generation else 0)
            if room <= 0 or not self._queue:
                continue
            with self._wakeup:  # one adapter loaded per pause at most: a load stalls the running rows one step
                taken = self._take(kind, room, in_use - {None}, loads=1)
            taken = [pending for pending in taken if pending.future.set_running_or_notify_cancel()]
            self._taken += taken
            if taken:
                self._apply_merge_policy(in_use | {pending.adapter for pending in taken})
                return self._joining(taken, running)
        return None

    def _waits_for_a_slot(self, pending: _Pending, in_use: set[AdapterWeights | None]) -> bool:
        """Whether a queued request needs weights that are not in use while the running rows use every slot (one
        that fails once taken, ``_unregistered``, needs none)."""
        needs = pending.adapter not in in_use | {None} and not self._unregistered(pending)
        return needs and len(in_use - {None}) >= self.registry.max_resident

    def _unregistered(self, pending: _Pending) -> bool:
        """Whether a queued request's adapter name was unloaded since it was queued, its request not begun."""
        name = pending.work.adapter
        return name is not None and not pending.together.begun and not self.registry.registered(name)

    def _map_rows(self, running: RunningBatch, joining: Joining | None, to_joiners: bool) -> int:
        """Make the weights of the running and the joining rows resident and point the row mapping at the rows of the
        joining pass (to run it) or at the running rows (``row_mapping.map_rows``); how many adapters this loaded."""
        rows = running.pendings + (joining.pendings if joining is not None else [])
        pointed = slice(len(rows), None) if to_joiners else slice(0, len(running))
        rows += joining.rows if to_joiners else []
        return map_rows(self.registry, [row.adapter for row in rows], pointed, self.settings.max_batch)

    def _point_kept(self, running: RunningBatch, kept: torch.Tensor) -> None:
        """After rows left the batch (``kept`` [rows] indexes the old ones), point the mapping at those that stay;
        the rank in play drops to the largest among their adapters."""
        mapping, zero = self.registry.layers.mapping, self.registry.zero_slot
        slots = mapping.slots[kept].tolist() if mapping.slots is not None else [zero] * len(kept)
        point(self.registry, [row.adapter for row in running.pendings], slots, self.settings.max_batch)

    def _finish(self, pending: _Pending, tokens: list[int], reason: str, first_token_at: float) -> None:
        result = self.endings.result(pending.work, tokens, reason, first_token_at - pending.enqueued)
        label = pending.work.adapter or BASE_LABEL
        metrics.GENERATED_TOKENS.labels(adapter=label).inc(result.generated_tokens)
        if pending.on_token is None:  # a listened-to request's is recorded where its text is handed out
            metrics.TIME_TO_FIRST_TOKEN.labels(adapter=label).observe(result.time_to_first_token)
        pending.future.set_result(result)
