"""The only module that touches llama.cpp (through llama-cpp-python's C bindings).

Thin, typed wrappers: `Model` (weights + vocabulary), `Context` (KV memory,
`llama_decode`, logits), `Batch` (a `llama_batch` whose arrays are numpy views,
so filling a step costs vectorized writes instead of per-field ctypes calls) and
`GrammarSampler` (llama.cpp's grammar sampler).  Everything above this module speaks
Python ints and numpy arrays.

Two functions here read files before llama.cpp does: `check_gguf` (a model file's
first four bytes, for a one-line error instead of llama.cpp's log) and
`repack_supported` (the CPU's flags).  The rest of the engine does no file I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import os
import sys
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from llamba_cli.errors import EngineError, ModelError


def _bindings() -> tuple[ModuleType, ModuleType]:
    """llama-cpp-python's C bindings and its JSON Schema -> GBNF converter, imported
    without the package's `__init__`, which also imports the high-level `Llama` (its
    chat formats, jinja2 and more: 45 ms of a one-row job's start, on the path to the
    model's load).  A later `import llama_cpp` anywhere still runs the real package,
    which finds these two modules already loaded."""
    names = ("llama_cpp.llama_cpp", "llama_cpp.llama_grammar")
    spec = importlib.util.find_spec("llama_cpp")
    if "llama_cpp" in sys.modules or spec is None or not spec.submodule_search_locations:
        return importlib.import_module(names[0]), importlib.import_module(names[1])
    sys.modules["llama_cpp"] = importlib.util.module_from_spec(spec)  # not executed
    try:
        return importlib.import_module(names[0]), importlib.import_module(names[1])
    finally:
        del sys.modules["llama_cpp"]


if TYPE_CHECKING:
    import llama_cpp.llama_cpp as lc
    import numpy as np

    # llama-cpp-python's JSON Schema -> GBNF converter (pure Python), for `grammar.py`.
    from llama_cpp.llama_grammar import PRIMITIVE_RULES as PRIMITIVE_RULES
    from llama_cpp.llama_grammar import RESERVED_NAMES as RESERVED_NAMES
    from llama_cpp.llama_grammar import BuiltinRule as BuiltinRule
    from llama_cpp.llama_grammar import SchemaConverter as SchemaConverter
else:
    lc, _grammar = _bindings()
    PRIMITIVE_RULES = _grammar.PRIMITIVE_RULES
    RESERVED_NAMES = _grammar.RESERVED_NAMES
    BuiltinRule = _grammar.BuiltinRule
    SchemaConverter = _grammar.SchemaConverter

# llama.cpp logs to stderr by default; a batch tool prints only its own lines.
# The last lines are kept so a failed load can say why.
_LOG_TAIL: deque[str] = deque(maxlen=20)


@lc.llama_log_callback
def _log_to_tail(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if text:
        _LOG_TAIL.append(text.decode("utf-8", "replace").rstrip())


_initialized = False


def _init_backend() -> None:
    """Once per process: llama.cpp's backends.  Every time: llama.cpp's log comes here
    (the callback is process-wide, and llama-cpp-python's own package sets its own
    when it is imported, so it is claimed again before each call whose log we read)."""
    global _initialized
    if not os.environ.get("LLAMBA_LLAMA_LOG"):
        lc.llama_log_set(_log_to_tail, ctypes.c_void_p(0))
    if not _initialized:
        lc.llama_backend_init()
        _initialized = True


def check_gguf(path: str | Path) -> Path:
    """Return `path` if it names a readable GGUF file, else raise ModelError (one line)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a directory, not a GGUF file: {p}")
    if not p.is_file():  # a FIFO or device would block or never end
        raise ModelError(f"model path is not a regular file: {p}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise ModelError(f"not a GGUF model file: {p}")
    return p


def repack_supported() -> bool:
    """Whether llama.cpp's extra CPU buffer types (weight repacking, AMX) are safe here.

    In llama.cpp as pinned, the AMX matmul path that a native build enables on CPUs
    with AMX crashes (SIGSEGV) on Q4_K models such as the embedded Gemma 3 270M.
    Without the extra buffer types the ordinary AVX-512/AVX2 kernels run instead.
    """
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" not in f.read()
    except OSError:
        return True


class Model:
    """Loaded weights and vocabulary. Thread-compatible, not thread-safe."""

    def __init__(
        self, path: str | os.PathLike[str], *, n_gpu_layers: int = -1, repack: bool | None = None
    ) -> None:
        p = check_gguf(os.fspath(path))
        _init_backend()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack_supported() if repack is None else repack
        _LOG_TAIL.clear()
        ptr = lc.llama_model_load_from_file(str(p).encode(), params)
        if not ptr:
            reason = next((line for line in reversed(_LOG_TAIL) if "error" in line.lower()), "")
            raise ModelError(f"failed to load model {p}" + (f": {reason}" if reason else ""))
        self.path = p
        self._ptr = ptr
        self._vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(ptr)
        self.bos: int = lc.llama_vocab_bos(self._vocab)
        self.eos: int = lc.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(lc.llama_vocab_get_add_bos(self._vocab))
        # Filled per token as tokens are generated: a mask over the whole vocabulary
        # would cost 262,144 FFI calls (a quarter second) at every start.
        self._eog: dict[int, bool] = {}
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self._ptr:
            lc.llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- vocabulary -------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (end of sequence, end of turn, ...). Cached."""
        got = self._eog.get(token)
        if got is None:
            got = self._eog[token] = bool(lc.llama_vocab_is_eog(self._vocab, token))
        return got

    def tokenize(
        self, text: str, *, add_bos: bool | None = None, special: bool = True
    ) -> list[int]:
        """Tokens of `text`. BOS is added when the model wants one and `text` does not
        already start with it (chat templates write it themselves)."""
        data = text.encode("utf-8")
        want_bos = self.add_bos if add_bos is None else add_bos
        n_max = len(data) + 8
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, want_bos, special)
        if n < 0:  # pragma: no cover - n_max bounds the token count
            n_max = -n
            buf = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, want_bos, special)
        toks = list(buf[:n])
        if want_bos and len(toks) >= 2 and toks[0] == self.bos and toks[1] == self.bos:
            del toks[0]
        return toks

    def piece(self, token: int) -> bytes:
        """Raw bytes of one token (control tokens render as nothing). Cached."""
        got = self._pieces.get(token)
        if got is None:
            buf = self._piece_buf
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            got = buf.raw[:n]
            self._pieces[token] = got
        return got

    def token_text(self, token: int) -> str:
        """Text of a (special) token, e.g. '<bos>', as a template would write it."""
        raw = lc.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when absent."""
        size = 1 << 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1
        return None  # pragma: no cover

    @property
    def chat_template(self) -> str | None:
        return self.metadata("tokenizer.chat_template")

    def kv_bytes_per_cell(self) -> int:
        """Bytes of KV cache one token takes in a context (keys and values of every
        layer, in llama.cpp's default f16), from the model's shape."""
        n_layer = lc.llama_model_n_layer(self._ptr)
        n_head = max(1, lc.llama_model_n_head(self._ptr))
        n_head_kv = lc.llama_model_n_head_kv(self._ptr)
        arch = self.metadata("general.architecture") or ""
        default = lc.llama_model_n_embd(self._ptr) // n_head
        dims = []
        for key in ("key_length", "value_length"):
            raw = self.metadata(f"{arch}.attention.{key}")
            dims.append(int(raw) if raw and raw.isdigit() else default)
        return n_layer * n_head_kv * sum(dims) * 2


class Batch:
    """A reusable `llama_batch` of up to `capacity` tokens, one sequence id each.

    The C struct points into numpy arrays owned here, so a step is filled with
    vectorized writes and nothing is allocated per step.
    """

    def __init__(self, capacity: int) -> None:
        import numpy as np

        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros((capacity, 1), dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        row = ctypes.POINTER(lc.llama_seq_id)
        base = self.seq_id.ctypes.data
        stride = self.seq_id.strides[0]
        self._seq_ptrs = (row * capacity)(
            *[ctypes.cast(base + i * stride, row) for i in range(capacity)]
        )
        # Typed Any: the bindings annotate these fields as arrays, C has pointers.
        st: Any = lc.llama_batch()
        st.token = self.token.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        st.embd = ctypes.POINTER(ctypes.c_float)()
        st.pos = self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        st.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        st.seq_id = self._seq_ptrs
        st.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = st
        self.n_tokens = 0

    def set_size(self, n: int) -> None:
        if n > self.capacity:
            # llama.cpp aborts the process on an oversized batch; never let one through.
            raise EngineError(f"batch of {n} tokens exceeds n_batch={self.capacity}")
        self.n_tokens = n
        self.struct.n_tokens = n


class Context:
    """A llama.cpp context: unified KV memory for `n_seq_max` sequences and `llama_decode`."""

    DECODE_OK = 0
    DECODE_NO_KV = 1

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        flash_attn: str,
    ) -> None:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        # One ubatch per decode: a step is one graph evaluation, and a failed
        # decode (no KV room) leaves no partially-applied ubatches behind.
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        params.flash_attn_type = {
            "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        _init_backend()
        _LOG_TAIL.clear()
        ptr = lc.llama_init_from_model(model._ptr, params)
        if not ptr:
            reason = next((line for line in reversed(_LOG_TAIL) if line), "")
            raise EngineError(f"failed to create a llama.cpp context (n_ctx={n_ctx}): {reason}")
        self.model = model
        self._ptr = ptr
        self._mem = lc.llama_get_memory(ptr)
        self.n_ctx: int = lc.llama_n_ctx(ptr)
        self.n_batch = n_batch
        self.n_vocab = model.n_vocab
        self.batch = Batch(n_batch)
        import numpy as np  # not at module level: the model's load starts without it

        self._no_logits = np.empty((0, self.n_vocab), dtype=np.float32)
        self._as_array = np.ctypeslib.as_array

    def close(self) -> None:
        if self._ptr:
            lc.llama_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def decode(self) -> int:
        """Run `llama_decode` on `self.batch`. Returns 0 or 1 (no KV room: nothing was
        applied, shrink or evict and retry); raises EngineError on anything else."""
        rc = int(lc.llama_decode(self._ptr, self.batch.struct))
        if rc in (self.DECODE_OK, self.DECODE_NO_KV):
            return rc
        detail = next((line for line in reversed(_LOG_TAIL) if line), "")
        raise EngineError(f"llama_decode failed with code {rc}" + (f": {detail}" if detail else ""))

    def logits(self, n_outputs: int) -> np.ndarray:
        """Zero-copy [n_outputs, n_vocab] float32 view of the last decode's logits,
        rows in batch order of the tokens flagged for output. Valid until the next decode."""
        if n_outputs == 0:
            return self._no_logits
        ptr = lc.llama_get_logits(self._ptr)
        return self._as_array(ptr, shape=(n_outputs, self.n_vocab))

    # -- KV memory ----------------------------------------------------------------

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        """Drop cells of `seq_id` in positions [p0, p1) (-1 = open end)."""
        if not lc.llama_memory_seq_rm(self._mem, seq_id, p0, p1):
            raise EngineError(f"llama.cpp refused to truncate sequence {seq_id} at {p0}")

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Share `src`'s cells in [p0, p1) with `dst` (unified KV: tags only, no copy)."""
        lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        """The highest position `seq_id` holds, -1 when it holds no cells."""
        return int(lc.llama_memory_seq_pos_max(self._mem, seq_id))


# -- grammar sampling: the FFI only (the logic is in `grammar.py`) ----------------------


@functools.cache
def token_data_dtype() -> np.dtype[Any]:
    """A `llama_token_data` array as numpy sees it."""
    import numpy as np

    dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    assert dtype.itemsize == ctypes.sizeof(lc.llama_token_data)
    return dtype


def vocab_pieces(
    model: Model, tokens: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token of `tokens` (default: the whole vocabulary, about a second at 262,144
    tokens): the first byte of its piece as llama.cpp's grammar matches it (special
    tokens as their text; 256 for an empty piece), whether the piece is that one byte
    alone, whether it is a control token, and whether it ends generation."""
    import numpy as np

    ids = range(model.n_vocab) if tokens is None else [int(t) for t in tokens]
    n = len(ids)
    vocab = model._vocab
    first = np.full(n, 256, dtype=np.int16)
    single = np.zeros(n, dtype=bool)
    control = np.zeros(n, dtype=bool)
    eog = np.zeros(n, dtype=bool)
    buf = ctypes.create_string_buffer(64)
    to_piece, get_attr = lc.llama_token_to_piece, lc.llama_vocab_get_attr
    is_eog = lc.llama_vocab_is_eog
    is_control = lc.LLAMA_TOKEN_ATTR_CONTROL
    for i, t in enumerate(ids):
        control[i] = bool(get_attr(vocab, t) & is_control)
        eog[i] = is_eog(vocab, t)
        size = to_piece(vocab, t, buf, 64, 0, True)  # special=True: as the grammar sees it
        if size < 0:
            big = ctypes.create_string_buffer(-size)
            to_piece(vocab, t, big, -size, 0, True)
            first[i] = big.raw[0]
        elif size > 0:
            first[i] = buf.raw[0]
            single[i] = size == 1
    return first, single, control, eog


class GrammarSampler:
    """A llama.cpp grammar sampler: one sequence's parse state under a GBNF grammar.

    `GrammarSampler.compile` returns None when llama.cpp cannot parse the grammar (it
    prints why on stderr; see `capture.py`).  `apply` sets the logit of every token in
    a `token_data_dtype()` array that the grammar rejects to -inf.  `accept` must only
    get a token the grammar allows: llama.cpp aborts the process on anything else.
    """

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr
        self._array: Any = lc.llama_token_data_array()  # the bindings type `data` as an array

    @classmethod
    def compile(cls, model: Model, gbnf: str) -> GrammarSampler | None:
        _init_backend()
        ptr = lc.llama_sampler_init_grammar(model._vocab, gbnf.encode(), b"root")
        return cls(ptr) if ptr else None

    def clone(self) -> GrammarSampler:
        ptr = lc.llama_sampler_clone(self._ptr)
        if not ptr:  # pragma: no cover - only on allocation failure
            raise EngineError("llama.cpp could not copy a grammar")
        return GrammarSampler(ptr)

    def apply(self, data: np.ndarray) -> None:
        arr = self._array
        arr.data = data.ctypes.data_as(lc.llama_token_data_p)
        arr.size = len(data)
        arr.selected = -1
        arr.sorted = False
        lc.llama_sampler_apply(self._ptr, ctypes.byref(arr))

    def accept(self, token: int) -> None:
        lc.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        if self._ptr:
            lc.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def recent_log() -> list[str]:
    """llama.cpp's last log lines (kept instead of printed), oldest first."""
    return list(_LOG_TAIL)


def clear_log() -> None:
    _LOG_TAIL.clear()
