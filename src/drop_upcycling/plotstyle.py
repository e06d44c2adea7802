"""The one plot style of the project: palette, method and domain names, and how figures are saved.

Every figure (routing, loss curves, FLOPs) goes through this module so that a method has the same
name and colour everywhere and a reader can tell the methods apart without colour vision: the
palette is Okabe-Ito (Okabe & Ito 2008, "Color Universal Design"), each method also has its own
line style and marker, and labels say what the axis measures and in which unit.

Method keys are the short names used in run and model names ("NU", "DU-0.5", "RNU-0.5", "FS",
"BTX", "dense"); :func:`method_key` extracts them from names such as ``DU-0.5-8x1.5B``. A method's
label, colour (by name in :data:`OKABE_ITO`), line style and marker are columns of the method table,
:data:`drop_upcycling.methods.METHODS`; this module turns them into :class:`Style`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from . import methods
from .errors import UserError
from .fsio import atomic_file
from .methods import method_key  # importable from here too, as before

# Okabe-Ito: distinguishable under the common colour-vision deficiencies. Yellow (#F0E442) is
# left out: it is unreadable on white.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#7F7F7F",
}

FIGURE_FORMATS = ("png", "svg", "pdf")


@dataclass(frozen=True)
class Style:
    """How one method (or domain) is drawn and named."""

    label: str
    color: str
    linestyle: str = "-"
    marker: str = "o"


# The methods of the table; DU-r and RNU-r for other ratios are derived in :func:`method_style`.
METHOD_STYLES: dict[str, Style] = {
    m.key: Style(m.label, OKABE_ITO[m.color], m.linestyle, m.marker)  # type: ignore[arg-type]
    for m in methods.METHODS
}

# The routing-analysis domains (FACTS.md §6), in the paper's order.
DOMAINS: dict[str, Style] = {
    "c4": Style("C4 (English web)", OKABE_ITO["blue"]),
    "en_wikipedia": Style("English Wikipedia", OKABE_ITO["sky_blue"]),
    "ja_mc4": Style("Japanese mC4", OKABE_ITO["vermillion"]),
    "ja_wikipedia": Style("Japanese Wikipedia", OKABE_ITO["orange"]),
    "code_stack": Style("The Stack (code)", OKABE_ITO["bluish_green"]),
}

_EXTRA_COLORS = [OKABE_ITO[k] for k in ("grey", "reddish_purple", "blue", "orange", "bluish_green")]


def method_style(name: str) -> Style:
    """Label, colour, line style and marker of a method key or model name (unknown names get grey)."""
    key = method_key(name)
    if key in METHOD_STYLES:
        return METHOD_STYLES[key]
    family = methods.ratio_family(key)
    if family is not None:
        row, ratio = family
        ref = METHOD_STYLES[row.key]
        return Style(f"{row.family} r={ratio} ({key})", _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)],
                     ref.linestyle, ref.marker)
    return Style(name, OKABE_ITO["grey"], "-", "o")


def method_label(name: str) -> str:
    """Both names of a method, e.g. ``naive upcycling (NU)``; a model name keeps its size suffix."""
    key, rest = methods.split_name(name)
    label = method_style(key).label
    return f"{label}, {rest}" if rest and key != name else label


def domain_style(domain: str, index: int = 0) -> Style:
    """Label and colour of a routing domain; unknown domains cycle through the remaining colours."""
    return DOMAINS.get(domain, Style(domain, _EXTRA_COLORS[index % len(_EXTRA_COLORS)]))


def order_domains(domains: Iterable[str]) -> list[str]:
    """The paper's domain order first, then any others alphabetically."""
    present = set(domains)
    known = [d for d in DOMAINS if d in present]
    return known + sorted(present - set(known))


def apply_style() -> None:
    """Readable defaults: larger fonts, light grid, no top/right spines, tight layout on save."""
    plt.rcParams.update({
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.prop_cycle": matplotlib.cycler(color=[OKABE_ITO[k] for k in
                                                    ("blue", "vermillion", "bluish_green", "orange",
                                                     "sky_blue", "reddish_purple", "black", "grey")]),
    })


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    """``"png,svg"`` or ``["png", "pdf"]`` -> validated list; ``None`` is PNG only."""
    if formats is None:
        return ["png"]
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = [f.strip().lower().lstrip(".") for f in items if f.strip()]
    bad = [f for f in out if f not in FIGURE_FORMATS]
    if bad or not out:
        raise UserError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {', '.join(bad) or 'nothing'}")
    return list(dict.fromkeys(out))


def save_figure(fig: plt.Figure, out_dir: str | Path, stem: str,
                formats: str | Iterable[str] | None = None) -> list[Path]:
    """Write ``out_dir/stem.<fmt>`` for each format (PNG by default), atomically, and close the figure.

    Each file is written to a temporary name and renamed, so an interrupted run never leaves a
    truncated image that looks finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in parse_formats(formats):
            path = out_dir / f"{stem}.{fmt}"
            with atomic_file(path) as tmp:
                fig.savefig(tmp, format=fmt)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
