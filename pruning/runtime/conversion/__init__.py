"""Checkpoint conversion into the native transformers layout (``medpruner convert``).

:func:`convert_hulu_med` turns a Hulu-Med checkpoint in its GitHub code's layout into a native
``VideoLlama3ForConditionalGeneration`` folder: weights renamed by a table
(:mod:`~pruning.runtime.conversion.layouts`), native configs
(:mod:`~pruning.runtime.conversion.configs`), tokenizer and chat template. Problems raise
:class:`ConversionError` with one line naming what was found; nothing is left at the
destination then.
"""

from pruning.runtime.conversion.configs import native_processor_config
from pruning.runtime.conversion.hulu_med import convert_hulu_med
from pruning.runtime.conversion.layouts import LAYOUTS, ConversionError, Layout

__all__ = ["LAYOUTS", "ConversionError", "Layout", "convert_hulu_med", "native_processor_config"]
