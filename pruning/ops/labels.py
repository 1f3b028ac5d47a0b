"""How configs write a number into a label (``medpruner(tau=0.9,gamma=0.05)``).

One definition for every method and slice filter, so report labels stay as they are.
"""

from __future__ import annotations


def fmt_number(value: float) -> str:
    """``value`` in its shortest general form: 0.05, 12, 1e-05.

    Args:
        value: any int or float.

    Returns:
        ``f"{value:g}"``.
    """
    return f"{value:g}"
