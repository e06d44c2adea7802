"""Model shapes (the paper's sizes plus tiny test sizes) and the YAML config loader.

One config system for the whole project: :class:`ModelConfig` describes a dense Llama or a
Mixtral-style MoE, converts to and from Hugging Face ``config.json`` (so that
``transformers.AutoModelForCausalLM`` computes exactly our function) and is what every other
module takes. Shapes are FACTS.md §3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .fsio import load_json  # the one JSON reader; configs.load_json stays importable

AUX_LOSS_MODES = ("global", "per_layer")  # ModelConfig.aux_loss_mode: how the layers' terms combine
# TrainConfig.aux_loss_scope: which tokens the balance loss's routing fractions count (see causal_lm_loss).
AUX_LOSS_SCOPES = ("global_batch", "micro_batch")
PARAM_DTYPES = ("fp32", "bf16")  # TrainConfig.param_dtype
ZERO_STAGES = (0, 1, 2)  # TrainConfig.zero_stage (drop_upcycling.sharding)


# ============================================================================ validation
@dataclass(frozen=True)
class Spec:
    """What one config key may hold, so that a bad value is one line naming the file, key and value.

    ``kind`` is ``int``, ``real``, ``bool``, ``str``, ``mapping`` or ``any``; numbers must lie in
    ``[low, high)`` (``(low, high)`` with ``open_low``); ``optional`` also allows null.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.kind in ("bool", "str", "mapping"):
            text = {"bool": "true or false", "str": "a non-empty string", "mapping": "a mapping (key: value)"}[self.kind]
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.open_low else '['}{self.low:g}, {self.high:g})"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {self.low:g}"
        return text + (" or null" if self.optional else "")


POSITIVE_INT = Spec("int", low=1)
COUNT = Spec("int", low=0)
POSITIVE = Spec("real", low=0, open_low=True)
NON_NEGATIVE = Spec("real", low=0)
FRACTION = Spec("real", low=0, high=1)
BOOL = Spec("bool")
TEXT = Spec("str")
MAPPING = Spec("mapping")


def _optional(spec: Spec) -> Spec:
    return dataclasses.replace(spec, optional=True)


def check_value(value: Any, spec: Spec, key: str, source: str | Path | None = None, *,
                numeric_strings: bool = False) -> Any:
    """``value`` if it fits ``spec`` (numbers as int or float), else a :class:`UserError`.

    ``numeric_strings`` accepts numbers written as strings: YAML 1.1 reads ``2e-4`` as one.
    """
    where = f"{source}: " if source is not None else ""

    def bad() -> UserError:
        return UserError(f"{where}{key} must be {spec.describe()}, got {value!r}")

    if value is None:
        if spec.optional:
            return None
        raise bad()
    if spec.kind == "any":
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if spec.kind == "str":
        if not isinstance(value, str) or not value:
            raise bad()
        return value
    if spec.kind == "mapping":
        if not isinstance(value, dict):
            raise bad()
        return value
    number = value
    if isinstance(value, str) and numeric_strings:
        try:
            number = float(value)
        except ValueError:
            raise bad() from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise bad()
    if spec.kind == "int":
        if not float(number).is_integer() or (isinstance(value, float) and not numeric_strings):
            raise bad()
        number = int(number)
    else:
        number = float(number)
    if spec.low is not None and (number < spec.low or (spec.open_low and number == spec.low)):
        raise bad()
    if spec.high is not None and number >= spec.high:
        raise bad()
    return number


def check_fields(d: dict[str, Any], specs: dict[str, Spec], source: str | Path | None = None, *, prefix: str = "",
                 numeric_strings: bool = False, unknown: str | None = None) -> dict[str, Any]:
    """Check the keys of ``d`` that ``specs`` names; returns ``d`` with numbers normalized.

    ``unknown`` (a noun such as "model field") refuses keys that ``specs`` does not name.
    """
    if unknown is not None:
        extra = sorted(set(d) - set(specs), key=str)
        if extra:
            where = f"{source}: " if source is not None else ""
            raise UserError(f"{where}unknown {unknown}(s) {', '.join(f'{prefix}{k}' for k in extra)} "
                            f"(known: {', '.join(specs)})")
    return {k: check_value(v, specs[k], prefix + k, source, numeric_strings=numeric_strings) if k in specs else v
            for k, v in d.items()}


