"""The paper recipes as data: one base YAML per model size plus a method's overlay.

``recipes/configs/<size>.yaml`` (``8x152m``, ``8x1.5b``, ``8x3.7b``) holds everything the MoE phase
of one size trains with (model, data mix, batch, schedule, layout, and the authors' training semantics:
``aux_loss_scope``, ``weight_decay_1d``, ``param_dtype``, ``warmup_start_lr``, whose defaults are ours);
it loads on its own as a training config. A method's overlay holds what differs per method: ``method`` (its key, what
run.json records and the report groups by) and ``upcycle`` (the ``drop-upcycling upcycle`` options
that make its initial checkpoint; absent: random init, as FS). The overlays of the paper's methods
are rows of the method table (:func:`overlay`), so a new method needs no recipe file; a YAML file
with the same keys is an overlay too (mergekit's one file in), and may override any training key.

:func:`resolve` merges the two (mappings key by key, the overlay winning) into a :class:`Recipe`:
the training config, with ``init`` and ``out`` under the runs folder, and the upcycle options.
``recipes/common.sh`` calls the command line (``python -m drop_upcycling.recipes``), which writes the
training config to ``DIR/<size>_<method>.yaml`` and prints the shell variables the launcher reads
instead of keeping a ``case`` branch per method.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .configs import TrainConfig, load_yaml
from .errors import UserError
from .fsio import write_text
from .methods import BY_SLUG, MOE_METHODS, UPCYCLE_METHODS, Method, slugs

UPCYCLE = "upcycle"  # the overlay key of the upcycle options; every other key is a training key


def overlay(method: Method) -> dict[str, Any]:
    """A table method's overlay: ``{"method": "DU-0.5", "upcycle": {"method": "drop", "ratio": 0.5}}``.
    A method that does not start from the dense seed (FS) has no upcycling step: random init."""
    out: dict[str, Any] = {"method": method.key}
    if method.from_dense:
        ratio = {} if method.ratio is None else {"ratio": method.ratio}
        out[UPCYCLE] = {"method": method.upcycle, **ratio}
    return out


def load_overlay(arg: str) -> tuple[str, dict[str, Any]]:
    """(name, overlay) of a launcher argument: a slug of the method table, or an overlay YAML file."""
    path = Path(arg)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"overlay {path} does not exist")
        return path.stem, load_yaml(path)
    if arg not in BY_SLUG or BY_SLUG[arg].upcycle is None:
        raise UserError(f"unknown method {arg!r} (methods: {' '.join(slugs())}; or an overlay .yaml file)")
    return arg, overlay(BY_SLUG[arg])


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Recipe:
    """One method at one size: the training config and how its initial checkpoint is made."""

    name: str  # "8x1.5b_du0.5": the run folder's and the written config's name
    train: dict[str, Any]  # a training config (TrainConfig's keys)
    upcycle: dict[str, Any] | None  # drop-upcycling upcycle options; None: random init

    @property
    def upcycle_args(self) -> list[str]:
        """``["--method", "drop", "--ratio", "0.5"]``: the options as ``drop-upcycling upcycle`` flags."""
        if self.upcycle is None:
            return []
        return [a for k, v in self.upcycle.items() for a in (f"--{k.replace('_', '-')}", str(v))]

    @property
    def branches(self) -> bool:
        """Whether its upcycling reads the dense seed's domain branches too (BTX: ``--sources``)."""
        return self.upcycle is not None and any(
            m.branches for m in MOE_METHODS if m.upcycle == self.upcycle["method"])


def _check_upcycle(options: Any, source: str) -> dict[str, Any]:
    """The overlay's ``upcycle`` mapping, refused with one line when it cannot be an upcycle call."""
    if not isinstance(options, Mapping) or "method" not in options:
        raise UserError(f"{source}: {UPCYCLE} must be a mapping with a method, got {options!r}")
    if options["method"] not in UPCYCLE_METHODS:
        raise UserError(f"{source}: {UPCYCLE}.method must be one of {', '.join(UPCYCLE_METHODS)}, "
                        f"got {options['method']!r}")
    # UpcycleOptions is the one list of upcycle options; imported here because it brings torch.
    from dataclasses import fields

    from .upcycle import UpcycleOptions

    known = {f.name for f in fields(UpcycleOptions)}
    unknown = sorted(set(options) - known, key=str)
    if unknown:
        raise UserError(f"{source}: unknown {UPCYCLE} option(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(known))})")
    return dict(options)


