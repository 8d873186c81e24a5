"""The hbll-hf runner trains both methods from a YAML config and writes its report."""

from __future__ import annotations

import json

import yaml

from hbll_hf.modeling import HBLLForCausalLM
from hbll_hf.run import main

TINY = {
    "seed": 0,
    "methods": ["hbll", "backprop"],
    "model": {"from_config": {"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2, "n_positions": 32}},
    "data": {"corpus": "shakespeare", "tokenizer": "gpt2", "block_size": 16, "max_train_tokens": 2048, "max_eval_tokens": 512},
    "training": {"max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16, "learning_rate": 1e-3, "disable_tqdm": True},
}


def test_runner_writes_report_plot_and_checkpoints(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    main(["--config", str(config)])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["methods"]) == {"hbll", "backprop"}
    for method, result in report["methods"].items():
        assert [row["num_modules"] for row in result["val"]] == [1, 2, 3]
        assert result["steps"] == 3
        assert result["tokens"] == 3 * 4 * 16
    assert report["methods"]["hbll"]["critical_path_per_step"] < report["methods"]["backprop"]["critical_path_per_step"]
    assert (tmp_path / "out" / "perplexity.png").stat().st_size > 0
    assert "| depth 2 (3) |" in (tmp_path / "out" / "report.md").read_text()
    cut = HBLLForCausalLM.from_pretrained(tmp_path / "out" / "hbll" / "final", depth=0)
    assert cut.config.training["eval"]["eval_depth0_loss"] > 0


def test_runner_rejects_unknown_config_keys(tmp_path):
    import pytest

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "optimiser": {"lr": 1}}))
    with pytest.raises(ValueError, match=r"unknown keys \['optimiser'\]"):
        main(["--config", str(config)])
    with pytest.raises(FileNotFoundError, match="not found"):
        main(["--config", str(tmp_path / "missing.yaml")])
