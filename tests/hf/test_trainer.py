"""HBLLTrainer takes a stock Trainer's arguments, trains, saves, resumes and evaluates per depth."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from hbll_hf import HBLLArguments, HBLLForCausalLM, HBLLTrainer
from tests.hf import tiny_models
from tests.hf.trainer_script import tiny_lm_dataset

SCRIPT = Path(__file__).with_name("trainer_script.py")
REPO = Path(__file__).resolve().parents[2]


def training_arguments(output_dir, **overrides) -> transformers.TrainingArguments:
    options = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=6,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        gradient_accumulation_steps=2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(str(output_dir), **{**options, **overrides})


def test_same_arguments_as_a_stock_trainer(tmp_path):
    data = tiny_lm_dataset()
    torch.manual_seed(0)
    stock = transformers.Trainer(model=tiny_models.llama_lm(4).train(), args=training_arguments(tmp_path / "stock"), train_dataset=data, eval_dataset=data)
    stock.train()
    torch.manual_seed(0)
    trainer = HBLLTrainer(model=tiny_models.llama_lm(4).train(), args=training_arguments(tmp_path / "hbll"), train_dataset=data, eval_dataset=data)
    trainer.train()
    assert isinstance(trainer.model, HBLLForCausalLM)
    logs = trainer.state.log_history
    train_logs = [entry for entry in logs if "loss" in entry]
    assert all(entry["critical_path"] == 7 for entry in train_logs)
    assert trainer.state.global_step == stock.state.global_step == 6
    eval_logs = [entry for entry in logs if "eval_loss" in entry]
    assert [entry["step"] for entry in eval_logs] == [3, 6]
    for depth in range(3):
        assert eval_logs[-1][f"eval_depth{depth}_perplexity"] > 1
    assert eval_logs[-1]["eval_loss"] == eval_logs[-1]["eval_depth2_loss"]
    checkpoint = tmp_path / "hbll" / "checkpoint-6"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))
    reloaded = HBLLForCausalLM.from_pretrained(checkpoint, depth=1)
    assert reloaded.config.training["method"] == "hbll"


class StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` steps, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(output_dir, stop_at=None, resume=None):
    torch.manual_seed(0)
    trainer = HBLLTrainer(
        model=tiny_models.llama_lm(4).train(),
        args=training_arguments(output_dir, eval_strategy="no"),
        train_dataset=tiny_lm_dataset(),
        callbacks=[StopAt(stop_at)] if stop_at else None,
        # The chained-exit buffer is not part of a checkpoint, so exact resumption needs it off.
        hbll_args=HBLLArguments(chained_exit_weight=0.0),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model.state_dict()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = _train(tmp_path / "straight")
    _train(tmp_path / "interrupted", stop_at=3)
    resumed = _train(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-3"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_classifier_reports_accuracy_per_depth(tmp_path):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, tiny_models.VOCAB, (32, 12), generator=generator)
    labels = (input_ids[:, 0] % 3).tolist()
    data = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": [[1] * 12] * 32, "labels": labels})
    trainer = HBLLTrainer(
        model=tiny_models.bert_classifier().train(),
        args=training_arguments(tmp_path, max_steps=2, eval_strategy="no", save_strategy="no", gradient_accumulation_steps=1),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {f"eval_depth{d}_accuracy" for d in range(3)} <= set(metrics)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert trainer.model.hbll.exit_head_policy == "local"


def test_backprop_method_trains_the_full_network_only(tmp_path):
    torch.manual_seed(0)
    trainer = HBLLTrainer(
        model=tiny_models.gpt2_lm(4).train(),
        args=training_arguments(tmp_path, max_steps=2, eval_strategy="no", save_strategy="no"),
        train_dataset=tiny_lm_dataset(),
        hbll_args=HBLLArguments(method="backprop"),
    )
    shortcut = trainer.model.hbll.shortcuts["0_4"].layer.attn.c_attn.weight.detach().clone()
    trainer.train()
    assert torch.equal(trainer.model.hbll.shortcuts["0_4"].layer.attn.c_attn.weight, shortcut)
    assert all(entry.get("critical_path", 12) == 12 for entry in trainer.state.log_history)


def test_missing_labels_are_reported(tmp_path):
    data = tiny_lm_dataset().remove_columns("labels")
    trainer = HBLLTrainer(model=tiny_models.gpt2_lm(2), args=training_arguments(tmp_path, max_steps=1, eval_strategy="no"), train_dataset=data)
    with pytest.raises(ValueError, match="DataCollatorForLanguageModeling"):
        trainer.train()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_match_one(tmp_path, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    # 37 evaluation rows in batches of 16 per process: Accelerate pads the last batches
    # with repeated rows, which must not count.
    options = ["--eval-rows", "37"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(SCRIPT), str(single), *options], check=True, env=env, cwd=REPO, timeout=300)
    port = str(_free_port())
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    double = tmp_path / "double"
    subprocess.run([*command, str(SCRIPT), str(double), *options], check=True, env=env, cwd=REPO, timeout=300)
    one, two = torch.load(single / "params.pt"), torch.load(double / "params.pt")
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5, msg=name)
    metrics = json.loads((double / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # Both ranks of the tree train on the same batch of 8.
    assert metrics["total_train_batch_size"] == 8
    expected = json.loads((single / "metrics.json").read_text())
    for depth in range(3):
        key = f"eval_depth{depth}_loss"
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key


def test_non_transformers_model_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="trains transformers models, got Linear"):
        HBLLTrainer(model=torch.nn.Linear(2, 2), args=training_arguments(tmp_path, eval_strategy="no"))
    with pytest.raises(TypeError, match="neither an LM head nor a sequence classifier"):
        HBLLTrainer(model=tiny_models.bert_encoder(), args=training_arguments(tmp_path, eval_strategy="no"))
