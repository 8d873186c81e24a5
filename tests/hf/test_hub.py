"""Hub round trip of variable-depth checkpoints against the loopback Hub server (tests/hub_server.py)."""

from __future__ import annotations

import pytest
import torch
import yaml
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModelForCausalLM

from hbll_hf import HBLLForCausalLM, HBLLTrainer
from hbll_hf.hub import HubPushError
from tests.hf import tiny_models
from tests.hf.test_trainer import training_arguments
from tests.hf.trainer_script import tiny_lm_dataset

REPO_ID = "hbll-test/tiny-llama"


def _card_metadata(text: str) -> dict:
    _, front, _ = text.split("---\n", 2)
    return yaml.safe_load(front)


def _trained_model(tmp_path) -> HBLLForCausalLM:
    torch.manual_seed(0)
    data = tiny_lm_dataset()
    trainer = HBLLTrainer(
        model=tiny_models.llama_lm(4).train(),
        args=training_arguments(tmp_path / "run", max_steps=2, eval_strategy="no", save_strategy="no"),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    trainer.evaluate()
    return trainer.model.eval()


def test_push_and_download_every_depth(hub_server, tmp_path):
    model = _trained_model(tmp_path)
    model.push_to_hub(REPO_ID, save_directory=tmp_path / "local", export_cuts=True, dataset_name="wikipedia")

    files = set(HfApi().list_repo_files(REPO_ID))
    assert {"config.json", "model.safetensors", "README.md", "cuts/depth0/config.json", "cuts/depth2/model.safetensors"} <= files
    metadata = _card_metadata(open(hf_hub_download(REPO_ID, "README.md")).read())
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert [entry["name"] for entry in metrics] == [
        "Perplexity at depth 0 (1 layer)",
        "Perplexity at depth 1 (2 layers)",
        "Perplexity at depth 2 (4 layers)",
    ]
    assert metrics[2]["value"] == pytest.approx(model.config.training["eval"]["eval_depth2_perplexity"], rel=1e-3)
    assert "hbll" in metadata["tags"]

    batch = tiny_models.padded_batch()
    keep = batch["attention_mask"].bool()
    for depth in range(3):
        with torch.no_grad():
            expected = model(**batch, depth=depth).logits[keep]
            cut = HBLLForCausalLM.from_pretrained(REPO_ID, depth=depth)
            torch.testing.assert_close(cut(**batch).logits[keep], expected, rtol=0, atol=1e-5)
            stock = AutoModelForCausalLM.from_pretrained(REPO_ID, subfolder=f"cuts/depth{depth}").eval()
            torch.testing.assert_close(stock(**batch).logits[keep], expected, rtol=0, atol=1e-5)


def test_push_to_a_branch(hub_server, tmp_path):
    model = HBLLForCausalLM.from_stock(tiny_models.gpt2_lm(2))
    model.push_to_hub(REPO_ID, revision="experiment")
    assert "model.safetensors" in HfApi().list_repo_files(REPO_ID, revision="experiment")
    assert "model.safetensors" not in HfApi().list_repo_files(REPO_ID)
    loaded = AutoModelForCausalLM.from_pretrained(REPO_ID, revision="experiment", depth=0)
    assert loaded.config.depth == 0


def test_failed_push_keeps_local_checkpoint(hub_server, tmp_path):
    model = HBLLForCausalLM.from_stock(tiny_models.gpt2_lm(2))
    hub_server.fail("/commit/", status=500, message="Storage quota exceeded on the test Hub")
    local = tmp_path / "local"
    with pytest.raises(HubPushError, match=r"HTTP 500\): Storage quota exceeded on the test Hub\. The checkpoint is intact") as raised:
        model.push_to_hub(REPO_ID, save_directory=local)
    assert raised.value.save_directory == local
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in local.iterdir()}
    reloaded = HBLLForCausalLM.from_pretrained(local, depth=1)
    assert reloaded.config.depth == 1


def test_trainer_push_writes_the_hbll_card(hub_server, tmp_path):
    torch.manual_seed(0)
    data = tiny_lm_dataset()
    args = training_arguments(
        tmp_path / "run", max_steps=2, eval_strategy="no", save_strategy="no", push_to_hub=True, hub_model_id=REPO_ID
    )
    trainer = HBLLTrainer(model=tiny_models.llama_lm(4).train(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub()
    card = open(hf_hub_download(REPO_ID, "README.md")).read()
    assert "Perplexity at depth 1 (2 layers)" in card
    assert "HBLLForCausalLM" not in card.split("---")[1]
    cut = AutoModelForCausalLM.from_pretrained(REPO_ID, depth=1)
    assert isinstance(cut, HBLLForCausalLM)
