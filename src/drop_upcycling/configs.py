"""Model shapes (the paper's sizes plus tiny test sizes) and the YAML config loader.

One config system for the whole project: :class:`ModelConfig` describes a dense Llama or a
Mixtral-style MoE, converts to and from Hugging Face ``config.json`` (so that
``transformers.AutoModelForCausalLM`` computes exactly our function) and is what every other
module takes. Shapes are FACTS.md §3.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

AUX_LOSS_MODES = ("global", "per_layer")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama (``num_experts == 0``) or Mixtral (``num_experts > 0``) decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int = 0
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    aux_loss_mode: str = "global"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts < 0:
            raise UserError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UserError(
                f"top-k must be between 1 and the number of experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        if self.aux_loss_mode not in AUX_LOSS_MODES:
            raise UserError(f"aux_loss_mode must be one of {AUX_LOSS_MODES}, got {self.aux_loss_mode!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def as_moe(self, num_experts: int = 8, top_k: int = 2, name: str | None = None) -> ModelConfig:
        """The Mixtral shape that upcycling this dense shape produces (same FFN width per expert)."""
        return self.replace(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            name=name or f"{num_experts}x{self.name.removeprefix('dense-')}",
        )

    def as_dense(self) -> ModelConfig:
        return self.replace(num_experts=0, name=self.name)

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Total and per-token active parameters (embeddings, LM head, norms and routers included)."""
        d, f, v, n_layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        ffn = 3 * d * f
        norms = 2 * d
        embed = v * d * (1 if self.tie_word_embeddings else 2) + d
        if self.is_moe:
            layer_total = attn + norms + self.num_experts * ffn + self.num_experts * d
            layer_active = attn + norms + self.num_experts_per_tok * ffn + self.num_experts * d
        else:
            layer_total = layer_active = attn + norms + ffn
        return {"total": embed + n_layers * layer_total, "active": embed + n_layers * layer_active}

    # ------------------------------------------------------------------ HF interop
    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` that makes transformers compute exactly this model.

        Mixtral's defaults differ from Llama's (rope_theta 1e6, sliding window 4096, eps 1e-5 vs
        1e-6 in some versions), so every field that changes the function is written explicitly, in
        both the transformers-4 (``rope_theta``) and transformers-5 (``rope_parameters``) spelling.
        """
        common: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if not self.is_moe:
            return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False, **common}
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **common,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
            # Our own fields (ignored by transformers): how the aux losses are combined.
            "drop_upcycling": {"aux_loss_mode": self.aux_loss_mode, "router_z_loss_coef": self.router_z_loss_coef},
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Read a Llama or Mixtral ``config.json``; anything else is refused with a clear message."""
        arch = d.get("model_type")
        if arch not in ("llama", "mixtral"):
            raise UserError(f"unsupported architecture {arch!r}: expected a Llama (dense) or Mixtral (MoE) config")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}")
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if (d.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
            raise UserError("rope scaling is not supported")
        if arch == "mixtral" and d.get("sliding_window") not in (None, 0) and d["sliding_window"] < d.get(
            "max_position_embeddings", 4096
        ):
            raise UserError(f"sliding-window attention ({d['sliding_window']}) is not supported")
        extra = d.get("drop_upcycling") or {}
        head_dim = d.get("head_dim")
        if head_dim not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise UserError(f"head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            num_experts=d.get("num_local_experts", 0) if arch == "mixtral" else 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 2),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.02),
            router_z_loss_coef=extra.get("router_z_loss_coef", 0.0),
            aux_loss_mode=extra.get("aux_loss_mode", "global"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=_first(d.get("eos_token_id")),
            name=name,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(read_hf_config(path), name=Path(path).name)


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x


def _dense(name: str, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, name=name)


# FACTS.md §3. MoEs are 8 experts, top-2, aux coefficient 0.02.
DENSE_152M = _dense("dense-152m", 512, 12, 8, 8, 2048, 99_584)
DENSE_1_5B = _dense("dense-1.5b", 2048, 24, 16, 8, 7168, 48_640)
DENSE_3_7B = _dense("dense-3.7b", 3072, 28, 24, 24, 8192, 99_584)
DENSE_13B = _dense("dense-13b", 5120, 40, 40, 40, 13824, 99_584)
# Test and CPU sizes: small enough for seconds per step on 2 cores.
TINY_DENSE = _dense("tiny-dense", 64, 2, 4, 2, 128, 512).replace(max_position_embeddings=256)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        DENSE_152M,
        DENSE_152M.as_moe(8, 2, "moe-8x152m"),
        DENSE_1_5B,
        DENSE_1_5B.as_moe(8, 2, "moe-8x1.5b"),
        DENSE_3_7B,
        DENSE_3_7B.as_moe(8, 2, "moe-8x3.7b"),
        DENSE_13B,
        TINY_DENSE,
        TINY_DENSE.as_moe(4, 2, "tiny-moe"),
    )
}


def get_model_config(name: str) -> ModelConfig:
    """A named shape from :data:`MODEL_CONFIGS`, a YAML file with a ``model:`` section, or an HF dir."""
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name]
    path = Path(name)
    if path.is_dir():
        return ModelConfig.from_pretrained(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return model_config_from_mapping(load_yaml(path).get("model", {}), name=path.stem)
    raise UserError(f"unknown model {name!r}: expected one of {', '.join(MODEL_CONFIGS)}, a YAML file or a checkpoint dir")


def model_config_from_mapping(m: dict[str, Any] | str, name: str = "custom") -> ModelConfig:
    """``model:`` in a YAML: either a registered name, or ``{base: NAME, <field>: value, ...}``."""
    if isinstance(m, str):
        return get_model_config(m)
    m = dict(m)
    base = m.pop("base", None)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(m) - fields)
    if unknown:
        raise UserError(f"unknown model field(s) {', '.join(unknown)}")
    if base is not None:
        return get_model_config(base).replace(**m, name=m.get("name", base))
    try:
        return ModelConfig(**{"name": name, **m})
    except TypeError as e:
        raise UserError(f"incomplete model config: {e}") from None


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint directory, with the directory and file checked."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json")
    return load_json(path / "config.json")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must contain a YAML mapping at the top level")
    return data


# ============================================================================ training runs
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "num_experts", "num_experts_per_tok")


@dataclass
class TrainConfig:
    """One training run (``drop-upcycling train CONFIG.yaml``); defaults are FACTS.md §4.

    The YAML is flat: ``model`` (a registered name or ``{base: NAME, field: value}``; omitted when
    ``init`` names a checkpoint, whose config.json then defines the model), ``init``, ``data`` (a
    mapping for the data reader) and the fields below. ``steps`` defaults to the token budget
    ``train_tokens`` divided by the global batch, rounded up.
    """

    model: Any = None
    init: str | None = None  # HF checkpoint (dense or MoE) to start from; None = random init (FS)
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 4096
    global_batch_tokens: int = 512 * 4096
    micro_batch_size: int = 1
    train_tokens: int | None = None
    steps: int | None = None
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ep: int = 1
    dtype: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    out: str = "runs/train"
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    save_dtype: str = "fp32"
    tensorboard: bool = False
    nodes: int = 1  # for the dry-run plan and the run_*.sh scripts
    gpus_per_node: int = 8
    method: str | None = None  # informational: FS, NU, RNU-0.5, DU-0.5, DU-1.0, BTX, dense

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.train_tokens is None:
            raise UserError("set either steps or train_tokens")
        return -(-self.train_tokens // self.global_batch_tokens)

    def check(self) -> None:
        """Reject values that make no sense, one clear line each."""
        positive = ("seq_len", "global_batch_tokens", "micro_batch_size", "ep", "nodes", "gpus_per_node")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_tokens % self.seq_len:
            raise UserError(f"global_batch_tokens {self.global_batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.total_steps < 1:
            raise UserError(f"steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.keep_last < 1:
            raise UserError("warmup_steps and save_every must be >= 0 and keep_last >= 1")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise UserError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.save_dtype not in ("fp32", "bf16"):
            raise UserError(f"save_dtype must be fp32 or bf16, got {self.save_dtype!r}")
        if self.model is None and self.init is None:
            raise UserError("the config needs a model (name or mapping) or an init checkpoint")

    def model_config(self) -> ModelConfig:
        """The model shape: from ``init``'s config.json when given (``model`` must then agree)."""
        if self.init is None:
            return model_config_from_mapping(self.model)
        init = Path(self.init)
        if not (init / "config.json").is_file():
            raise UserError(f"init checkpoint {init} does not exist or has no config.json")
        cfg = ModelConfig.from_pretrained(init)
        if self.model is not None:
            expected = model_config_from_mapping(self.model)
            differ = [f for f in _SHAPE_FIELDS if getattr(expected, f) != getattr(cfg, f)]
            if differ:
                raise UserError(f"init checkpoint {init} does not match model {expected.name}: "
                                + ", ".join(f"{f} {getattr(cfg, f)} != {getattr(expected, f)}" for f in differ))
        return cfg

    def planned_model_config(self) -> ModelConfig:
        """The shape for a dry-run plan: ``model`` when given (``init`` may not exist yet)."""
        return model_config_from_mapping(self.model) if self.model is not None else self.model_config()

    @classmethod
    def from_mapping(cls, d: dict[str, Any]) -> TrainConfig:
        fields_ = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields_)
        if unknown:
            raise UserError(f"unknown training field(s) {', '.join(unknown)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        run = cls(**{k: _coerce(k, v, types[k]) for k, v in d.items()})
        run.check()
        return run

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        d = load_yaml(path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(d)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """YAML 1.1 reads ``2e-4`` as a string: accept numbers written that way, refuse anything else."""
    if value is None or type_name not in ("float", "int", "int | None", "bool"):
        return value
    if type_name == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if type_name == "float":
        return number
    if not number.is_integer() or isinstance(value, bool):
        raise UserError(f"{name} must be an integer, got {value!r}")
    return int(number)
