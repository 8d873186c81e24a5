"""Publish variable-depth HBLL checkpoints on the Hugging Face Hub, with a rendered model card.

``push_to_hub`` saves the checkpoint locally first, renders ``README.md`` from
``model_cards/hbll_model_card.md`` (a ``model-index`` with one metric per depth, how to
load each depth, the training setup), optionally exports every level cut as a stock
model under ``cuts/depth{ℓ}/``, and uploads everything in one commit. If the upload
fails, the local directory stays and the error names it with the server's message.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

if TYPE_CHECKING:
    from hbll_hf.modeling import HBLLPreTrainedModel

__all__ = ["HubPushError", "push_to_hub", "render_model_card", "MODEL_CARD_TEMPLATE"]

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "hbll_model_card.md"
CUTS_FOLDER = "cuts"

TASKS = {
    "causal_lm": ("text-generation", "Causal language modeling", "perplexity", "CausalLM"),
    "sequence_classification": ("text-classification", "Text classification", "accuracy", "SequenceClassification"),
}


class HubPushError(RuntimeError):
    """An upload that failed; ``save_directory`` still contains the complete checkpoint."""

    def __init__(self, message: str, save_directory: Path) -> None:
        super().__init__(message)
        self.save_directory = save_directory


def _template() -> string.Template:
    if not MODEL_CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"the model card template {MODEL_CARD_TEMPLATE} is missing; reinstall hbll from its source tree")
    return string.Template(MODEL_CARD_TEMPLATE.read_text())


def _cut_parameters(model: "HBLLPreTrainedModel", depth: int) -> int:
    hbll = model.hbll
    modules = [hbll.stem, hbll.head, *(hbll.node_module(node) for node in model.tree.level_cut(depth))]
    unique = {id(p): p.numel() for module in modules for p in module.parameters()}
    return sum(unique.values())


def render_model_card(
    model: "HBLLPreTrainedModel",
    repo_id: str,
    dataset_name: Optional[str] = None,
    tags: Optional[list[str]] = None,
    export_cuts: bool = False,
) -> str:
    """Render the model card of an HBLL checkpoint: metadata with ``model-index`` and the per-depth table.

    The metrics come from ``model.config.training["eval"]``, which ``HBLLTrainer.evaluate``
    fills; depths without a measured value get no ``model-index`` entry.
    """
    if model.is_cut:
        raise ValueError("render the model card from the whole tree, not from one loaded cut")
    config, tree = model.config, model.tree
    task = config.arch.task
    if task not in TASKS:
        raise ValueError(f"model cards cover causal LMs and sequence classifiers, got task {task!r}")
    pipeline_tag, task_name, metric, auto_suffix = TASKS[task]
    evaluation = config.training.get("eval", {})
    stock_type = config.stock_config.get("architectures", [config.stock_config.get("model_type", "transformers")])[0]

    rows, metrics = [], []
    for depth in range(tree.depth + 1):
        layers = len(tree.level_cut(depth))
        value = evaluation.get(f"eval_depth{depth}_{metric}")
        shown = "not measured" if value is None else f"{value:.4g}"
        layer_text = f"{layers} layer" if layers == 1 else f"{layers} layers"
        shown_layers = f"{layers} (full network)" if depth == tree.depth else str(layers)
        rows.append(f"| {depth} | {shown_layers} | {_cut_parameters(model, depth):,} | {shown} |")
        if value is not None:
            metrics.append({"type": metric, "value": round(float(value), 4), "name": f"{metric.capitalize()} at depth {depth} ({layer_text})"})

    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "tags": sorted({"hbll", "variable-depth", "block-local-learning", *(tags or [])}),
    }
    if dataset_name:
        metadata["datasets"] = [dataset_name]
    if metrics:
        dataset = {"name": dataset_name or "evaluation split", "type": dataset_name or "custom"}
        metadata["model-index"] = [
            {"name": repo_id.split("/")[-1], "results": [{"task": {"type": pipeline_tag, "name": task_name}, "dataset": dataset, "metrics": metrics}]}
        ]

    training = {key: value for key, value in config.training.items() if key != "eval"}
    training_rows = "\n".join(f"- `{key}`: {value}" for key, value in sorted(training.items())) or "- not recorded"
    stock_section = ""
    if export_cuts:
        stock_section = (
            f"\nEvery level cut is also stored as a stock `{stock_type}` under `{CUTS_FOLDER}/depth<ℓ>/`, which loads "
            "with plain transformers and no custom code:\n\n```python\n"
            f"from transformers import AutoModelFor{auto_suffix}\n\n"
            f'model = AutoModelFor{auto_suffix}.from_pretrained("{repo_id}", subfolder="{CUTS_FOLDER}/depth{max(tree.depth - 1, 0)}")\n```\n'
        )
    results_note = (
        "Metrics are on the evaluation split of the last `HBLLTrainer.evaluate` run."
        if metrics
        else "No evaluation was recorded; run `HBLLTrainer.evaluate` before pushing to fill this table."
    )
    return _template().substitute(
        metadata=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(),
        model_name=repo_id.split("/")[-1],
        task_title=task_name.lower(),
        num_blocks=tree.num_blocks,
        stock_type=stock_type,
        metric_title=metric,
        depth_rows="\n".join(rows),
        results_note=results_note,
        auto_suffix=auto_suffix,
        repo_id=repo_id,
        example_depth=max(tree.depth - 1, 0),
        stock_section=stock_section,
        training_rows=training_rows,
    )


def push_to_hub(
    model: "HBLLPreTrainedModel",
    repo_id: str,
    *,
    save_directory: Optional[str | Path] = None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload variable-depth HBLL checkpoint",
    export_cuts: bool = False,
    dataset_name: Optional[str] = None,
    tags: Optional[list[str]] = None,
    **unused: Any,
) -> Any:
    """Save ``model`` with its model card and upload it to ``repo_id`` in one commit.

    Args:
        save_directory: where the checkpoint is written first; a new temporary directory
            when None. After a failed upload it stays, and ``HubPushError`` names it.
        revision: a branch; it is created from ``main`` when missing.
        export_cuts: also upload every level cut as a stock model under ``cuts/depth{ℓ}/``.
        dataset_name, tags: model card metadata.

    Returns the ``CommitInfo`` of the upload.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(save_directory) if save_directory is not None else Path(tempfile.mkdtemp(prefix="hbll-push-"))
    model.save_pretrained(directory)
    (directory / "README.md").write_text(render_model_card(model, repo_id, dataset_name, tags, export_cuts))
    if export_cuts:
        for depth in range(model.tree.depth + 1):
            model.export_cut(depth=depth, save_directory=directory / CUTS_FOLDER / f"depth{depth}")

    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(directory).as_posix(), path_or_fileobj=str(path))
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no response"
        reason = error.server_message or str(error)
        raise HubPushError(
            f"pushing {repo_id} failed (HTTP {status}): {reason}. The checkpoint is intact in {directory}; "
            "fix the cause and call push_to_hub again with save_directory pointing there",
            directory,
        ) from error
