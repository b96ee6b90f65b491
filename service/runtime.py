"""The running service's parts, built once at start: base model, registry, engine and tasks."""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service import metrics
from service.engine.scheduler import Engine
from service.errors import AdapterError, AdapterMerged, NoRoomForAdapter, UnsafeEnvironment
from service.lora.adapter_files import adapter_folders, check_name
from service.lora.adapter_memory import AdapterRoom
from service.lora.registry import AdapterRegistry
from service.model.base_model import (
    base_config,
    config_positions,
    load_base,
    max_positions,
    names_the_base,
    pick_device,
    pick_dtype,
)
from service.model.cpu_threads import on_passing_thread
from service.model.device_room import adapter_room, check_allocations
from service.settings import MIN_PROMPT_TOKENS, Settings, worded
from service.tasks.tasks import Tasks
from service.tasks.template_sandbox import renderer

T = TypeVar("T")

log = logging.getLogger(__name__)
# what settings that cannot work raise at start: a base model folder or cache folder that is missing or cannot be
# made or read (OSError: FileNotFoundError, PermissionError), a token budget the model has no room for (check_room's
# ValueError), a size setting whose allocation cannot exist (check_allocations' ValueError), a model file
# transformers cannot read (OSError, ValueError), an environment that would crash oneDNN (UnsafeEnvironment)
EXPECTED_START_FAILURES = (OSError, ValueError, UnsafeEnvironment)
STOP_WAIT_SECONDS = 1.0  # how long a stop waits for a start still loading to reach its next step (``Runtime.stop``)


def check_room(settings: Settings, max_positions: int) -> None:
    """ValueError unless a prompt of at least ``MIN_PROMPT_TOKENS`` and ``settings.max_new_tokens`` generated tokens
    fit in the model's ``max_positions`` together (a server that could answer no request does not start), or when an
    ``answer_stride`` set is not below the longest prompt that then fits (every long /answer context would be a 413).
    The message names the settings by their fields (``Runtime``'s ``named`` names them as the user gave them)."""
    room = max_positions - settings.max_new_tokens
    if room < MIN_PROMPT_TOKENS:
        raise ValueError(f"max_new_tokens {settings.max_new_tokens} leaves {max(room, 0)} of the base model's "
                         f"{max_positions} positions for a prompt, fewer than {MIN_PROMPT_TOKENS}: lower it")
    longest = min(room, settings.max_input_tokens)
    if settings.answer_stride is not None and settings.answer_stride >= longest:
        raise ValueError(f"answer_stride {settings.answer_stride} is not below the {longest} tokens a prompt may have "
                         f"(max_new_tokens {settings.max_new_tokens} of {max_positions} positions): lower it")


def warn_of_short_prompts(settings: Settings, max_positions: int, named: Callable[[str], str] = str) -> None:
    """A warning, once at the start, when ``settings.max_new_tokens`` leaves prompts fewer of the model's
    ``max_positions`` than ``max_input_tokens`` (every longer prompt is a 413 naming a limit no setting gave), its
    settings ``named`` as the user gave them (``Runtime``'s ``named``)."""
    room = max_positions - settings.max_new_tokens
    if room < settings.max_input_tokens:
        log.warning(named(f"max_new_tokens {settings.max_new_tokens} leaves {room} of the base model's "
                          f"{max_positions} positions for a prompt: prompts are limited to {room} tokens, not "
                          f"max_input_tokens {settings.max_input_tokens}"))


def check_settings_fit(settings: Settings, replicas: int = 1, convert: bool = True) -> bool:
    """Whether the base model can run with ``settings``, found from its config before its weights load
    (``base_config``): ValueError where its positions leave no room for the token budget (``check_room``) or a size
    setting's allocation cannot exist (``device_room.check_allocations``: past 64 bits, or past the device's memory
    with the weights and the process, as many times as ``replicas`` of ``scale`` share it: 0 where none runs here, as
    for a cluster's replicas); FileNotFoundError, OSError or ValueError as ``base_config`` raises. Without
    ``convert``, nothing is checked where the embedded base is not converted yet (``base_config``): the start
    converts it, then checks. Returns whether the settings were checked."""
    config = base_config(settings, convert)
    if config is None:
        return False
    check_room(settings, config_positions(config))
    device = pick_device(settings.device)
    check_allocations(settings, config, pick_dtype(settings.dtype, device), device, replicas)
    return True


