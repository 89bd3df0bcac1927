"""`Runtime`: the served model's life, shared by every handler.

    loading -> ready -> stopping        (or loading -> failed, ready -> failed)

The model loads on a thread of its own once the socket is bound (or earlier: the
command line starts loading it before it parses its options), so `/health` can
answer 503 meanwhile.  Once ready, `api` maps request bodies and `loop` (an
`EngineLoop`, the engine on its own thread) runs them.  A failure to load, or the
engine loop stopping on a llama.cpp failure, is logged once and asks the server
to shut down (`exit_code` says why).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from llamba_cli.engine import Engine, EngineLoop, LoopStats, Model
from llamba_cli.errors import LlambaError
from llamba_cli.job.models import ModelLoad
from llamba_cli.job.vocab_cache import (
    StoredVocab,
    adopt_grammar_vocab,
    build_grammar_vocab,
    read_grammar_vocab,
)
from llamba_cli.openai import OpenAIApi, served_model
from llamba_cli.server.config import ServerConfig
from llamba_cli.server.metrics import Metrics

LOADING, READY, STOPPING, FAILED = "loading", "ready", "stopping", "failed"


class Runtime:
    def __init__(
        self,
        config: ServerConfig,
        *,
        log: Callable[[str], None],
        stop_server: Callable[[], None] = lambda: None,
        model: ModelLoad | None = None,
    ) -> None:
        self.config = config
        self._preload = model
        self.log = log
        self.stop_server = stop_server
        self.state = LOADING
        self.error: str | None = None
        self.exit_code = 0
        self.metrics = Metrics()
        self.api: OpenAIApi | None = None
        self.loop: EngineLoop | None = None
        self._model: Model | None = None
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._vocab_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.state == READY

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="llamba-load", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _load(self) -> None:
        cfg = self.config.engine
        try:
            load = self._preload or ModelLoad(
                cfg.model_path, n_gpu_layers=cfg.n_gpu_layers, repack=cfg.repack
            )
            # Needs only the file, so it is read while the model loads.
            stored = read_grammar_vocab(load.path) if load.path is not None else None
            path, model = load.result()
            stored = stored or read_grammar_vocab(path)
            self._model = model
            served = served_model(
                model,
                n_ctx_seq=cfg.n_ctx_seq,
                format_name=self.config.format_name,
                name=self.config.model_name,
            )
            api = OpenAIApi(served)
            engine = Engine(cfg, model=model)
            self._engine = engine
            # Structured output needs tables over the whole vocabulary: from the cache
            # (a few milliseconds) before the first request, else built once ready.
            vocab_ready = adopt_grammar_vocab(model, stored)
            with self._lock:
                if self.state != LOADING:  # shut down while loading: close() frees it
                    return
                loop = EngineLoop(engine, max_waiting=self.config.max_queue)
                loop.start()
                self.api = api
                self.loop = loop
                self.state = READY
        except LlambaError as e:
            self._fail(str(e), e.exit_code)
            return
        except Exception as e:  # a bug, but the server must still say why and exit
            self._fail(f"internal error while loading: {type(e).__name__}: {e}", 70)
            return
        self.log(
            f"model {served.name} ready: {cfg.slots} slots x {cfg.n_ctx_seq} tokens, "
            f"prompt format {served.prompt_format.name}"
            + (", grammar vocabulary from the cache" if vocab_ready else "")
        )
        if not vocab_ready:
            with self._lock:
                if self.state != READY:  # stopping already: nothing to prepare for
                    return
                self._vocab_thread = threading.Thread(
                    target=self._build_vocab,
                    args=(model, stored),
                    name="llamba-grammar-vocab",
                    daemon=True,
                )
                self._vocab_thread.start()

    def _build_vocab(self, model: Model, stored: StoredVocab) -> None:
        """One pass over the vocabulary (about a second at 262,144 tokens) while the
        server serves, so the first structured request does not pay it, and the tables
        are stored for the next start.  A grammar request that comes meanwhile waits
        for this pass; a failure here only means it builds them itself."""
        try:
            outcome = build_grammar_vocab(model, stored)
        except Exception as e:  # requests build the tables on demand
            self.log(f"grammar vocabulary not prepared: {type(e).__name__}: {e}")
            return
        where = f"stored in {stored.path}" if outcome == "built" else "not stored"
        self.log(f"grammar vocabulary built ({where})")

    def _fail(self, message: str, exit_code: int) -> None:
        with self._lock:
            if self.state in (FAILED, STOPPING):
                return
            self.state = FAILED
            self.error = message
            self.exit_code = exit_code
        self.log(f"error: {message}; shutting down")
        self.stop_server()

    def engine_failed(self, message: str) -> None:
        """The engine loop stopped (llama.cpp failed): fail what is left and shut down."""
        self._fail(f"the engine stopped: {message}", 3)

    def stats(self) -> LoopStats | None:
        loop = self.loop
        return loop.stats() if loop is not None and self.state in (READY, STOPPING) else None

    def close(self) -> None:
        """Abort whatever still runs and free the engine (after the server stopped).
        Waits for a load in progress to end first: llama.cpp cannot be interrupted."""
        with self._lock:
            if self.state != FAILED:
                self.state = STOPPING
        self.wait_loaded()
        if self._vocab_thread is not None:  # it reads the model: finish before freeing it
            self._vocab_thread.join()
        loop, self.loop = self.loop, None
        engine, self._engine = self._engine, None
        if loop is not None:
            loop.close(drain=False)  # aborts what is left, then closes the engine
        elif engine is not None:
            engine.close()
        model, self._model = self._model, None
        if model is not None:
            model.close()
