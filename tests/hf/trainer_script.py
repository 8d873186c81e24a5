"""Train a tiny Llama with HBLLTrainer; run alone, under torchrun or under accelerate launch.

    python tests/hf/trainer_script.py OUT [--steps 6] [--tree-groups T] [--method hbll] [--eval-rows R]

Every process builds the same model and data from one seed. The main process writes the
final parameters to ``OUT/params.pt`` and the evaluation metrics to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hbll_hf import HBLLArguments, HBLLTrainer  # noqa: E402
from tests.hf import tiny_models  # noqa: E402


def tiny_lm_dataset(rows: int = 64, length: int = 16) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, tiny_models.VOCAB, (rows, length), generator=generator).tolist()
    return datasets.Dataset.from_dict({"input_ids": input_ids, "attention_mask": [[1] * length] * rows, "labels": input_ids})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tree-groups", type=int, default=None)
    parser.add_argument("--method", default="hbll")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=64)
    options = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_models.llama_lm(num_layers=4).train()
    args = transformers.TrainingArguments(
        options.out,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=16,
        max_steps=options.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    data = tiny_lm_dataset()
    eval_data = tiny_lm_dataset(rows=options.eval_rows)
    hbll_args = HBLLArguments(method=options.method, tree_groups=options.tree_groups)
    trainer = HBLLTrainer(model=model, args=args, train_dataset=data, eval_dataset=eval_data, hbll_args=hbll_args)
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.parallel is not None:
        trainer.parallel.sync_parameters()
    if trainer.is_world_process_zero():
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, os.path.join(options.out, "params.pt"))
        totals = {"world_size": args.world_size, "total_train_batch_size": trainer.get_total_train_batch_size(args)}
        Path(options.out, "metrics.json").write_text(json.dumps({**metrics, **totals}))


if __name__ == "__main__":
    main()
