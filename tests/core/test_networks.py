import pytest
import torch

from hbll import CausalTransformer, ConvResNet
from hbll.checkpoint import load_checkpoint, save_checkpoint


def test_conv_resnet_cuts_map_images_to_logits():
    model = ConvResNet(num_blocks=4, in_channels=3, num_classes=7, width=8, downsample=4).build_model()
    images = torch.randn(2, 3, 32, 32)
    assert model.stem(images).shape == (2, 8, 8, 8)
    for depth in range(model.depth + 1):
        assert model(images, depth=depth).shape == (2, 7)


def test_conv_resnet_zero_blocks_raises():
    with pytest.raises(ValueError, match="num_blocks must be at least 1, got 0"):
        ConvResNet(num_blocks=0)


def test_conv_resnet_invalid_downsample_raises():
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        ConvResNet(downsample=3)


def test_conv_resnet_missing_classes_raises_with_fix():
    with pytest.raises(ValueError, match=r"arguments \['in_channels', 'num_classes'\] are None"):
        ConvResNet(num_blocks=2).build_model()


def test_network_fill_from_data_reads_datamodule_attributes():
    class Data:
        num_classes = 4
        in_channels = 2

    network = ConvResNet(num_blocks=2, width=8)
    network.fill_from_data(Data())
    assert (network.in_channels, network.num_classes) == (2, 4)


def test_network_fill_from_data_without_attribute_raises():
    with pytest.raises(ValueError, match="has no 'vocab_size' attribute"):
        CausalTransformer(num_blocks=2).fill_from_data(object())


def test_causal_transformer_is_causal():
    torch.manual_seed(0)
    model = CausalTransformer(num_blocks=2, vocab_size=20, max_positions=8, d_model=16, num_heads=2).build_model()
    tokens = torch.randint(0, 20, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (tokens[0, 5] + 1) % 20
    for depth in range(model.depth + 1):
        logits, changed_logits = model(tokens, depth=depth), model(changed, depth=depth)
        assert logits.shape == (1, 8, 20)
        torch.testing.assert_close(logits[:, :5], changed_logits[:, :5])
        assert not torch.allclose(logits[:, 5:], changed_logits[:, 5:])


def test_causal_transformer_too_long_sequence_raises():
    model = CausalTransformer(num_blocks=1, vocab_size=10, max_positions=4, d_model=8, num_heads=2).build_model()
    with pytest.raises(ValueError, match="sequence length 6 exceeds max_positions 4"):
        model(torch.zeros(1, 6, dtype=torch.long))


def test_checkpoint_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    network = ConvResNet(num_blocks=3, in_channels=1, num_classes=5, width=8)
    model = network.build_model()
    save_checkpoint(model, tmp_path / "ckpt", network)
    loaded = load_checkpoint(tmp_path / "ckpt")
    images = torch.randn(2, 1, 28, 28)
    for depth in range(model.depth + 1):
        torch.testing.assert_close(loaded(images, depth=depth), model(images, depth=depth))


def test_checkpoint_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="hbll_config.json not found"):
        load_checkpoint(tmp_path / "nothing")


def test_checkpoint_without_network_spec_raises(tmp_path):
    model = ConvResNet(num_blocks=2, in_channels=1, num_classes=3, width=8).build_model()
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="records no network spec"):
        load_checkpoint(tmp_path / "ckpt")


def test_checkpoint_records_initial_sigma_not_trained_value(tmp_path):
    network = ConvResNet(num_blocks=2, in_channels=1, num_classes=3, width=8)
    model = network.build_model(init_sigma=0.5)
    with torch.no_grad():
        model.log_sigma["0_2"].fill_(2.0)
    save_checkpoint(model, tmp_path / "ckpt", network)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.init_sigma == 0.5
    torch.testing.assert_close(loaded.log_sigma["0_2"], torch.tensor(2.0))


@pytest.mark.parametrize("exit_head", ["linear", "conv", "target_embedding"])
@pytest.mark.parametrize("shortcut_width", [None, 8])
def test_conv_resnet_exit_head_and_shortcut_options(exit_head, shortcut_width, tmp_path):
    torch.manual_seed(0)
    model = ConvResNet(4, 1, 10, width=16, exit_head=exit_head, shortcut_width=shortcut_width).build_model()
    hidden_states = torch.randn(2, 16, 7, 7)
    assert model.exit_head(2)(hidden_states).shape == (2, 10)
    root_conv = model.shortcuts[model.tree.root.name].conv1
    assert root_conv.out_channels == (shortcut_width or 16)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt", ConvResNet(4, 1, 10, width=16, exit_head=exit_head, shortcut_width=shortcut_width))
    loaded = load_checkpoint(tmp_path / "ckpt")
    for depth in range(model.depth + 1):
        torch.testing.assert_close(loaded(x, depth=depth), model(x, depth=depth))


def test_conv_resnet_invalid_options_raise():
    with pytest.raises(ValueError, match="exit_head must be 'linear', 'conv' or 'target_embedding', got 'mlp'"):
        ConvResNet(4, exit_head="mlp")
    with pytest.raises(ValueError, match="shortcut_width must be at least 1, got 0"):
        ConvResNet(4, shortcut_width=0)


def test_target_embedding_head_prefers_nearest_class():
    from hbll.networks import TargetEmbeddingHead

    head = TargetEmbeddingHead(width=8, num_classes=3)
    hidden_states = torch.randn(4, 8, 5, 5)
    features = head.features(hidden_states)
    with torch.no_grad():
        head.targets.copy_(torch.stack([features[1], features[0] + 5.0, features[2]]))
    logits = head(hidden_states)
    assert logits.shape == (4, 3)
    assert logits[1].argmax().item() == 0
    assert logits[2].argmax().item() == 2
    assert torch.all(logits <= 0)
