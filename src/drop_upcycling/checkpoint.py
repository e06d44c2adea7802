"""HF-format checkpoints: sharded safetensors + ``model.safetensors.index.json``, written atomically;
and the trainer's checkpoints, which are such a checkpoint plus the ``trainer/`` state.

The one mapping between our parameter names and HF's lives here (:func:`to_hf` / :func:`hf_expert_name`):
all names are identical except the stacked ``...experts.w1|w2|w3`` tensors, which are stored as
HF's legacy Mixtral per-expert tensors ``...experts.{e}.w1|w2|w3.weight`` (read by transformers 4
and 5 and by vLLM). HF names are made (and stacked names split by expert) only here.

Writers stream: :class:`ShardedWriter` takes tensors one at a time and flushes a shard whenever the
next tensor would overflow it, so peak memory is one shard, not the model; :class:`PlannedWriter`,
given the tensor list in advance, writes each tensor's bytes to disk as it arrives. Everything is written
into a temporary directory next to the destination and renamed at the end
(:func:`drop_upcycling.fsio.atomic_dir`): an interrupted write leaves nothing half-written at the destination.

A training checkpoint (:func:`save_checkpoint`, :func:`load_checkpoint`) is written by all ranks at
once: each expert-parallel rank writes its experts' weights into its own shard
(``model-{ep_rank + 1}-of-{ep_size}``, rank 0's also holding everything else) and rank 0 the index,
so transformers loads it like any other. ``trainer/`` holds the AdamW moments under the HF names
(``optimizer-{ep_rank}.safetensors``: any expert-parallel size reloads them; with ``save_dtype: bf16``
also the fp32 weights, ``<name>.master``, which the rounded shards lack and an exact resume needs),
each rank's data position and RNG state (``rank-{rank}.json``) and the step (``state.json``).

Under ``zero_stage`` 1 or 2 (:mod:`drop_upcycling.sharding`) the weights are written the same way (a
bf16 model's fp32 weights gathered from the shards first), and each rank writes its own shards instead
of ``optimizer-*``: ``trainer/zero-{rank}.safetensors`` with ``<group>.master``, ``<group>.exp_avg``,
``<group>.exp_avg_sq`` (group ``dense`` or ``experts``), flat, as DeepSpeed writes its partitions. Per
rank rather than gathered: gathering the moments on one rank would hold them unsharded, which is what
sharding avoids. ``state.json`` then records the layout (``zero``); such a checkpoint resumes with
sharding on the same world size and expert-parallel size (refused in one line otherwise), and loads in
transformers or as ``init:`` like any other.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configs import ModelConfig, read_hf_config
from .errors import UserError
from .fsio import atomic_dir, write_json
from .model import CausalLM

if TYPE_CHECKING:
    from .configs import TrainConfig
    from .data import TokenSequenceReader
    from .parallel import ParallelEnv
    from .sharding import ZeroSharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# Every dtype a checkpoint we read may hold (HF checkpoints can carry integer buffers).
_SAFETENSORS_READ_DTYPES = {
    **_SAFETENSORS_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_STACKED = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])$")
TRAINER = "trainer"  # the trainer's state inside a training checkpoint
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, besides the step
MASTER = "master"  # the fp32 weights in the optimizer file, when the weight shards are rounded to bf16


# ---------------------------------------------------------------------------- the name mapping
def hf_expert_name(layer: int, expert: int, matrix: str) -> str:
    """HF name of one expert matrix (``matrix`` in w1 = gate, w2 = down, w3 = up)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"


def hf_dense_ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _is_stacked(name: str) -> bool:
    """Whether ``name`` is one of our stacked expert tensors (stored as one HF tensor per expert)."""
    return _STACKED.match(name) is not None


def _hf_expert_names(name: str, first: int, count: int, suffix: str = "") -> list[str]:
    """HF names (+ ``suffix``) of experts ``first .. first + count - 1`` of our stacked tensor ``name``."""
    prefix, matrix = _STACKED.match(name).groups()
    return [f"{prefix}.{e}.{matrix}.weight{suffix}" for e in range(first, first + count)]


