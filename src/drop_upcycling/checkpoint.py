"""HF-format checkpoints: sharded safetensors + ``model.safetensors.index.json``, written atomically.

The one mapping between our parameter names and HF's lives here (:func:`to_hf` / :func:`hf_expert_name`):
all names are identical except the stacked ``...experts.w1|w2|w3`` tensors, which are stored as
HF's legacy Mixtral per-expert tensors ``...experts.{e}.w1|w2|w3.weight`` (read by transformers 4
and 5 and by vLLM).

Writers stream: :class:`ShardedWriter` takes tensors one at a time and flushes a shard whenever the
next tensor would overflow it, so peak memory is one shard, not the model; :class:`PlannedWriter`,
given the tensor list in advance, writes each tensor's bytes to disk as it arrives. Everything is written
into a temporary directory next to the destination and renamed at the end
(:func:`drop_upcycling.fsio.atomic_dir`): an interrupted write leaves nothing half-written at the destination.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .configs import ModelConfig, read_hf_config
from .errors import UserError
from .fsio import atomic_dir, write_json

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
_STACKED = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])$")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")


# ---------------------------------------------------------------------------- the name mapping
def hf_expert_name(layer: int, expert: int, matrix: str) -> str:
    """HF name of one expert matrix (``matrix`` in w1 = gate, w2 = down, w3 = up)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"


def hf_dense_ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def to_hf(name: str, tensor: torch.Tensor, expert_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) -> HF (name, tensor) pairs: a stacked expert tensor becomes one per expert."""
    m = _STACKED.match(name)
    if m is None:
        yield name, tensor
        return
    prefix, matrix = m.groups()
    for e in range(tensor.shape[0]):
        yield f"{prefix}.{expert_offset + e}.{matrix}.weight", tensor[e]


def from_hf_name(hf_name: str) -> tuple[str, int | None]:
    """HF name -> (our name, expert id or None)."""
    m = _HF_EXPERT.match(hf_name)
    if m is None:
        return hf_name, None
    prefix, expert, matrix = m.groups()
    return f"{prefix}.{matrix}", int(expert)


# ---------------------------------------------------------------------------- writing
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
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
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
    soon as it is built: memory stays at one tensor, whatever the shard size. Tensors must arrive in
    plan order with the planned shape; anything else is a bug and raises.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir, self.dtype = Path(out_dir), dtype
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
        self.files = [SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = iter([(i, name, shape) for i, shard in enumerate(self._shards) for name, shape, _ in shard])
        self._current: int | None = None
        self._handle = None
        self.total_bytes = 0

    def _open_shard(self, i: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, offset = {}, 0
        for name, shape, nbytes in self._shards[i]:
            header[name] = {"dtype": _SAFETENSORS_NAMES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.out_dir / self.files[i], "wb")  # noqa: SIM115 (closed in _open_shard/close)
        self._handle.write(struct.pack("<Q", len(blob)) + blob)
        self._current = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected, shape = next(self._order, (None, None, None))
        if name != expected or tuple(tensor.shape) != shape:
            raise RuntimeError(f"planned {expected} {shape}, got {name} {tuple(tensor.shape)}")
        if shard != self._current:
            self._open_shard(shard)
        data = tensor.detach().to(self.dtype).contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self.total_bytes += data.nbytes

    def close(self) -> dict[str, str]:
        """Check that every planned tensor was written, close the last file, write the index."""
        missing = next(self._order, None)
        if missing is not None:
            raise RuntimeError(f"planned tensor {missing[1]} was never written")
        if self._handle is not None:
            self._handle.close()
        weight_map = {name: self.files[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
        if len(self.files) > 1:
            write_json(self.out_dir / INDEX_FILE,
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return weight_map


def write_config(out_dir: Path, cfg: ModelConfig, dtype: torch.dtype, extra: dict | None = None) -> None:
    d = cfg.to_hf_dict(DTYPE_NAMES[dtype])
    if extra:
        d.update(extra)
    write_json(out_dir / "config.json", d)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_model(model: torch.nn.Module, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
               max_shard_bytes: int = 2 * 1024**3, tokenizer_from: Path | None = None,
               extra_config: dict | None = None) -> Path:
    """Save a (single-process) :class:`~drop_upcycling.model.CausalLM` as an HF checkpoint directory."""
    cfg: ModelConfig = model.config
    dtype = dtype or next(model.parameters()).dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in model.state_dict().items():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            for hf_name, t in to_hf(name, tensor, _expert_offset(model, name)):
                writer.add(hf_name, t.to(dtype))
        writer.close()
        write_config(tmp, cfg, dtype, extra_config)
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
    return Path(out)


def _expert_offset(model: torch.nn.Module, name: str) -> int:
    if _STACKED.match(name) is None:
        return 0
    return model.get_submodule(name.rsplit(".", 1)[0]).expert_offset


# ---------------------------------------------------------------------------- reading
class CheckpointReader:
    """Lazy, validated access to the tensors of an HF checkpoint dir (one or many shards)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_dict = read_hf_config(self.path)
        self.config = ModelConfig.from_hf_dict(self.config_dict, name=self.path.name)
        self._handles: dict[str, object] = {}
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
            for name in self._open(f.name).keys():  # noqa: SIM118 (safe_open has no __iter__)
                weight_map[name] = f.name
        return weight_map

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{self.path / shard} is not a readable safetensors file: {e}") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked against the expected shape; missing or corrupt tensors are UserErrors."""
        if name not in self.weight_map:
            raise UserError(f"{self.path} lacks tensor {name}")
        try:
            t = self._open(self.weight_map[name]).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"cannot read tensor {name} from {self.path}: {e}") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise UserError(f"tensor {name} in {self.path} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its shard header, without reading its data."""
        if name not in self.weight_map:
            raise UserError(f"{self.path} lacks tensor {name}")
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        """Storage dtype of the checkpoint (of its first tensor)."""
        first = next(iter(self.weight_map))
        name = self._open(self.weight_map[first]).get_slice(first).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, torch.float32)




def load_state_into(model: torch.nn.Module, reader: CheckpointReader) -> None:
    """Fill ``model`` (possibly holding only a slice of the experts) from ``reader``, tensor by tensor.

    Each stacked expert tensor reads only the experts this model holds, so an expert-parallel rank
    never materializes the others. Shapes are checked; every parameter must be found.
    """
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if model.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            m = _STACKED.match(name)
            if m is None:
                param.copy_(reader.get(name, tuple(param.shape)))
                continue
            offset = _expert_offset(model, name)
            layer = int(name.split(".")[2])
            for e in range(param.shape[0]):
                param[e].copy_(reader.get(hf_expert_name(layer, offset + e, m.group(2)), tuple(param.shape[1:])))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               **model_kwargs) -> torch.nn.Module:
    """Build a :class:`~drop_upcycling.model.CausalLM` from an HF checkpoint dir (dense or MoE)."""
    from .model import CausalLM

    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = CausalLM(reader.config, **model_kwargs)
    model = model.to_empty(device=device).to(dtype)
    if reader.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_into(model, reader)
    return model