def adapters_room(settings: Settings, sharing: int = 1) -> AdapterRoom:
    """The memory a server of ``settings`` leaves its adapters (``device_room.adapter_room``, its device shared by
    ``sharing`` servers), measured now, before its weights load; raises as ``base_config`` does."""
    device = pick_device(settings.device)
    return adapter_room(settings, base_config(settings), pick_dtype(settings.dtype, device), device, sharing)


def log_start_failure(exc: Exception, failure: str) -> None:
    """Log why the start failed: for what settings that cannot work raise (``EXPECTED_START_FAILURES``) one error
    line naming the cause, ``failure``, with its traceback at DEBUG only; for any other exception, a fault of the
    service, the traceback at ERROR."""
    if isinstance(exc, EXPECTED_START_FAILURES):
        log.error("the service failed to start: %s", failure)
        log.debug("the start failure's traceback", exc_info=exc)
    else:
        log.exception("the service failed to start: %s", failure)


def log_start_cut() -> None:
    """Say, at INFO, that a stop (``Runtime.stop``) cut the start short: no failure."""
    log.info("the start was cut short: the service was stopped while it loaded")


class StartCut(Exception):
    """The runtime was stopped (``Runtime.stop``) while it started: the start ends, no start failure."""


class Runtime:
    """Owns the model-side objects; the HTTP layer reaches them only through this."""

    def __init__(self, settings: Settings, named: Callable[[str], str] = worded, checked: bool = False,
                 sharing: int = 1):
        """``named``: a text with each setting it names as the operator gave it (``loraswap serve``'s: ``--max-batch``
        or ``LORASWAP_MAX_BATCH``, not ``max_batch``), for the reason the start failed (its log line, /health's and
        /ready's reason), the start's warnings and every reply that names a setting (a review: a rank refused over
        HTTP said "(max_rank)"); by default each setting's variable (``worded``), as an operator sets the settings
        of a runtime no command starts. ``checked``: the settings were checked in this process before
        (``check_settings_fit``, as ``serve``'s command does before it takes its port): the start does not check them
        again (a review: the second check, the process grown by 14 MB since the first, refused the ``--max-batch``
        the first had advised, and the server stayed unready). ``sharing``: the servers that share its device's
        memory (``scale``'s replicas on one machine or one GPU), among which the adapters' room is split
        (``adapters_room``)."""
        self.settings = settings
        self.sharing = sharing
        self.checked = checked
        self.named = named
        self.registry: AdapterRegistry | None = None
        self.engine: Engine | None = None
        self.tasks: Tasks | None = None
        self.ready = threading.Event()
        self.draining = False
        self.stopped = threading.Event()  # set by stop: a start still loading ends (StartCut)
        self.starting: threading.Thread | None = None  # start_in_background's
        self.start_failure: str | None = None

    @property
    def roots(self) -> list[Path]:
        return [self.settings.adapters_dir, *self.settings.adapter_roots]

    def start(self, log_failure: bool = True) -> None:
        """Load the base model and every adapter in the adapters folder (on a thread that ends with it:
        service.model.cpu_threads), then start the engine. What fails it is raised, its reason kept
        (``start_failure``) and, with ``log_failure``, logged (``log_start_failure``): without, for a caller that
        reports it itself (a command's usage error: a review found eval's said twice, the log line first). A stop
        meanwhile (``stop``) ends the load at its next step, an adapter's or the base's, with StartCut, or with what
        the load raised once stopped: a line at INFO says the start was cut short, no failure is kept or logged (a
        review: a server stopped while its adapters loaded ended with an ERROR and a traceback, 'cannot schedule new
        futures after interpreter shutdown', as the load ran on past the server's end)."""
        try:
            on_passing_thread(self._load)
            self._going_on()
            self.engine.start()
            self.ready.set()
        except Exception as exc:  # the reason's first line: torch's own errors go on with their C++ frames
            if self.stopped.is_set():
                log_start_cut()
                raise
            self.start_failure = self.named(f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}")
            if log_failure:
                log_start_failure(exc, self.start_failure)
            raise

    def _load(self) -> None:
        self._warn_of_missing_roots()
        if not self.checked:
            check_settings_fit(self.settings)
        room = adapters_room(self.settings, self.sharing)
        model, tokenizer = load_base(self.settings)
        self._going_on()
        device = pick_device(self.settings.device)
        dtype = str(pick_dtype(self.settings.dtype, device)).removeprefix("torch.")
        base = Path(self.settings.base_model).resolve().name or self.settings.base_model  # '.': its folder's name
        metrics.describe_model(base, str(device), dtype, self.settings.quantize)
        positions = max_positions(model)
        warn_of_short_prompts(self.settings, positions, self.named)
        self.registry = AdapterRegistry(model, self.roots, self.settings.max_resident, self.settings.max_rank, room)
        metrics.ADAPTERS_RESIDENT.set_function(lambda: self.registry.resident_count)
        self.load_adapter_folder(self.settings.adapters_dir)
        for setting in ("qa_adapter", "nli_adapter"):
            default = getattr(self.settings, setting)
            if default is not None and default not in self.registry.names():
                log.warning(self.named(f"{setting} {default!r} is not registered: requests that name no adapter get "
                                       "the bare base model until an adapter of that name is"))
        self.engine = Engine(model, tokenizer, self.registry, self.settings)
        metrics.ENGINE_STATE.watch(self.engine, self.registry)
        self.tasks = Tasks(self.engine, tokenizer, self.settings, positions)

    def _warn_of_missing_roots(self) -> None:
        """Log a warning for the adapters folder and each adapter root that is not an existing folder: no adapter
        can come from it (a mistyped path is not otherwise refused, as a folder made later would serve)."""
        named = [("adapters_dir", self.settings.adapters_dir)]
        named += [("adapter_roots", root) for root in self.settings.adapter_roots]
        for setting, folder in named:
            if not Path(folder).is_dir():
                log.warning(self.named(f"{setting} {folder} is not an existing folder: no adapter can come from it"))

    def _going_on(self) -> None:
        """StartCut where the runtime was stopped (``stop``): a start still loading goes no further."""
        if self.stopped.is_set():
            raise StartCut("the service was stopped while it started")

    def start_in_background(self) -> threading.Thread:
        self.starting = threading.Thread(target=self._start_quietly, name="loraswap-start", daemon=True)
        self.starting.start()
        return self.starting

    def _start_quietly(self) -> None:
        with contextlib.suppress(Exception):  # kept in self.start_failure and reported by /health and /ready
            self.start()

    def load_adapter_folder(self, folder: Path) -> None:
        """Register every adapter folder under ``folder``; ones that do not fit this base are skipped. ValueError
        (the start fails) where they need more memory than the start leaves them (NoRoomForAdapter: their host copies
        and LoRA banks at their widest, ``lora.adapter_memory``). StartCut where the runtime is stopped meanwhile
        (``stop``)."""
        for path in adapter_folders(folder):
            self._going_on()
            try:
                self.load_adapter(path.name, path)
            except NoRoomForAdapter as exc:
                raise ValueError(f"the adapters folder {folder}: {exc}") from None
            except AdapterError as exc:
                log.warning("skipping adapter %s: %s", path, worded(str(exc), self.named, exc.settings))

    def load_adapter(self, name: str, path: Path | str, replace: bool = False) -> dict:
        """Register an adapter (``AdapterRegistry.prepare`` and ``add``: its description; AdapterError for anything
        the engine cannot serve, its chat template included). With ``replace`` (vLLM's ``load_inplace``) a name taken
        is given the new weights and template once they are read and checked (a refusal leaves the old ones):
        requests that arrived before run on the old weights, with the old template, later ones on the new
        (``Tasks``: a request is bound to its adapter when it arrives); the old are unmerged first if merged (between
        batches), and their prefix cache blocks dropped."""
        adapter, seconds = self.registry.prepare(name, path, replace)
        if not names_the_base(adapter.base_model, self.settings.base_model):
            log.warning(self.named(f"adapter {name!r} was trained on {adapter.base_model!r} (its config's "
                                   f"base_model_name_or_path), not on this server's base_model "
                                   f"{self.settings.base_model}: served, as its modules and shapes fit, but one "
                                   "trained on another base answers wrongly"))
        replaced = self._past_merge(name, lambda: self.registry.add(adapter, replace))
        if replaced is not None:
            self.engine.purge_prefixes(replaced)
        metrics.ADAPTER_LOAD.observe(seconds)
        return adapter.describe()

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter, its metric series and its prefix cache blocks (``Engine.purge_prefixes``). One merged
        into the base (the merge policy may merge any adapter under steady traffic) is unmerged first, with the
        unregistering, in one call on the engine thread between batches. Raises AdapterError (422) for a name no
        adapter can have (``check_name``: not a plain identifier, or a name of the bare base in any case), as
        registering it does; UnknownAdapter for an unknown name."""
        check_name(name)
        forgotten = self._past_merge(name, lambda: self.registry.unregister(name))
        self.engine.purge_prefixes(forgotten)
        metrics.forget_adapter(name, self.registry.names)

    def _past_merge(self, name: str, change: Callable[[], T]) -> T:
        """``change()`` (a registry change to ``name``); if the registry refuses it while ``name`` is merged into the
        base (AdapterMerged), unmerge it and make the change in one call on the engine thread, between batches."""
        try:
            return change()
        except AdapterMerged:
            return self.engine.call(lambda: self._unmerged(name, change)).result()

    def _unmerged(self, name: str, change: Callable[[], T]) -> T:
        """On the engine thread: ``change()`` once ``name`` is no longer merged (the merge policy may have merged
        it again meanwhile, or unmerged it)."""
        if self.registry.merged == name:
            self.registry.unmerge()
        return change()

    @property
    def failure(self) -> str | None:
        """Why the service cannot serve at all: it failed to start, or its engine thread died (None: neither)."""
        if self.start_failure is not None:
            return f"failed to start: {self.start_failure}"
        if self.engine is not None and self.engine.failure is not None:
            return f"the engine failed: {self.engine.failure}"
        return None

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self.draining and self.failure is None

    @property
    def state(self) -> str:
        """Why the service is not accepting work (its failure, draining or loading), or "ready"."""
        if self.failure is not None:
            return self.failure
        return "draining" if self.draining else "ready" if self.ready.is_set() else "loading"

    @property
    def still_starting(self) -> bool:
        """Whether a start in the background (``start_in_background``) still runs: after a stop (``stop``), a step
        that cannot be cut. Nothing it writes is left half done for another start to find when its process ends
        meanwhile: the embedded base is converted into a folder of its own, renamed into place once whole, else removed
        as the process ends (``base_model.remove_partials``), or by the next start (``base_model.convert_gguf``)."""
        return self.starting is not None and self.starting.is_alive()

    def drain(self) -> None:
        """Take no new request (``accepting`` false: a 503, /ready false), and have the engine refuse a request it
        queued as a server going away does (``Engine.drain``: a 503 without Retry-After, not a 429 'retry later');
        the requests queued and running are served as ever."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def stop_rendering(self) -> None:
        """End the chat template renders (``Renderer.close``): those not begun fail at once with EngineStopped (503),
        so that a shutdown waits for none queued behind others (a hostile template's 2 s each); those running end
        within their deadline, then the render processes end."""
        if self.tasks is not None:
            renderer(self.tasks.tokenizer).close()

    def stop(self) -> None:
        """Stop taking work, end the chat template renders (``stop_rendering``), finish what the engine has queued, stop
        the engine (``Engine.stop``: within its bound, else left running with an error line). A start still loading in
        the background (``start_in_background``) ends at its next step (``start``), and is waited for: it ends, and says
        so, before the server does, not while the interpreter ends (a review: its log line came after the server's last,
        or never). At most ``STOP_WAIT_SECONDS``: a step that cannot be cut, the embedded base's conversion (30-60 s) or
        the base's load, runs on (``still_starting``), to end at its own end, the engine never started; the server's
        process ends without it (a review: serve SIGTERMed while it converted ended 10-30 s later, past a container's
        grace period)."""
        self.stopped.set()
        self.drain()
        if self.starting is not None and self.starting is not threading.current_thread():
            self.starting.join(STOP_WAIT_SECONDS)
        self.stop_rendering()
        if self.engine is not None:
            self.engine.stop()