def to_hf(name: str, tensor: torch.Tensor, expert_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) -> HF (name, tensor) pairs: a stacked expert tensor becomes one per expert."""
    if not _is_stacked(name):
        yield name, tensor
        return
    for e, hf_name in enumerate(_hf_expert_names(name, expert_offset, tensor.shape[0])):
        yield hf_name, tensor[e]


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a checkpoint of ``cfg`` holds, in the order of
    :class:`~drop_upcycling.model.CausalLM`'s state dict mapped through :func:`to_hf`.

    Computed from the config alone: building the model, even on the meta device, costs a second on
    first use (torch loads its meta kernels lazily), which was a fifth of a whole 152M conversion.
    A test checks this against the meta model's state dict.
    """
    d, f, v, e = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_experts
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        if cfg.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (e, d)
            for matrix, shape in (("w1", (f, d)), ("w2", (d, f)), ("w3", (f, d))):
                shapes.update((hf_expert_name(i, x, matrix), shape) for x in range(e))
        else:
            shapes.update({hf_dense_ffn_name(i, "gate_proj"): (f, d), hf_dense_ffn_name(i, "up_proj"): (f, d),
                           hf_dense_ffn_name(i, "down_proj"): (d, f)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _hf_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], experts_only: bool = False,
                suffix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name + ``suffix``, tensor) pairs of ``tensors``, named like ``model``'s state (its weights
    or its optimizer moments): the experts it holds, under their global ids, and, unless
    ``experts_only``, everything else. A tied LM head is the embedding and is not stored twice."""
    for name, t in tensors.items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if experts_only and not _is_stacked(name):
            continue
        for hf_name, x in to_hf(name, t, model.expert_offset(name)):
            yield hf_name + suffix, x


# ---------------------------------------------------------------------------- writing
def _shard_file(i: int, n: int) -> str:
    """HF's name of shard ``i`` (0-based) of ``n``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        # One metadata key only: safetensors writes the metadata map in hash order, so a second key
        # would make the bytes of identical checkpoints differ from run to run.
        self.metadata = {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_ptrs: set[tuple[int, int]] = set()
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous().cpu()
        if (tensor.data_ptr(), nbytes) in self._pending_ptrs:  # the same tensor under two names (BTX)
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_ptrs.add((tensor.data_ptr(), nbytes))
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._pending, str(self.out_dir / f"shard-{idx:05d}.safetensors"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes, self._pending_ptrs = {}, 0, set()

    def close(self) -> dict[str, str]:
        """Write the last shard, give shards their final names and write the index; returns weight_map."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = SINGLE_FILE if n == 1 else _shard_file(i, n)
            (self.out_dir / f"shard-{i:05d}.safetensors").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            write_json(self.out_dir / INDEX_FILE,
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return weight_map


class PlannedWriter:
    """Writes tensors whose names and shapes are known in advance straight into their shard files.

    A safetensors header needs every tensor's offset before the first byte of data, which is why
    :class:`ShardedWriter` keeps a shard in memory. When the whole list is known up front (upcycling
    knows it from the config), the headers are written first and each tensor's bytes go to disk as
    soon as it is built: memory stays at a few tensors, whatever the shard size. Tensors must arrive
    in plan order with the planned shape; anything else is a bug and raises at once.

    The bytes are written by a thread: copying them into the page cache is kernel time that, on a
    second core, overlaps building the next tensors (the 152M conversion: 1.45-1.6 s in-process
    against 1.8-2.2 s writing in the caller's thread, 2 busy cores). :meth:`add` returns once at most ``queue_bytes``
    wait for the thread, so memory stays at that plus the tensor being built. A :class:`StoredTensor`
    (a tensor copied unchanged from a source checkpoint) costs no memory at all: the thread copies
    its bytes file to file (``copy_file_range``), or reads and converts it when the dtype differs.
    An error of the thread (disk full) is raised by the next :meth:`add` or by :meth:`close`. Use it
    as a context manager: leaving on an error stops the thread before the caller removes the
    directory. A tensor passed to :meth:`add` must not be modified afterwards.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 1024**3, queue_bytes: int = 64 * 1024**2) -> None:
        self.out_dir, self.dtype, self.queue_bytes = Path(out_dir), dtype, queue_bytes
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        shard_bytes = 0
        for name, shape in plan:
            nbytes = math.prod(shape) * itemsize
            if self._shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                self._shards.append([])
                shard_bytes = 0
            self._shards[-1].append((name, tuple(shape), nbytes))
            shard_bytes += nbytes
        n = len(self._shards)
        self.files = [SINGLE_FILE if n == 1 else _shard_file(i, n) for i in range(n)]
        self._order = iter([(i, name, shape, nbytes) for i, shard in enumerate(self._shards)
                            for name, shape, nbytes in shard])
        self.total_bytes = 0
        # Shared with the writer thread, under _cond: what waits to be written (shard, name, tensor,
        # bytes of memory it holds), and how the thread ended.
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int, str, torch.Tensor | StoredTensor, int]] = collections.deque()
        self._queued_bytes = 0
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_all, name="PlannedWriter", daemon=True)
        self._thread.start()

    def __enter__(self) -> PlannedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._stop(discard=True)

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        shard, expected, shape, nbytes = next(self._order, (None, None, None, 0))
        if name != expected or tuple(tensor.shape) != shape:
            self._stop(discard=True)
            raise RuntimeError(f"planned {expected} {shape}, got {name} {tuple(tensor.shape)}")
        held = 0
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().to(self.dtype).contiguous().cpu()
            held = nbytes
        with self._cond:
            if self._error is None:
                self._queue.append((shard, name, tensor, held))
                self._queued_bytes += held
                self._cond.notify_all()
            # Wait after queueing, not before: the caller builds or reads the next tensor only once
            # this one fits, so a large tensor (the embeddings) is never in memory twice.
            while self._error is None and self._queued_bytes > self.queue_bytes:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        self.total_bytes += nbytes

    def _write_all(self) -> None:
        """The writer thread: each shard's header when its first tensor comes, then the tensors' bytes.

        It blocks SIGINT and SIGTERM so that the kernel hands them to the caller's thread, whose
        handler then interrupts at once even where it waits for room in the queue."""
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        handle, current = None, None
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue:
                        return
                    shard, name, tensor, held = self._queue[0]
                if shard != current:
                    if handle is not None:
                        handle.close()
                    handle, current = self._open_shard(shard), shard
                if isinstance(tensor, StoredTensor) and tensor.dtype == self.dtype:
                    _copy_stored(tensor, handle, name)
                else:
                    if isinstance(tensor, StoredTensor):
                        tensor = _read_stored(tensor, name).to(self.dtype)
                    _write_fully(handle, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                with self._cond:
                    self._queue.popleft()
                    self._queued_bytes -= held
                    self._cond.notify_all()
        except BaseException as e:  # handed to the caller's thread
            with self._cond:
                self._error = e
                self._queue.clear()
                self._cond.notify_all()
        finally:
            if handle is not None:
                handle.close()

    def _open_shard(self, i: int) -> io.FileIO:
        header, offset = {}, 0
        for name, shape, nbytes in self._shards[i]:
            header[name] = {"dtype": _SAFETENSORS_NAMES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        # Unbuffered: tensors are written whole, and copy_file_range writes at the descriptor's offset.
        handle = open(self.out_dir / self.files[i], "wb", buffering=0)  # noqa: SIM115 (closed by _write_all)
        _write_fully(handle, memoryview(struct.pack("<Q", len(blob)) + blob))
        return handle

    def _stop(self, discard: bool) -> None:
        """End the writer thread: after it wrote what is queued, or (``discard``) after the tensor in hand."""
        with self._cond:
            self._stopping = True
            if discard:
                self._queue.clear()
            self._cond.notify_all()
        self._thread.join()

    def close(self) -> dict[str, str]:
        """Check that every planned tensor was written, finish writing, write the index."""
        missing = next(self._order, None)
        if missing is not None:
            self._stop(discard=True)
            raise RuntimeError(f"planned tensor {missing[1]} was never written")
        self._stop(discard=False)
        if self._error is not None:
            raise self._error
        weight_map = {name: self.files[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
        if len(self.files) > 1:
            write_json(self.out_dir / INDEX_FILE,
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return weight_map


def _write_fully(handle: io.FileIO, data: memoryview) -> None:
    """All of ``data`` (an unbuffered write may take only part of it)."""
    done = 0
    while done < len(data):
        done += handle.write(data[done:])


_COPY_CHUNK = 16 * 1024**2


def _read_stored(stored: StoredTensor, name: str) -> torch.Tensor:
    try:
        return stored.read()
    except OSError as e:
        raise UserError(f"cannot read tensor {name} from {stored.path}: {e}") from None


def _copy_stored(stored: StoredTensor, handle: io.FileIO, name: str) -> None:
    """Append ``stored``'s bytes to ``handle``, in the kernel where it can (no copy through this
    process's memory), else through a 16 MB buffer."""
    try:
        src = open(stored.path, "rb", buffering=0)  # noqa: SIM115 (closed below)
    except OSError as e:
        raise UserError(f"cannot read tensor {name} from {stored.path}: {e}") from None
    with src:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < stored.nbytes:
                    n = os.copy_file_range(src.fileno(), handle.fileno(), stored.nbytes - done,
                                           offset_src=stored.offset + done)
                    if n == 0:
                        raise UserError(f"cannot read tensor {name} from {stored.path}: the file ends early")
                    done += n
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise  # ENOSPC and the like are the destination's; fsio.writing reports them
        src.seek(stored.offset + done)
        buf = memoryview(bytearray(min(_COPY_CHUNK, stored.nbytes - done)))
        while done < stored.nbytes:
            n = src.readinto(buf[:min(len(buf), stored.nbytes - done)])
            if not n:
                raise UserError(f"cannot read tensor {name} from {stored.path}: the file ends early")
            _write_fully(handle, buf[:n])
            done += n


def write_config(out_dir: Path, cfg: ModelConfig, dtype: torch.dtype) -> None:
    write_json(out_dir / "config.json", cfg.to_hf_dict(DTYPE_NAMES[dtype]))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_model(model: CausalLM, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
               max_shard_bytes: int = 2 * 1024**3, tokenizer_from: Path | None = None) -> Path:
    """Save a (single-process) :class:`~drop_upcycling.model.CausalLM` as an HF checkpoint directory."""
    dtype = dtype or next(model.parameters()).dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for hf_name, t in _hf_tensors(model, model.state_dict()):
            writer.add(hf_name, t.to(dtype))
        writer.close()
        write_config(tmp, model.config, dtype)
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
    return Path(out)


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in a safetensors file: read on demand (:meth:`read`), or copied file
    to file by :class:`PlannedWriter` without ever being in this process's memory."""

    path: Path
    offset: int  # of the first byte, from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor, in a fresh buffer of its own (nothing stays mapped)."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while done < self.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path} ended {self.nbytes - done} bytes before the end of a tensor")
                done += n
        return buf.view(self.dtype).reshape(self.shape)


class SafetensorsFile:
    """One safetensors file's header: where each tensor lies (:class:`StoredTensor`), read with plain reads.

    ``safe_open`` maps the file: every page a conversion touches stays in the process's resident
    memory until the handle closes, so converting 8x1.5B held the whole 3.1 GB source in RSS. A read
    into a fresh tensor costs the same copy and lets that memory go with the tensor. The header is
    validated when the file is opened (offsets inside the file, sizes matching shapes and dtypes),
    as ``safe_open`` does, so a truncated file fails before any work.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > size - 8:
                    raise ValueError(f"header of {header_len} bytes in a file of {size}")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path} is not a readable safetensors file: {e}") from None
        if not isinstance(header, dict):
            raise UserError(f"{path} is not a readable safetensors file: its header is not a JSON object")
        data_start = 8 + header_len
        self.tensors: dict[str, StoredTensor] = {
            name: self._entry(name, entry, data_start, size) for name, entry in header.items() if name != "__metadata__"
        }

    def _entry(self, name: str, entry: Any, data_start: int, size: int) -> StoredTensor:
        """One header entry, or a UserError saying what is wrong with it."""
        try:
            dtype = _SAFETENSORS_READ_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.path} is not a readable safetensors file: bad header entry {name}: "
                            f"{e!r}") from None
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= size - data_start or end - begin != nbytes:
            raise UserError(f"{self.path} is not a readable safetensors file: tensor {name} at bytes "
                            f"{begin}..{end} of a {size - data_start}-byte data section, {nbytes} bytes expected "
                            "(truncated or corrupt)")
        return StoredTensor(self.path, data_start + begin, nbytes, dtype, shape)


class CheckpointReader:
    """Validated access to the tensors of an HF checkpoint dir (one or many shards), read one at a
    time with plain reads (:class:`SafetensorsFile`): memory holds only the tensors in use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_dict = read_hf_config(self.path)
        self.config = ModelConfig.from_hf_dict(self.config_dict, name=self.path.name)
        self._files: dict[str, SafetensorsFile] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index} is not a valid safetensors index: {e}") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise UserError(f"{self.path} is missing shard {shard} listed in {INDEX_FILE}")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path} has no .safetensors weights")
        weight_map = {}
        for f in files:
            for name in self._open(f.name).tensors:
                weight_map[name] = f.name
        return weight_map

    def _open(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.path / shard)
        return self._files[shard]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def stored(self, name: str, shape: tuple[int, ...] | None = None) -> StoredTensor:
        """Where tensor ``name`` lies, checked against the expected shape (from the header: no data read)."""
        if name not in self.weight_map:
            raise UserError(f"{self.path} lacks tensor {name}")
        file = self._open(self.weight_map[name])
        if name not in file.tensors:
            raise UserError(f"{self.path} lacks tensor {name} (not in {file.path.name}, where {INDEX_FILE} puts it)")
        stored = file.tensors[name]
        if shape is not None and stored.shape != tuple(shape):
            raise UserError(f"tensor {name} in {self.path} has shape {stored.shape}, expected {tuple(shape)}")
        return stored

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked against the expected shape; missing or corrupt tensors are UserErrors."""
        stored = self.stored(name, shape)
        try:
            t = stored.read()
        except OSError as e:
            raise UserError(f"cannot read tensor {name} from {self.path}: {e}") from None
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its shard header, without reading its data."""
        return self.stored(name).shape

    def dtype(self) -> torch.dtype:
        """Storage dtype of the checkpoint (of its first tensor; float32 unless bf16, fp16 or fp32)."""
        dtype = self.stored(next(iter(self.weight_map))).dtype
        return dtype if dtype in _SAFETENSORS_NAMES else torch.float32


def load_state_into(model: CausalLM, reader: CheckpointReader) -> None:
    """Fill ``model`` (possibly holding only a slice of the experts) from ``reader``, tensor by tensor.

    Each stacked expert tensor reads only the experts this model holds, so an expert-parallel rank
    never materializes the others. Shapes are checked; every parameter must be found.
    """
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if model.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if not _is_stacked(name):
                param.copy_(reader.get(name, tuple(param.shape)))
                continue
            for e, hf_name in enumerate(_hf_expert_names(name, model.expert_offset(name), param.shape[0])):
                param[e].copy_(reader.get(hf_name, tuple(param.shape[1:])))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               **model_kwargs: Any) -> CausalLM:
    """Build a :class:`~drop_upcycling.model.CausalLM` from an HF checkpoint dir (dense or MoE);
    ``model_kwargs`` (``num_local``, ``expert_offset``, ``dispatcher``) build an expert slice."""
    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = CausalLM(reader.config, **model_kwargs)
    model = model.to_empty(device=device).to(dtype)
    if reader.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_into(model, reader)
    return model


# ---------------------------------------------------------------------------- training checkpoints
def _optimizer_file(ep_rank: int) -> str:
    return f"{TRAINER}/optimizer-{ep_rank:05d}.safetensors"


def _rank_file(rank: int) -> str:
    return f"{TRAINER}/rank-{rank:05d}.json"


def _zero_file(rank: int) -> str:
    return f"{TRAINER}/zero-{rank:05d}.safetensors"


def save_checkpoint(path: Path, step: int, tokens: int, model: CausalLM, optimizer: torch.optim.AdamW,
                    reader: TokenSequenceReader, run: TrainConfig, env: ParallelEnv,
                    tokenizer_dir: Path | None, zero: ZeroSharding | None = None) -> None:
    """Write the training checkpoint of ``step`` at ``path``, from all ranks, atomically.

    Rank 0 makes the temp dir and tells the others where it is; every rank writes its files
    (:func:`_write_rank_files`); once all are done, rank 0 adds what describes the whole (the index,
    config.json, the tokenizer, ``state.json``) and renames the temp dir to ``path``. ``zero``: the
    sharded state (``model`` is then the module that runs, whose names and experts the files take).
    """
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(path, overwrite=True)) if env.is_main else None
        tmp = Path(env.broadcast_str(str(tmp) if tmp else None))
        if env.is_main:
            (tmp / TRAINER).mkdir()
        env.barrier()
        if zero is None:
            _write_rank_files(tmp, model, optimizer, reader, run, env)
        else:
            _write_sharded_rank_files(tmp, model, optimizer, reader, run, env, zero)
        env.barrier()
        if env.is_main:
            _write_index(tmp, model, run, env, tokenizer_dir)
            state = {"step": step, "tokens": tokens, "world_size": env.world_size, "ep": env.ep_size,
                     "dp": env.dp_size, "run": run.as_dict()}
            if zero is not None:
                state["zero"] = {"stage": zero.stage, "groups": zero.layout()}
            write_json(tmp / TRAINER / "state.json", state)


def _write_rank_files(tmp: Path, model: CausalLM, optimizer: torch.optim.AdamW, reader: TokenSequenceReader,
                      run: TrainConfig, env: ParallelEnv) -> None:
    """This rank's files. One replica of each expert slice (``dp_rank`` 0) writes the weights and the
    AdamW moments of its experts (rank 0 also those of everything else); every rank writes its data
    position and RNG state.

    ``model`` holds the weights AdamW updates (the fp32 master under ``param_dtype: bf16``). When the
    shards round them to bf16, the optimizer file keeps them in fp32 too (``<name>.master``), so that a
    resume continues from the exact weights, as it does from fp32 shards.
    """
    save_dtype = torch.bfloat16 if run.save_dtype == "bf16" else torch.float32
    if env.dp_rank == 0:
        experts_only = not env.is_main
        weights = {n: t.detach().to(save_dtype).contiguous().cpu()
                   for n, t in _hf_tensors(model, model.state_dict(), experts_only)}
        save_file(weights, str(tmp / _shard_file(env.ep_rank, env.ep_size)), metadata={"format": "pt"})
        moments = {}
        params = dict(model.named_parameters())
        for key in MOMENTS:
            state = {n: optimizer.state[p][key] for n, p in params.items() if p in optimizer.state}
            moments.update(_hf_tensors(model, state, experts_only, suffix=f".{key}"))
        if save_dtype != torch.float32:
            moments.update(_hf_tensors(model, params, experts_only, suffix=f".{MASTER}"))
        moments = {n: t.detach().contiguous().cpu() for n, t in moments.items()}
        save_file(moments, str(tmp / _optimizer_file(env.ep_rank)))
    write_json(tmp / _rank_file(env.rank), {"data": reader.state_dict(), "rng": _rng_state()})


def _write_sharded_rank_files(tmp: Path, model: CausalLM, optimizer: torch.optim.AdamW,
                              reader: TokenSequenceReader, run: TrainConfig, env: ParallelEnv,
                              zero: ZeroSharding) -> None:
    """:func:`_write_rank_files` under sharding: the same weight shards (a bf16 model's fp32 weights
    gathered from the shards, by every rank), and every rank's shards of the optimizer state."""
    save_dtype = torch.bfloat16 if run.save_dtype == "bf16" else torch.float32
    weights = zero.full_weights(model, save_dtype)
    if env.dp_rank == 0:
        tensors = {n: t.detach().to(save_dtype).contiguous().cpu()
                   for n, t in _hf_tensors(model, weights, experts_only=not env.is_main)}
        save_file(tensors, str(tmp / _shard_file(env.ep_rank, env.ep_size)), metadata={"format": "pt"})
    del weights
    save_file(zero.state(optimizer), str(tmp / _zero_file(env.rank)))
    write_json(tmp / _rank_file(env.rank), {"data": reader.state_dict(), "rng": _rng_state()})


def _write_index(tmp: Path, model: CausalLM, run: TrainConfig, env: ParallelEnv, tokenizer_dir: Path | None) -> None:
    """The index over the ranks' shards (expert e lives in the shard of rank ``e // num_local``),
    config.json and the tokenizer: what makes the folder an HF checkpoint."""
    cfg = model.config
    weight_map: dict[str, str] = {}
    num_local = cfg.num_experts // env.ep_size if cfg.is_moe else 0
    for name in model.state_dict():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if not _is_stacked(name):
            weight_map[name] = _shard_file(0, env.ep_size)
            continue
        for e, hf_name in enumerate(_hf_expert_names(name, 0, cfg.num_experts)):
            weight_map[hf_name] = _shard_file(e // num_local, env.ep_size)
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_config(tmp, cfg, torch.bfloat16 if run.save_dtype == "bf16" else torch.float32)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is a complete training checkpoint."""
    if not path.is_dir():
        return "does not exist"
    try:
        state = json.loads((path / TRAINER / "state.json").read_text())
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        step, world, ep_size = int(state["step"]), int(state["world_size"]), int(state["ep"])
    except FileNotFoundError as e:
        return f"is incomplete (no {Path(e.filename).relative_to(path)})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"is unreadable ({e})"
    if f"step-{step:08d}" != path.name:
        return f"holds step {step}, not the step its name says"
    optimizer_files = ([_zero_file(r) for r in range(world)] if state.get("zero")
                       else [_optimizer_file(e) for e in range(ep_size)])
    needed = [*sorted(set(weight_map.values())), "config.json", *(_rank_file(r) for r in range(world)),
              *optimizer_files]
    missing = [name for name in needed if not (path / name).is_file()]
    return f"is incomplete (no {missing[0]})" if missing else None


def training_state(path: Path, world_size: int) -> dict[str, Any]:
    """``trainer/state.json`` of the checkpoint at ``path``, refused unless it was written by
    ``world_size`` data ranks: each rank saved its own data position, which cannot be redistributed."""
    state_file = path / TRAINER / "state.json"
    if not state_file.is_file():
        raise UserError(f"{path} is not a training checkpoint (no trainer/state.json)")
    state = json.loads(state_file.read_text())
    if state["world_size"] != world_size:
        raise UserError(f"{path} was written by {state['world_size']} data ranks; resuming with {world_size} "
                        "cannot restore the data position (use it as init: instead)")
    return state


def sharding_problem(state: dict[str, Any], zero_stage: int, ep: int) -> str | None:
    """Why a run with ``zero_stage`` and ``ep`` cannot resume from a checkpoint's ``state.json``, or None.

    A sharded checkpoint holds each rank's shards, cut for its layout: it resumes only sharded, on the
    same ranks (the world size is :func:`training_state`'s check); an unsharded one only unsharded.
    """
    saved = state.get("zero")
    if saved and not zero_stage:
        return (f"its optimizer state is sharded over its ranks (zero_stage {saved['stage']}): resume with "
                "zero_stage 1 or 2")
    if zero_stage and not saved:
        return "its optimizer state is not sharded (zero_stage 0): resume with zero_stage 0"
    if saved and state["ep"] != ep:
        return (f"its optimizer state is sharded for ep {state['ep']} (dp {state['dp']}): resume with ep "
                f"{state['ep']}, or use it as init:")
    return None


def load_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.AdamW, reader: TokenSequenceReader,
                    env: ParallelEnv, zero: ZeroSharding | None = None, fused: bool = False) -> dict[str, Any]:
    """Restore weights, AdamW moments (any EP size unless sharded), and this rank's data position and
    RNG; return ``state.json``. ``zero``: restore this rank's shards into it instead (``fused``: AdamW's
    fused kernel, which keeps its step count on the parameters' device)."""
    state = training_state(path, env.world_size)
    problem = sharding_problem(state, zero.stage if zero is not None else 0, env.ep_size)
    if problem:
        raise UserError(f"cannot resume from {path}: {problem}")
    if zero is None:
        load_state_into(model, CheckpointReader(path))
        _load_moments(path / TRAINER, model, optimizer, state["step"])  # and the fp32 weights, when kept there
    else:
        if state["zero"]["groups"] != zero.layout():
            raise UserError(f"cannot resume from {path}: its shards were cut from {state['zero']['groups']}, "
                            f"this run's from {zero.layout()}")
        with safe_open(str(path / _zero_file(env.rank)), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
        zero.load_state(tensors, optimizer, state["step"], fused)
    rank_state = json.loads((path / _rank_file(env.rank)).read_text())
    reader.load_state_dict(rank_state["data"])
    _set_rng_state(rank_state["rng"])
    return state


def _load_moments(trainer_dir: Path, model: CausalLM, optimizer: torch.optim.AdamW, step: int) -> None:
    """Rebuild AdamW's state of this rank's parameters, whatever expert-parallel layout saved it.

    The moments are stored like the weights, one tensor per HF name (``<name>.exp_avg``,
    ``<name>.exp_avg_sq``): the non-expert ones once, each expert's in the file of the rank that held
    it then. So every name is looked up across all ``optimizer-*`` files, and a stacked parameter
    gathers the experts this rank holds now, which need not be the ones that rank held. ``step`` is
    AdamW's step count, the same for every parameter (gradient reduction gives each parameter a
    gradient at every step), kept as torch keeps it: a float tensor. The fp32 weights
    (``<name>.master``, kept when the shards are bf16) replace the rounded ones just loaded.
    """
    handles = [safe_open(str(f), framework="pt") for f in sorted(trainer_dir.glob("optimizer-*.safetensors"))]
    where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise UserError(f"optimizer state {key} missing from {trainer_dir}")
        return where[key].get_tensor(key)

    def gather(name: str, p: torch.Tensor, key: str) -> torch.Tensor:
        """This rank's ``key`` tensor of parameter ``name`` (its experts' for a stacked one)."""
        if _is_stacked(name):
            t = torch.stack([get(k) for k in _hf_expert_names(name, model.expert_offset(name), p.shape[0],
                                                               suffix=f".{key}")])
        else:
            t = get(f"{name}.{key}")
        return t.to(device=p.device, dtype=p.dtype)

    has_master = any(k.endswith(f".{MASTER}") for k in where)  # saved for every parameter or for none
    for name, p in model.named_parameters():  # a tied LM head is one parameter with the embedding
        st: dict[str, torch.Tensor] = {"step": torch.tensor(float(step))}
        for key in MOMENTS:
            st[key] = gather(name, p, key)
        optimizer.state[p] = st
        if has_master:
            with torch.no_grad():
                p.copy_(gather(name, p, MASTER))


def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
