"""HuggingFace transformers integration of HBLL.

The adapters for transformers layers, ``HBLLTrainer`` and the Hub checkpoints build on
the ``hbll`` core. This package holds the helpers that exist so far.
"""

__all__: list[str] = []