def parse_weights(spec: str) -> dict[str, float]:
    """``"ja=0.5,en=0.4,code=0.1"`` (``DATA_WEIGHTS``) -> ``{"ja": 0.5, "en": 0.4, "code": 0.1}``."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        domain, sep, value = item.partition("=")
        try:
            weight = float(value) if sep and domain.strip() else None
        except ValueError:
            weight = None
        if weight is None:
            raise UserError(f"data weights must be DOMAIN=WEIGHT,... (e.g. ja=0.5,en=0.4,code=0.1), got {spec!r}")
        weights[domain.strip()] = weight
    return weights


def resolve(base: str | Path, method: str, runs: str = "runs", data: str | None = None,
            weights: dict[str, float] | None = None) -> Recipe:
    """Merge the size's base YAML with a method's overlay (a table slug or a YAML file), checked.

    ``data`` (``DATA=DIR`` of the launchers) replaces the base's ``data:`` with token shards built by
    ``drop-upcycling data tokenize``, mixed by ``weights`` (default: the domains' sizes): the base's
    weights name the built-in corpus's domains, which the shards need not have.
    """
    base = Path(base)
    slug, over = load_overlay(method)
    name = f"{base.stem}_{slug}"
    merged = merge(load_yaml(base), over)
    if weights and not data:
        raise UserError("data weights apply to shards (DATA=DIR / --data)")
    if data:
        merged["data"] = {"shards": str(data), **({"weights": dict(weights)} if weights else {})}
    upcycle = merged.pop(UPCYCLE, None)
    source = f"{base} + {method}"
    if upcycle is not None:
        upcycle = _check_upcycle(upcycle, source)
    head = {"method": merged.pop("method", None), "init": f"{runs}/upcycled/{name}" if upcycle else None}
    train = {**head, **merged, "out": f"{runs}/{name}"}
    TrainConfig.from_mapping(train, source=source)  # every training key and value checked now, not at launch
    return Recipe(name, train, upcycle)


def check_shards(recipe: Recipe, dense: str | Path | None) -> None:
    """Refuse, before anything runs, shards the recipe's model cannot train on (see
    :meth:`~drop_upcycling.data.TokenShards.check_fits`): the upcycled methods start from the dense
    seed ``dense`` (when it exists), so its tokenizer must be the shards'."""
    from .data import TokenShards

    data = recipe.train["data"]
    shards = TokenShards.load(data["shards"])
    weights = data.get("weights")
    files = shards.files_by_domain(data.get("split", "train"), list(weights) if weights else None)
    seed = dense if recipe.upcycle is not None and dense and (Path(dense) / "config.json").is_file() else None
    vocab = TrainConfig.from_mapping(recipe.train).planned_model_config().vocab_size
    shards.check_fits(vocab, seed, files)


def write(recipe: Recipe, folder: str | Path, sources: str = "") -> Path:
    """Write the recipe's training config to ``folder/<name>.yaml`` (atomically) and return the path."""
    path = Path(folder) / f"{recipe.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {recipe.name}: generated by python -m drop_upcycling.recipes from {sources}; edit those.\n"
    return write_text(path, header + yaml.safe_dump(recipe.train, sort_keys=False))


def shell_variables(recipe: Recipe, config: Path) -> str:
    """The ``RECIPE_*`` assignments recipes/common.sh evaluates, every value shell-quoted."""
    values = {"RECIPE_NAME": recipe.name, "RECIPE_METHOD": recipe.train.get("method") or recipe.name,
              "RECIPE_CONFIG": str(config), "RECIPE_INIT": recipe.train["init"] or "",
              "RECIPE_BRANCHES": str(int(recipe.branches)), "RECIPE_NODES": str(recipe.train.get("nodes", 1))}
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    lines.append(f"RECIPE_UPCYCLE=({' '.join(shlex.quote(a) for a in recipe.upcycle_args)})")
    return "\n".join(lines)


# ============================================================================ CLI (for recipes/common.sh)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drop_upcycling.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", type=Path, help="the size's base YAML (recipes/configs/<size>.yaml)")
    parser.add_argument("methods", nargs="*", metavar="METHOD",
                        help="a slug of the method table or an overlay YAML file")
    parser.add_argument("--list", action="store_true", help="print the table's method slugs and exit")
    parser.add_argument("--runs", default="runs", help="runs folder: init = RUNS/upcycled/NAME, out = RUNS/NAME")
    parser.add_argument("--write-dir", type=Path, default=None,
                        help="write DIR/NAME.yaml and print the shell variables (one METHOD); "
                             "without it, only check every METHOD")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="train on these shards (drop-upcycling data tokenize) instead of the base's data")
    parser.add_argument("--data-weights", default=None, metavar="D=W,...",
                        help="their domain mix, e.g. ja=0.5,en=0.4,code=0.1 (default: the domains' sizes)")
    parser.add_argument("--check-shards", action="store_true",
                        help="with --data: check that every METHOD's model can train on the shards (vocabulary, "
                             "and the tokenizer of --dense for the methods upcycled from it)")
    parser.add_argument("--dense", default=None, metavar="CKPT", help="the dense seed, for --check-shards")
    args = parser.parse_args(argv)
    if args.list:
        print(" ".join(slugs()))
        return 0
    try:
        if args.base is None or not args.methods:
            raise UserError("give a base YAML and at least one METHOD (or --list)")
        weights = parse_weights(args.data_weights) if args.data_weights else None
        recipes = [resolve(args.base, m, args.runs, args.data, weights) for m in args.methods]
        if args.check_shards:
            if not args.data:
                raise UserError("--check-shards needs --data")
            for recipe in recipes:
                check_shards(recipe, args.dense)
        if args.write_dir is not None:
            if len(recipes) != 1:
                raise UserError("--write-dir takes one METHOD")
            config = write(recipes[0], args.write_dir, f"{args.base} + {args.methods[0]}")
            print(shell_variables(recipes[0], config))
    except UserError as e:
        print(f"recipes: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