# ModelConfig fields (a YAML ``model:`` mapping) and the HF config.json keys they are read from.
MODEL_SPECS: dict[str, Spec] = {
    "vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "intermediate_size": POSITIVE_INT,
    "num_hidden_layers": POSITIVE_INT, "num_attention_heads": POSITIVE_INT, "num_key_value_heads": POSITIVE_INT,
    "num_experts": COUNT, "num_experts_per_tok": POSITIVE_INT, "max_position_embeddings": POSITIVE_INT,
    "rope_theta": POSITIVE, "rms_norm_eps": POSITIVE, "tie_word_embeddings": BOOL, "initializer_range": POSITIVE,
    "router_aux_loss_coef": NON_NEGATIVE, "router_z_loss_coef": NON_NEGATIVE, "aux_loss_mode": TEXT,
    "bos_token_id": _optional(COUNT), "eos_token_id": _optional(COUNT), "name": TEXT,
}
HF_SPECS: dict[str, Spec] = {
    **{k: MODEL_SPECS[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_experts_per_tok", "max_position_embeddings",
                                   "rope_theta", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
                                   "router_aux_loss_coef", "bos_token_id")},
    "model_type": TEXT, "num_key_value_heads": _optional(POSITIVE_INT), "num_local_experts": POSITIVE_INT,
    "head_dim": _optional(POSITIVE_INT), "sliding_window": _optional(COUNT), "hidden_act": TEXT,
    "attention_bias": BOOL, "mlp_bias": BOOL, "rope_parameters": _optional(MAPPING),
    "rope_scaling": _optional(MAPPING), "drop_upcycling": _optional(MAPPING),
}
HF_EXTRA_SPECS: dict[str, Spec] = {"aux_loss_mode": TEXT, "router_z_loss_coef": NON_NEGATIVE}


