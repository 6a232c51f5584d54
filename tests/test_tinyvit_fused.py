"""TinyViT's inference fast path (BatchNorm folded into the convolutions, channels-last) equals the plain forward."""

from __future__ import annotations

import torch

from octsam.models.tinyvit import Conv2dBN, TinyViT, TinyViTConfig

# A small TinyViT with LiteMedSAM's structure (four stages, padded windows, stride-1 last merging): fast on a CPU.
SMALL = TinyViTConfig(
    image_size=32,
    embed_dims=(16, 32, 40, 80),
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 2, 4),
    window_sizes=(7, 7, 5, 7),
    out_channels=32,
)


def random_encoder() -> TinyViT:
    torch.manual_seed(0)
    model = TinyViT(SMALL)
    with torch.no_grad():
        for module in model.modules():  # non-trivial BatchNorm statistics and attention biases
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
        for name, param in model.named_parameters():
            if name.endswith("attention_biases"):
                param.normal_()
    return model.eval()


def test_fused_encoder_equals_unfused():
    model = random_encoder()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model.train()  # the plain path (padded windows, unfused Conv-BN; BatchNorm stays frozen)
        expected = model(x)
        model.eval()
    with torch.inference_mode():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse_for_inference()
        assert model.fused and model.channels_last
        actual = model(x)
    assert actual.shape == expected.shape == (2, 32, 8, 8)
    assert float((actual - expected).norm() / expected.norm()) <= 1e-5
    # the state dict (keys and tensors) is unchanged: fused tensors are non-persistent buffers
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_training_mode_drops_the_fusion():
    model = random_encoder().fuse_for_inference()
    model.train()
    assert not model.fused and not model.channels_last
    assert all(m.fused_weight is None for m in model.modules() if isinstance(m, Conv2dBN))
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()  # the plain path still trains
    assert x.grad is not None
    model.eval().fuse_for_inference()
    assert model.fused
