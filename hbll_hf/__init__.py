"""HuggingFace transformers integration of HBLL.

The adapters for transformers layers, ``HBLLTrainer`` and the Hub checkpoints build on
the ``hbll`` core. This package contains the helpers that exist so far.
"""

__all__: list[str] = []