def check_hf_config(d: Any, source: str | Path) -> dict[str, Any]:
    """Types and ranges of the ``config.json`` keys this project reads (others are transformers' own).

    Run where a config is read, so that a bad value is one line naming the file, the key and the
    value, never a traceback from the arithmetic that uses it.
    """
    if not isinstance(d, dict):
        raise UserError(f"{source} must hold a JSON object, got {type(d).__name__}")
    check_fields(d, HF_SPECS, source)
    eos = d.get("eos_token_id")
    for i, token in enumerate(eos if isinstance(eos, list) else [eos]):
        check_value(token, _optional(COUNT), f"eos_token_id[{i}]" if isinstance(eos, list) else "eos_token_id", source)
    check_value((d.get("rope_parameters") or {}).get("rope_theta"), _optional(POSITIVE), "rope_parameters.rope_theta",
                source)
    check_fields(d.get("drop_upcycling") or {}, HF_EXTRA_SPECS, source, prefix="drop_upcycling.",
                 unknown="drop_upcycling key")
    return d


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
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom", source: str | Path | None = None) -> ModelConfig:
        """Read a Llama or Mixtral ``config.json``; anything else is refused with a clear message.

        ``source`` (the file) names where a bad value came from; every key is checked by
        :func:`check_hf_config` before it is used.
        """
        source = source if source is not None else f"the config of {name}"
        d = check_hf_config(d, source)
        arch = d.get("model_type")
        if arch not in ("llama", "mixtral"):
            raise UserError(f"{source}: unsupported architecture {arch!r}: expected a Llama (dense) or Mixtral (MoE) config")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}")
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        for key, value in (("rope_scaling", d.get("rope_scaling") or {}), ("rope_parameters", rope)):
            kind = value.get("rope_type", value.get("type", "default"))
            if kind not in ("default", None):
                raise UserError(f"{source}: {key} {kind!r}: rope scaling is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (SwiGLU needs silu)")
        biased = [k for k in ("attention_bias", "mlp_bias") if d.get(k)]
        if biased:
            raise UserError(f"{source}: {', '.join(biased)} true is not supported (Llama/Mixtral have no biases)")
        if arch == "mixtral" and d.get("sliding_window") not in (None, 0) and d["sliding_window"] < d.get(
            "max_position_embeddings", 4096
        ):
            raise UserError(f"{source}: sliding-window attention ({d['sliding_window']}) is not supported")
        extra = d.get("drop_upcycling") or {}
        head_dim = d.get("head_dim")
        if head_dim not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise UserError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
        fields = dict(
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
        try:
            return cls(**fields)
        except UserError as e:  # values that do not fit together (heads, top-k)
            raise UserError(f"{source}: {e}") from None

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
        return model_config_from_mapping(load_yaml(path).get("model", {}), name=path.stem, source=path)
    raise UserError(f"unknown model {name!r}: expected one of {', '.join(MODEL_CONFIGS)}, a YAML file or a checkpoint dir")


def model_config_from_mapping(m: dict[str, Any] | str, name: str = "custom", source: str | Path | None = None,
                              key: str = "model") -> ModelConfig:
    """``model:`` in a YAML: either a registered name, or ``{base: NAME, <field>: value, ...}``.

    ``source`` (the YAML file) and ``key`` name where a bad value came from.
    """
    m = check_model_spec(m, source, key)
    where = f"{source}: " if source is not None else ""
    try:
        if isinstance(m, str):
            return get_model_config(m)
        m = dict(m)
        base = m.pop("base", None)
        if base is not None:
            return get_model_config(base).replace(**m, name=m.get("name", base))
        return ModelConfig(**{"name": name, **m})
    except TypeError as e:
        raise UserError(f"{where}incomplete model config: {e}") from None
    except UserError as e:  # an unknown base, or fields that do not fit together (heads, top-k)
        if source is None:
            raise
        raise UserError(f"{where}{e}") from None


def check_model_spec(m: Any, source: str | Path | None = None, key: str = "model") -> str | dict[str, Any]:
    """``model:`` of a YAML checked without resolving it (a checkpoint it names may not exist yet):
    a name or path, or a mapping of ModelConfig fields (and ``base``) with values of the right type."""
    if isinstance(m, str) and m:
        return m
    if not isinstance(m, dict):
        where = f"{source}: " if source is not None else ""
        raise UserError(f"{where}{key} must be a model name, a path or a mapping of model fields, got {m!r}")
    return check_fields(m, {"base": TEXT, **MODEL_SPECS}, source, prefix=f"{key}.", numeric_strings=True,
                        unknown="model field")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint directory, with the directory, the file and its values checked.

    This is where every checkpoint's config is read, so every check of :meth:`ModelConfig.from_hf_dict`
    (types, ranges, supported features, consistent shapes) runs here, with the file named in the error.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json")
    config = load_json(path / "config.json")
    ModelConfig.from_hf_dict(config, name=path.name, source=path / "config.json")
    return config


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
    # AdamW's implementation: "loop" (torch's per-tensor loop, the reference) or "fused" (torch's fused
    # kernel: one pass per tensor instead of about ten, 3x faster on CPU; equal to the loop to fp32
    # rounding, not bitwise, hence a choice; the CPU study uses it, see drop_upcycling.smoke).
    adamw_impl: str = "loop"
    # The authors' training semantics (moe-recipes: HF Mixtral + DeepSpeed) as named options. The defaults
    # are this project's own choices, which the CPU study uses; the paper recipes set the authors' values.
    # Routing fractions of the balance loss: "global_batch" pools them over the data ranks (the loss of the
    # ranks' concatenated micro-batches), "micro_batch" counts each rank's micro-batch alone (HF Mixtral's
    # load_balancing_loss_func per forward, as moe-recipes trains).
    aux_loss_scope: str = "global_batch"
    # Weight decay on 1-D parameters (the RMSNorm weights): false exempts them (HF Trainer, Megatron);
    # true decays every parameter (moe-recipes: torch AdamW over model.parameters()).
    weight_decay_1d: bool = False
    # Weights held in fp32, or in bf16 with an fp32 master copy that AdamW updates (DeepSpeed bf16).
    param_dtype: str = "fp32"
    # First warmup lr: None warms up from lr / warmup_steps at step 0 (reaching lr at step warmup_steps - 1);
    # a value v starts at v and reaches lr at step warmup_steps (moe-recipes' WarmupCosineAnnealingLR, v = min_lr).
    warmup_start_lr: float | None = None
    # Memory (drop_upcycling.sharding; the plan: drop_upcycling.memory). zero_stage: what data parallelism
    # replicates, sharded over the ranks that replicate it: 0 nothing (every rank holds the AdamW moments and
    # fp32 weights of all it holds), 1 the AdamW moments and fp32 weights, 2 also the summed gradients.
    # The same function to fp32 rounding; checkpoints then hold each rank's shard.
    zero_stage: int = 0
    # Recompute each decoder layer in the backward (torch.utils.checkpoint, non-reentrant): the forward
    # keeps only the layers' inputs, for a second forward's compute. The same function.
    activation_checkpointing: bool = False
    # torch.compile each decoder layer and the cross-entropy (drop_upcycling.model.compile_for_training):
    # inductor fuses the elementwise work around the matmuls (norms, RoPE, routing, the experts' SwiGLU,
    # the log-softmax) that bounds a small model's step on CPU. The same function to fp32 rounding, not
    # bitwise (fused kernels round differently), hence a choice; the CPU study uses it. On CPU it needs a
    # C++ compiler (g++ or clang++) and compiles for ~10-30 s at the first step of each shape.
    compile: bool = False
    ep: int = 1
    dtype: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU (bf16 wherever param_dtype is bf16)
    out: str = "runs/train"
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    save_dtype: str = "fp32"
    tensorboard: bool = False
    nodes: int = 1  # for the dry-run plan and the run_*.sh scripts
    gpus_per_node: int = 8
    method: str | None = None  # informational: FS, NU, RNU-0.5, DU-0.5, DU-1.0, BTX, dense
    # Held-out evaluation (drop_upcycling.heldout): every this many tokens (0 = never), on the first
    # heldout_sequences windows of seq_len tokens of each domain's test split -> OUT/heldout.jsonl.
    heldout_every_tokens: int = 0
    heldout_sequences: int = 32

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.train_tokens is None:
            raise UserError("set either steps or train_tokens")
        return -(-self.train_tokens // self.global_batch_tokens)

    def check(self) -> None:
        """Reject combinations that make no sense, one clear line each (single values: :data:`TRAIN_SPECS`)."""
        if self.global_batch_tokens % self.seq_len:
            raise UserError(f"global_batch_tokens {self.global_batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.total_steps < 1:
            raise UserError(f"steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise UserError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.adamw_impl not in ADAMW_IMPLS:
            raise UserError(f"adamw_impl must be {' or '.join(ADAMW_IMPLS)}, got {self.adamw_impl!r}")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise UserError(f"aux_loss_scope must be {' or '.join(AUX_LOSS_SCOPES)}, got {self.aux_loss_scope!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise UserError(f"param_dtype must be {' or '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.param_dtype == "bf16" and self.dtype == "fp32":
            raise UserError("param_dtype bf16 computes in bf16: set dtype to bf16 or auto, not fp32")
        if self.zero_stage not in ZERO_STAGES:
            raise UserError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage!r}")
        if self.compile and self.activation_checkpointing:
            raise UserError("compile and activation_checkpointing cannot be combined yet: set one of them to false")
        if self.warmup_start_lr is not None and self.warmup_start_lr > self.lr:
            raise UserError(f"need warmup_start_lr <= lr, got warmup_start_lr={self.warmup_start_lr}, lr={self.lr}")
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
    def from_mapping(cls, d: dict[str, Any], source: str | Path | None = None,
                     overridden: Iterable[str] = ()) -> TrainConfig:
        """A checked run: every value's type and range (:data:`TRAIN_SPECS`), then :meth:`check`.

        ``source`` (the YAML file) prefixes each error; keys in ``overridden`` came from the command line.
        """
        where = f"{source}: " if source is not None else ""
        unknown = sorted(set(d) - set(TRAIN_SPECS), key=str)
        if unknown:
            raise UserError(f"{where}unknown training field(s) {', '.join(map(str, unknown))}")
        overridden = set(overridden)
        values = {k: check_value(v, TRAIN_SPECS[k], k, "command line" if k in overridden else source,
                                 numeric_strings=True) for k, v in d.items()}
        if values.get("model") is not None:
            values["model"] = check_model_spec(values["model"], source)
        if values.get("data") is not None:
            values["data"] = check_fields(values["data"], DATA_SPECS, source, prefix="data.", numeric_strings=True,
                                          unknown="data field")
            for domain, weight in (values["data"].get("weights") or {}).items():
                check_value(weight, NON_NEGATIVE, f"data.weights.{domain}", source, numeric_strings=True)
            if values["data"].get("shards") is not None:
                clash = [f"data.{k}" for k in CORPUS_DATA_FIELDS if values["data"].get(k) is not None]
                if clash:
                    raise UserError(f"{where}data.shards reads shards built by `drop-upcycling data tokenize`; "
                                    f"{', '.join(clash)} belong to the built-in corpus: give one or the other")
        run = cls(**values)
        try:
            run.check()
        except UserError as e:
            raise UserError(f"{where}{e}") from None
        return run

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        d = load_yaml(path)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_mapping({**d, **given}, source=path, overridden=given)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ADAMW_IMPLS = ("loop", "fused")  # TrainConfig.adamw_impl
# Types and ranges of a training YAML's keys (TrainConfig's fields) and of its ``data:`` mapping.
TRAIN_SPECS: dict[str, Spec] = {
    "model": Spec("any", optional=True), "init": _optional(TEXT), "seed": COUNT, "data": MAPPING,
    "seq_len": POSITIVE_INT, "global_batch_tokens": POSITIVE_INT, "micro_batch_size": POSITIVE_INT,
    "train_tokens": _optional(POSITIVE_INT), "steps": _optional(POSITIVE_INT), "lr": POSITIVE, "min_lr": NON_NEGATIVE,
    "warmup_steps": COUNT, "beta1": FRACTION, "beta2": FRACTION, "eps": POSITIVE, "weight_decay": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE, "ep": POSITIVE_INT, "dtype": TEXT, "out": TEXT, "save_every": COUNT,
    "keep_last": POSITIVE_INT, "save_dtype": TEXT, "tensorboard": BOOL, "nodes": POSITIVE_INT,
    "gpus_per_node": POSITIVE_INT, "method": _optional(TEXT), "adamw_impl": TEXT,
    "aux_loss_scope": TEXT, "weight_decay_1d": BOOL, "param_dtype": TEXT, "warmup_start_lr": _optional(NON_NEGATIVE),
    "zero_stage": COUNT, "activation_checkpointing": BOOL, "compile": BOOL,
    "heldout_every_tokens": COUNT, "heldout_sequences": POSITIVE_INT,
}
# ``data:`` reads either token shards built by ``drop-upcycling data tokenize`` (``shards``, checked
# against their manifest) or the built-in corpus, prepared on first use (CORPUS_DATA_FIELDS); both take
# ``weights`` (the domain mix; default: the domains' sizes) and ``split``.
DATA_SPECS: dict[str, Spec] = {
    "shards": _optional(TEXT),
    "corpus": _optional(TEXT), "pinned": BOOL, "cache_dir": _optional(TEXT), "vocab_size": POSITIVE_INT,
    "weights": _optional(MAPPING), "split": TEXT, "seed": COUNT, "max_docs_per_domain": _optional(POSITIVE_INT),
}
CORPUS_DATA_FIELDS = ("corpus", "pinned", "cache_dir", "vocab_size", "seed", "max_docs_per_domain")
