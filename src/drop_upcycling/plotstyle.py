"""The one plot style of the project: palette, method and domain names, and how figures are saved.

Every figure (routing, loss curves, FLOPs) goes through this module so that a method has the same
name and colour everywhere and a reader can tell the methods apart without colour vision: the
palette is Okabe-Ito (Okabe & Ito 2008, "Color Universal Design"), each method also has its own
line style and marker, and labels say what the axis measures and in which unit.

Method keys are the short names used in run and model names ("NU", "DU-0.5", "RNU-0.5", "FS",
"BTX", "dense"); :func:`method_key` extracts them from names such as ``DU-0.5-8x1.5B``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from .errors import UserError
from .fsio import atomic_file

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


# Fixed methods of the paper. DU-r and RNU-r for other ratios are derived in :func:`method_style`.
METHODS: dict[str, Style] = {
    "dense": Style("dense", OKABE_ITO["black"], "--", "s"),
    "FS": Style("from scratch (FS)", OKABE_ITO["orange"], "-", "v"),
    "NU": Style("naive upcycling (NU)", OKABE_ITO["sky_blue"], "-", "o"),
    "RNU-0.5": Style("noise upcycling (RNU-0.5)", OKABE_ITO["bluish_green"], "-.", "D"),
    "DU-0.5": Style("Drop-Upcycling r=0.5 (DU-0.5)", OKABE_ITO["vermillion"], "-", "^"),
    "DU-1.0": Style("Drop-Upcycling r=1.0 (DU-1.0)", OKABE_ITO["reddish_purple"], ":", "P"),
    "BTX": Style("Branch-Train-MiX (BTX)", OKABE_ITO["blue"], (0, (5, 1)), "X"),  # type: ignore[arg-type]
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
_RATIO_METHOD = re.compile(r"^(DU|RNU)-(\d+(?:\.\d+)?)")
# Also the label slugs of the smoke recipe: ``du0.5-s1`` is DU-0.5, ``rnu0.5`` is RNU-0.5.
_KEY = re.compile(r"^(dense|FS|NU|BTX|(?:DU|RNU)-?\d+(?:\.\d+)?)(?=$|[-_ ])", re.IGNORECASE)


def method_key(name: str) -> str:
    """The method part of a model or run name: ``DU-0.5-8x1.5B`` and ``du0.5-s1`` -> ``DU-0.5``;
    unknown names unchanged."""
    m = _KEY.match(name)
    if m is None:
        return name
    key = m.group(1)
    return "dense" if key.lower() == "dense" else re.sub(r"^(DU|RNU)(?=\d)", r"\1-", key.upper())


def method_style(name: str) -> Style:
    """Label, colour, line style and marker of a method key or model name (unknown names get grey)."""
    key = method_key(name)
    if key in METHODS:
        return METHODS[key]
    m = _RATIO_METHOD.match(key)
    if m is not None:
        kind, ratio = m.group(1), m.group(2)
        base = "Drop-Upcycling" if kind == "DU" else "noise upcycling"
        ref = METHODS["DU-0.5" if kind == "DU" else "RNU-0.5"]
        return Style(f"{base} r={ratio} ({key})", _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)],
                     ref.linestyle, ref.marker)
    return Style(name, OKABE_ITO["grey"], "-", "o")


def method_label(name: str) -> str:
    """Both names of a method, e.g. ``naive upcycling (NU)``; a model name keeps its size suffix."""
    key = method_key(name)
    label = method_style(key).label
    m = _KEY.match(name)
    rest = name[m.end():].lstrip("-_ ") if m is not None else ""
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
