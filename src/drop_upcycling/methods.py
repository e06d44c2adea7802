"""The one table of the methods the paper compares; everything that names a method reads it.

A row says everything the project needs to know about one method: its key (``DU-0.5``, what
``run.method`` holds and what tables, legends and the report show), its slug (``du0.5``: run labels
``du0.5-s1``, recipe names ``8x1.5b_du0.5``, launcher arguments), its ``drop-upcycling upcycle``
flags, its place in tables and legends, how it is drawn, and what its cost includes. The upcycle
CLI's ``--method`` choices, the smoke job's and the paper launchers' method lists, the recipe
overlays (:mod:`drop_upcycling.recipes`), the plot style (:mod:`drop_upcycling.plotstyle`), the
loss-curve and report tables and the routing figure all derive from :data:`METHODS`.

Adding a method: a row here, and if it is a new way to build experts, its function in
:mod:`drop_upcycling.upcycle` registered under the row's ``upcycle`` name.

Kept free of torch and matplotlib: the analysis modules and the launchers import it. Colours are
names in :data:`drop_upcycling.plotstyle.OKABE_ITO`, so the palette stays in the one plot style
(which reads this table, never the other way round).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DENSE = "dense"  # the key of the dense reference run (the pre-trained dense model, continued)


@dataclass(frozen=True)
class Method:
    """One compared method (or the dense reference)."""

    key: str  # run.method, tables, legends, the report: "DU-0.5"
    slug: str  # run labels, recipe names, launcher arguments: "du0.5"
    label: str  # both names, for legends and tables: "Drop-Upcycling r=0.5 (DU-0.5)"
    order: int  # position in tables, legends and figure columns (the paper's)
    color: str  # a colour name of plotstyle.OKABE_ITO
    linestyle: str | tuple[int, tuple[int, ...]] = "-"
    marker: str = "o"
    upcycle: str | None = None  # `drop-upcycling upcycle --method`; None: not an upcycled MoE
    ratio: float | None = None  # `--ratio`; its method accepts any r in [0, 1]
    family: str = ""  # ratio methods: the name of the kind, for ratios without a row ("Drop-Upcycling")
    from_dense: bool = True  # starts from the dense seed, so its cost includes the dense pre-training
    branches: bool = False  # also from the seed's domain-continued branches (BTX), trained first

    @property
    def upcycle_args(self) -> tuple[str, ...]:
        """Its ``drop-upcycling upcycle`` flags: ``("--method", "drop", "--ratio", "0.5")``."""
        if self.upcycle is None:
            return ()
        ratio = () if self.ratio is None else ("--ratio", str(self.ratio))
        return ("--method", self.upcycle, *ratio)

    @property
    def prefix(self) -> str:
        """The key without its ratio (``DU`` of ``DU-0.5``): every ratio of the kind shares it."""
        return self.key.rpartition("-")[0] if self.ratio is not None else self.key


# In the order runs are built and launched (the smoke job, the demo, the paper launchers); ``order``
# is the paper's order for tables and legends.
METHODS: tuple[Method, ...] = (
    Method(DENSE, DENSE, "dense", 0, "black", "--", "s"),
    Method("FS", "fs", "from scratch (FS)", 1, "orange", "-", "v", upcycle="scratch", from_dense=False),
    Method("NU", "nu", "naive upcycling (NU)", 2, "sky_blue", "-", "o", upcycle="naive"),
    Method("RNU-0.5", "rnu0.5", "noise upcycling (RNU-0.5)", 3, "bluish_green", "-.", "D", upcycle="noise",
           ratio=0.5, family="noise upcycling"),
    Method("DU-0.5", "du0.5", "Drop-Upcycling r=0.5 (DU-0.5)", 5, "vermillion", "-", "^", upcycle="drop",
           ratio=0.5, family="Drop-Upcycling"),
    Method("DU-1.0", "du1.0", "Drop-Upcycling r=1.0 (DU-1.0)", 6, "reddish_purple", ":", "P", upcycle="drop",
           ratio=1.0, family="Drop-Upcycling"),
    Method("BTX", "btx", "Branch-Train-MiX (BTX)", 4, "blue", (0, (5, 1)), "X", upcycle="btx", branches=True),
)

BY_KEY: dict[str, Method] = {m.key: m for m in METHODS}
BY_SLUG: dict[str, Method] = {m.slug: m for m in METHODS}
MOE_METHODS: tuple[Method, ...] = tuple(m for m in METHODS if m.upcycle is not None)
# `drop-upcycling upcycle --method` choices, in table order: scratch, naive, noise, drop, btx.
UPCYCLE_METHODS: tuple[str, ...] = tuple(dict.fromkeys(str(m.upcycle) for m in MOE_METHODS))
# The upcycle methods that take --ratio: noise, drop.
RATIO_UPCYCLE_METHODS: tuple[str, ...] = tuple(dict.fromkeys(str(m.upcycle) for m in MOE_METHODS if m.ratio is not None))


def _alternatives(words: Iterable[str]) -> str:
    """A regex alternation of literal words, longest first (so that no word shadows a longer one)."""
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


_FIXED = {m.key.casefold(): m.key for m in METHODS if m.ratio is None}
_PREFIXES = {m.prefix.casefold(): m.prefix for m in METHODS if m.ratio is not None}
# A method key at the start of a run or model name (``du0.5-s1``, ``DU-0.5-8x1.5B``, ``nu-s0``): a key
# without ratio, or a ratio family's prefix and any ratio; then the end of the name or -, _ or space.
_NAME = re.compile(rf"^(?:(?P<fixed>{_alternatives(_FIXED.values())})|(?P<prefix>{_alternatives(_PREFIXES.values())})"
                   r"-?(?P<ratio>\d+(?:\.\d+)?))(?=$|[-_ ])", re.IGNORECASE)
_RATIO_KEY = re.compile(rf"^({_alternatives(_PREFIXES.values())})-(\d+(?:\.\d+)?)")
_ORDER: tuple[str, ...] = tuple(m.key for m in sorted(METHODS, key=lambda m: m.order))


def split_name(name: str) -> tuple[str, str]:
    """(method key, the rest) of a run or model name: ``DU-0.5-8x1.5B`` -> (``DU-0.5``, ``8x1.5B``),
    ``du0.5-s1`` -> (``DU-0.5``, ``s1``); a name without a known key -> (name, "")."""
    m = _NAME.match(name)
    if m is None:
        return name, ""
    if m.group("fixed") is not None:
        key = _FIXED[m.group("fixed").casefold()]
    else:
        key = f"{_PREFIXES[m.group('prefix').casefold()]}-{m.group('ratio')}"
    return key, name[m.end():].lstrip("-_ ")


def method_key(name: str) -> str:
    """The method part of a model or run name: ``DU-0.5-8x1.5B`` and ``du0.5-s1`` -> ``DU-0.5``;
    unknown names unchanged."""
    return split_name(name)[0]


def ratio_family(key: str) -> tuple[Method, str] | None:
    """For a ratio method without a row (``DU-0.25``): the family's first row and the ratio text."""
    m = _RATIO_KEY.match(key)
    if m is None:
        return None
    return next(row for row in METHODS if row.ratio is not None and row.prefix == m.group(1)), m.group(2)


def lookup(key: str) -> Method | None:
    """The row of a method key, or of its ratio family (``DU-0.25`` -> ``DU-0.5``'s); None if unknown."""
    if key in BY_KEY:
        return BY_KEY[key]
    family = ratio_family(key)
    return family[0] if family else None


def rank(key: str, *, dense_last: bool = False) -> int:
    """Position of a method key in tables and legends; unknown keys after every known one.
    ``dense_last``: the dense reference after the MoEs (Figure 5's columns are MoEs)."""
    order = [*(k for k in _ORDER if k != DENSE), DENSE] if dense_last else list(_ORDER)
    return order.index(key) if key in order else len(order)


def order_methods(methods: Sequence[str]) -> list[str]:
    """Distinct method keys in the paper's order, then any others alphabetically."""
    return sorted(dict.fromkeys(methods), key=lambda m: (rank(m), m))


def slugs(methods: Iterable[Method] = MOE_METHODS) -> list[str]:
    """The slugs of the MoE methods, in launch order: ``fs nu rnu0.5 du0.5 du1.0 btx``."""
    return [m.slug for m in methods]
