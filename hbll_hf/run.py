"""``hbll-hf``: train a transformers model with HBLL and with backprop on the same budget, from a YAML config.

    hbll-hf --config configs/smollm2_wikipedia.yaml [--smoke] [--output-dir DIR]

Each method of ``methods`` starts from the same weights (the pretrained checkpoint or
the same seed) and sees the same batches under the same ``TrainingArguments``. The run
writes, under ``output_dir``:

- ``report.json`` and ``report.md``: validation and test loss and perplexity of every
  level cut per method, wall time, steps and the critical path per step;
- ``perplexity.png``: test perplexity against the depth of each cut;
- ``<method>/final``: the trained checkpoint (``HBLLForCausalLM``), loadable at any depth.

Config keys: ``output_dir``, ``seed``, ``methods``, ``model`` (``pretrained: smollm2``
or ``from_config:`` a stock config dict with ``model_type``), ``data`` (``corpus``,
``tokenizer``: ``smollm2`` or ``gpt2``, ``block_size``, ``max_train_tokens``,
``max_eval_tokens``), ``training`` (``TrainingArguments`` fields) and ``hbll``
(``HBLLArguments`` fields).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
import yaml

from hbll_hf.data import lm_datasets
from hbll_hf.pretrained import gpt2_tokenizer, load_smollm2
from hbll_hf.trainer import HBLLArguments, HBLLTrainer
from hbll_lightning.plots import plot_depth_metric

__all__ = ["main", "run"]

logger = logging.getLogger("hbll_hf.run")

SMOKE = {
    "training": {"max_steps": 2, "eval_steps": 2, "logging_steps": 1},
    "data": {"max_train_tokens": 4096, "max_eval_tokens": 2048},
}


def _load_config(path: Path, smoke: bool, output_dir: Optional[str]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found; the shipped configs are in configs/")
    config = yaml.safe_load(path.read_text())
    unknown = set(config) - {"output_dir", "seed", "methods", "model", "data", "training", "hbll"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected output_dir, seed, methods, model, data, training, hbll")
    if smoke:
        for section, values in SMOKE.items():
            config.setdefault(section, {}).update(values)
    if output_dir is not None:
        config["output_dir"] = output_dir
    return config


def _tokenizer(name: str) -> Any:
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "smollm2":
        return load_smollm2()[1]
    raise ValueError(f"data.tokenizer must be 'gpt2' or 'smollm2', got {name!r}")


def _model(spec: dict, seed: int, vocab_size: int) -> transformers.PreTrainedModel:
    transformers.set_seed(seed)
    if spec.get("pretrained") == "smollm2":
        return load_smollm2()[0].train()
    if "from_config" in spec:
        values = dict(spec["from_config"])
        values.setdefault("vocab_size", vocab_size)
        config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
        return transformers.AutoModelForCausalLM.from_config(config).train()
    raise ValueError("model needs 'pretrained: smollm2' or 'from_config: {model_type: ..., ...}'")


def _depth_rows(metrics: dict, prefix: str, depth: int, tree) -> list[dict]:
    rows = []
    for level in range(depth + 1):
        loss = metrics[f"{prefix}_depth{level}_loss"]
        rows.append({"depth": level, "num_modules": len(tree.level_cut(level)), "loss": loss, "perplexity": math.exp(min(loss, 50.0))})
    return rows


def run(config: dict) -> dict:
    """Train every method of ``config`` and return the report (also written to ``output_dir``)."""
    output_dir = Path(config.get("output_dir", "outputs/hf_run"))
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = int(config.get("seed", 0))
    data_spec = dict(config.get("data", {}))
    tokenizer = _tokenizer(data_spec.pop("tokenizer", "gpt2"))
    splits = lm_datasets(tokenizer, seed=seed, **data_spec)
    report: dict[str, Any] = {
        "task": "language_modeling",
        "metric": "perplexity",
        "seed": seed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "config": config,
        "sizes": {split: len(rows) for split, rows in splits.items()},
        "methods": {},
    }
    for method in config.get("methods", ["hbll", "backprop"]):
        model = _model(config.get("model", {}), seed, len(tokenizer))
        training = {"report_to": [], "save_strategy": "no", "use_cpu": not torch.cuda.is_available(), "seed": seed, **config.get("training", {})}
        args = transformers.TrainingArguments(str(output_dir / method), **training)
        hbll_args = HBLLArguments(method=method, **config.get("hbll", {}))
        trainer = HBLLTrainer(
            model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"], hbll_args=hbll_args
        )
        logger.info("%s: %d blocks, %d training blocks of %d tokens", method, trainer.model.config.num_blocks, len(splits["train"]), len(splits["train"][0]["input_ids"]))
        start = time.perf_counter()
        trainer.train()
        wall_time = time.perf_counter() - start
        tree, depth = trainer.model.tree, trainer.model.tree.depth
        val = trainer.evaluate(splits["validation"], metric_key_prefix="eval")
        test = trainer.evaluate(splits["test"], metric_key_prefix="test")
        trainer.model.config.training["eval"] = val
        trainer.save_model(str(output_dir / method / "final"))
        report["methods"][method] = {
            "val": _depth_rows(val, "eval", depth, tree),
            "test": _depth_rows(test, "test", depth, tree),
            "wall_time_s": round(wall_time, 1),
            "steps": trainer.state.global_step,
            "tokens": trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * len(splits["train"][0]["input_ids"]),
            "critical_path_per_step": getattr(trainer, "_last_critical_path", None),
            "num_blocks": tree.num_blocks,
        }
        del trainer, model
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(render_report(report))
    plot_depth_metric(report, output_dir / "perplexity.png")
    print(render_report(report))
    print(f"Results in {output_dir}")
    return report


def render_report(report: dict) -> str:
    """Render the per-depth perplexities and the run facts as Markdown tables."""
    methods = list(report["methods"])
    first = report["methods"][methods[0]]
    header = "| level cut (layers) | " + " | ".join(f"{m} val ppl | {m} test ppl" for m in methods) + " |"
    lines = [header, "|---|" + "---|---|" * len(methods)]
    for row_index, row in enumerate(first["val"]):
        cells = []
        for method in methods:
            result = report["methods"][method]
            cells.append(f"{result['val'][row_index]['perplexity']:.2f} | {result['test'][row_index]['perplexity']:.2f}")
        lines.append(f"| depth {row['depth']} ({row['num_modules']}) | " + " | ".join(cells) + " |")
    lines += ["", "| method | steps | tokens | wall time (s) | critical path per step |", "|---|---|---|---|---|"]
    for method, result in report["methods"].items():
        lines.append(f"| {method} | {result['steps']} | {result['tokens']} | {result['wall_time_s']} | {result['critical_path_per_step']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="hbll-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="YAML config, for example configs/smollm2_wikipedia.yaml")
    parser.add_argument("--smoke", action="store_true", help="two steps on a few thousand tokens, to check the pipeline")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(_load_config(options.config, options.smoke, options.output_dir))


if __name__ == "__main__":
    main()
