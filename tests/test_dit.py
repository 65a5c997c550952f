import itertools

import pytest
import torch

from shared.dit_blocks import sincos_2d
from shared.errors import ConfigError
from stage2_ldm.dit import DiT, LabelEmbedder, build_dit
from tests.helpers import load_config


def ldm_config(name: str, **overrides):
    cfg = load_config([f"ldm={name}"]).ldm
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def tiny_dit(patch_size: int = 2, learn_sigma: bool = True, num_classes: int = 10) -> DiT:
    torch.manual_seed(0)
    return build_dit(ldm_config("dit_tiny", patch_size=patch_size, learn_sigma=learn_sigma), in_channels=4,
                     input_size=8, num_classes=num_classes)


def randomise_zero_init(model: DiT) -> DiT:
    """A DiT starts with a zero output; give the zero-initialised layers weights so outputs depend on inputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return model


# Sizes reported in the DiT paper (Peebles & Xie 2023, Table 1) for 256 px images (32×32×4 latents), patch 2.
PAPER_PARAMETERS = {"dit_s2": 33.0e6, "dit_b2": 130.5e6, "dit_l2": 458.1e6, "dit_xl2": 675.1e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):
        model = build_dit(ldm_config(name), in_channels=4, input_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMETERS[name]) / PAPER_PARAMETERS[name] < 0.02


def test_tiny_config_is_tiny():
    count = sum(p.numel() for p in tiny_dit().parameters())
    assert 1e5 < count < 1e6


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_forward_shapes(patch_size, learn_sigma):
    model = randomise_zero_init(tiny_dit(patch_size, learn_sigma))
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert torch.isfinite(out).all()


def test_adaln_zero_initial_output_is_zero():
    model = tiny_dit()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def test_output_depends_on_time_label_and_position():
    model = randomise_zero_init(tiny_dit()).eval()
    x = torch.randn(1, 4, 8, 8)
    reference = model(x, torch.tensor([100.0]), torch.tensor([3]))
    assert not torch.allclose(reference, model(x, torch.tensor([800.0]), torch.tensor([3])))
    assert not torch.allclose(reference, model(x, torch.tensor([100.0]), torch.tensor([4])))
    # Position embeddings are all distinct, so the tokens of a constant input still differ.
    position = sincos_2d(4, 4, 64)
    assert torch.cdist(position, position).add(torch.eye(16)).min() > 0


def test_unpatchify_keeps_patches_in_place():
    """With a zero network and a final linear that copies the patch's own pixels, the DiT is the identity."""
    model = tiny_dit(patch_size=2, learn_sigma=False)
    with torch.no_grad():
        # Patch embedding: token channel k = pixel k of the p×p×C patch, in (p, q, c) order like the output.
        weight = torch.zeros_like(model.patch_embed.weight)  # (D, C, p, p)
        for k, (p, q, c) in enumerate(itertools.product(range(2), range(2), range(4))):
            weight[k, c, p, q] = 1
        model.patch_embed.weight.copy_(weight)
        model.pos_embed.zero_()
        for block in model.blocks:
            block.modulation[-1].bias.zero_()
        model.final_layer.norm = torch.nn.Identity()
        model.final_layer.linear.weight.copy_(torch.eye(16, 64))
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(model(x, torch.zeros(2), torch.zeros(2, dtype=torch.long)), x, atol=1e-6)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_cfg_scale_one_is_conditional(learn_sigma):
    model = randomise_zero_init(tiny_dit(learn_sigma=learn_sigma)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5.0, 250.0, 750.0]), torch.tensor([0, 4, 7])
    assert torch.equal(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y))


def test_cfg_guides_prediction_channels_only():
    model = randomise_zero_init(tiny_dit(learn_sigma=True)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 600.0]), torch.tensor([1, 8])
    conditional = model(x, t, y)
    unconditional = model(x, t, y, force_drop=torch.ones(2, dtype=torch.bool))
    guided = model.forward_with_cfg(x, t, y, 4.0)
    expected = unconditional[:, :4] + 4.0 * (conditional[:, :4] - unconditional[:, :4])
    assert torch.allclose(guided[:, :4], expected, atol=1e-5)
    assert torch.allclose(guided[:, 4:], conditional[:, 4:], atol=1e-6)
    assert not torch.allclose(guided[:, :4], conditional[:, :4])


def test_label_dropout_rate_and_null_class():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=10, dim=8, dropout=0.1)
    labels = torch.randint(0, 10, (20000,))
    dropped = embedder.train().drop(labels)
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(embedder.eval().drop(labels), labels)
    force = torch.arange(20000) % 2 == 0
    assert torch.equal(embedder.train().drop(labels, force) == 10, force)


def test_build_dit_config_errors():
    with pytest.raises(ConfigError, match="ldm.patch_size"):
        build_dit(ldm_config("dit_tiny", patch_size=3), 4, 8, 10)
    with pytest.raises(ConfigError, match="ldm.num_heads"):
        build_dit(ldm_config("dit_tiny", num_heads=5), 4, 8, 10)
    with pytest.raises(ConfigError, match="ldm.kind"):
        build_dit(ldm_config("dit_tiny", kind="unet"), 4, 8, 10)
