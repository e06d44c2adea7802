"""Drop-Upcycling: dense-to-MoE upcycling, expert-parallel training, evaluation and analysis."""

__version__ = "0.1.0"
