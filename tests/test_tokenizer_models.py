"""Stage-1 networks: shapes, compression factors, resolution-agnostic decoding, parameter counts, describe."""
import json
from unittest.mock import patch

import pytest
import torch
from omegaconf import OmegaConf

from pipelines.describe import describe_ldm
from shared.ddpm import GaussianDiffusion
from shared.errors import ConfigError, DataError
from shared.flow import velocity_target
from stage1_tokenizer.blocks import AdaGroupNorm, AttentionBlock, Downsample, ResBlock, Upsample
from stage1_tokenizer.discriminator import PatchDiscriminator, TimeConditionedPatchDiscriminator, build_discriminator
from stage1_tokenizer.dit_decoder import DiTDecoder
from stage1_tokenizer.encoder import DiagonalGaussian, Encoder
from stage1_tokenizer.tokenizer import DGAE, VAE, DDPMEpsVAE, EpsVAE, build_tokenizer, load_tokenizer
from stage1_tokenizer.unet import ADMUNet
from stage1_tokenizer.vae_decoder import ConvDecoder
from tests.helpers import load_config, run_cli

TINY = ("epsvae_tiny", "vae_tiny", "dgae_tiny")


def tokenizer_config(name: str):
    return load_config([f"tokenizer={name}"]).tokenizer


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("downsample", [4, 8, 16, 32])
def test_encoder_compresses_by_f(downsample):
    torch.manual_seed(0)
    levels = downsample.bit_length()  # log2(f) + 1
    encoder = Encoder(latent_channels=3, base_channels=8, channel_mult=[1] * levels, num_res_blocks=1,
                      head_channels=8)
    decoder = ConvDecoder(latent_channels=3, base_channels=8, channel_mult=[1] * levels, num_res_blocks=1,
                          head_channels=8)
    posterior = encoder(torch.randn(2, 3, 64, 64))
    assert posterior.mean.shape == (2, 3, 64 // downsample, 64 // downsample)
    assert decoder(posterior.sample()).shape == (2, 3, 64, 64)


def test_diagonal_gaussian():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * logvar))
    assert torch.equal(posterior.mode(), mean)
    first = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(first, posterior.sample(torch.Generator().manual_seed(1)))
    assert not torch.equal(first, posterior.sample(torch.Generator().manual_seed(2)))
    # KL against the closed form of one Gaussian per element, summed per image
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, posterior.std),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected)
    standard = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert standard.kl().item() == 0
    huge = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 1e4)], dim=1))
    assert torch.isfinite(huge.kl()).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_tokenizers_round_trip(name):
    torch.manual_seed(0)
    cfg = tokenizer_config(name)
    tokenizer = build_tokenizer(cfg)
    assert millions(tokenizer) < 1.0
    assert isinstance(tokenizer, {"epsvae": EpsVAE, "vae": VAE, "dgae": DGAE}[cfg.kind])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tokenizer.encode(images).sample()
    assert z.shape == (2, tokenizer.latent_channels, 32 // tokenizer.downsample, 32 // tokenizer.downsample)
    decoded = tokenizer.decode(z, nfe=2)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


@pytest.mark.parametrize("name", ["epsvae_tiny", "dgae_tiny"])
def test_diffusion_decoding_is_resolution_agnostic(name):
    """A decoder built for 32 px decodes the latent of a 48 px image to 48 px (and non-square sizes)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_config(name)).eval()
    for height, width in ((48, 48), (32, 64)):
        z = tokenizer.encode(torch.rand(1, 3, height, width) * 2 - 1).mode()
        assert tokenizer.decode(z, nfe=1).shape == (1, 3, height, width)


def test_decode_is_deterministic_given_the_noise():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_config("epsvae_tiny")).eval()
    for parameter in tokenizer.decoder.conv_out.parameters():  # make the zero-initialised output layer non-trivial
        torch.nn.init.normal_(parameter, std=0.1)
    z = torch.randn(2, tokenizer.latent_channels, 8, 8)
    noise = torch.randn(2, 3, 32, 32)
    assert torch.equal(tokenizer.decode(z, nfe=3, noise=noise), tokenizer.decode(z, nfe=3, noise=noise))
    assert not torch.equal(tokenizer.decode(z, nfe=1, noise=noise), tokenizer.decode(z, nfe=3, noise=noise))


def test_decode_inverts_the_gamma_scaled_flow_with_an_exact_velocity():
    """With G returning the true velocity of x0 on the γ-scaled flow, decode gives back x0 (γ is undone)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_config("epsvae_tiny"))
    x0 = torch.rand(1, 3, 32, 32) * 1.6 - 0.8
    noise = torch.randn_like(x0)

    class ExactVelocity(torch.nn.Module):
        def forward(self, x_t, t, condition):
            return velocity_target(tokenizer.gamma * x0, noise)

    tokenizer.decoder = ExactVelocity()
    z = torch.zeros(1, tokenizer.latent_channels, 8, 8)
    torch.testing.assert_close(tokenizer.decode(z, nfe=3, noise=noise), x0)


def test_the_ablations_ddpm_decoder_trains_on_epsilon_and_samples_ancestrally():
    from stage1_tokenizer.objective import build_objective

    tiny = tokenizer_config("epsvae_tiny")
    config = {**tiny, "flow": {**tiny.flow, "process": "ddpm", "t_sampling": "uniform", "gamma": 1.0,
                               "grid": "uniform"},
              "loss": {**tiny.loss, "lpips": 0.0, "adversarial": 0.0}}
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, DDPMEpsVAE)
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.0, 0.9995])
    x_t = tokenizer.corrupt(x0, noise, t)
    alpha_bar = tokenizer.chain.alphas_cumprod[[0, 999]].float().reshape(2, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    # with the true ε, the one-step estimate is the image, and the regression target is ε itself
    torch.testing.assert_close(tokenizer.estimate_image(x_t, t, noise), x0, rtol=1e-4, atol=1e-3)
    assert torch.equal(tokenizer.target(x0, noise), noise)
    total, logs = build_objective(config).generator_loss(x0, step=0)
    assert torch.isfinite(total) and "loss/velocity" in logs
    calls = []
    tokenizer.decoder.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[1][0].item()))
    images = tokenizer.decode(torch.randn(2, 4, 8, 8), nfe=5)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert calls == pytest.approx([0.999, 0.749, 0.5, 0.25, 0.0], abs=1e-3)  # 5 evenly respaced chain steps / 1000
    # it samples images as Ho et al. do: x̂_0 clipped to [-1, 1] at every ancestral step
    clipped = []
    sample = GaussianDiffusion.sample
    with patch.object(GaussianDiffusion, "sample", autospec=True,
                      side_effect=lambda chain, *args, **kwargs: clipped.append(kwargs.get("clip_x0"))
                      or sample(chain, *args, **kwargs)):
        tokenizer.decode(torch.randn(1, 4, 8, 8), nfe=2)
    assert clipped == [True]
    with pytest.raises(ConfigError, match="gamma"):
        build_tokenizer({**config, "flow": {**config["flow"], "gamma": 0.6}})


DDPM_UNET = {"scale_shift_norm": False, "resblock_updown": False, "head_channels": None, "norm_groups": 4}


@pytest.mark.parametrize("options", [{"head_channels": 8}, DDPM_UNET], ids=["adm", "ddpm"])
def test_latent_conditions_the_unet(options):
    torch.manual_seed(0)
    unet = ADMUNet(condition_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(2,), **options)
    for parameter in unet.parameters():  # leave the zero initialisation so that every path contributes
        torch.nn.init.normal_(parameter, std=0.05)
    x_t, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    z = torch.randn(2, 2, 4, 4)
    out = unet(x_t, t, z)
    assert out.shape == x_t.shape
    assert not torch.allclose(out, unet(x_t, t, torch.randn(2, 2, 4, 4)))
    assert not torch.allclose(out, unet(x_t, 1 - t, z))


def test_the_ddpm_unet_is_ho_et_als_network():
    """DDPM's options build its blocks: the embedding a per-channel bias after the first conv (no AdaGN), strided
    conv down and nearest + conv up (no resampling ResBlocks), one attention head over all channels."""
    torch.manual_seed(0)
    unet = ADMUNet(condition_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(2,), **DDPM_UNET)
    modules = list(unet.modules())
    assert not any(isinstance(module, AdaGroupNorm) for module in modules)
    assert [type(module) for module in modules if isinstance(module, (Downsample, Upsample))] == [Downsample, Upsample]
    assert not any(isinstance(module, ResBlock) and module.resample for module in modules)
    assert {module.attention.num_heads for module in modules if isinstance(module, AttentionBlock)} == {1}
    assert {module.num_groups for module in modules if isinstance(module, torch.nn.GroupNorm)} == {4}
    adm = ADMUNet(condition_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(2,), head_channels=8)
    assert any(isinstance(module, AdaGroupNorm) for module in adm.modules())
    # groups of one channel normalise the per-channel timestep bias away: such a network cannot see t
    blind = ADMUNet(condition_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    **{**DDPM_UNET, "norm_groups": 32})
    for network in (unet, blind):
        for parameter in network.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
    x_t, t, z = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(blind(x_t, t, z), blind(x_t, 1 - t, z))
    assert not torch.allclose(unet(x_t, t, z), unet(x_t, 1 - t, z))

    block = ResBlock(8, 16, embedding_dim=12, scale_shift_norm=False)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    x, embedding = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    h = h + block.embedding_bias[1](torch.nn.functional.silu(embedding))[:, :, None, None]  # Ho et al.'s temb_proj
    expected = block.skip(x) + block.conv2(torch.nn.functional.silu(block.norm2(h)))
    torch.testing.assert_close(block(x, embedding), expected)


def test_dit_decoder_shapes_and_resolutions():
    torch.manual_seed(0)
    decoder = DiTDecoder(condition_channels=4, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    z = torch.randn(2, 4, 4, 4)
    for size in (16, 24):
        assert decoder(torch.randn(2, 3, size, size), torch.rand(2), z).shape == (2, 3, size, size)
    cfg = OmegaConf.to_container(tokenizer_config("epsvae_tiny"))
    cfg["decoder"] = {"arch": "dit", "patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}
    tokenizer = build_tokenizer(cfg)
    assert tokenizer.decode(torch.randn(1, 4, 8, 8), nfe=1).shape == (1, 3, 32, 32)


def test_discriminators():
    torch.manual_seed(0)
    plain = PatchDiscriminator(ndf=8, n_layers=3)
    assert plain(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    timed = TimeConditionedPatchDiscriminator(ndf=8, n_layers=3, embedding_dim=16)
    assert timed.stack.conv_in.in_channels == 6
    x, x_t = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    logits = timed(x, x_t, torch.tensor([0.2, 0.2]))
    assert logits.shape == (2, 1, 6, 6)
    assert not torch.allclose(logits, timed(x, x_t, torch.tensor([0.9, 0.9])))


# The paper's counts (ε-VAE, Tables 7 and 8), in millions.
ADM_DECODERS = {"b": 20.63, "m": 49.33, "l": 88.98, "xl": 140.63, "h": 355.62}
VAE_DECODERS = {"b": 10.14, "m": 22.79, "l": 40.48, "xl": 65.27, "h": 161.81}
SD_ENCODER, LITE_ENCODER = 34.16, 6.0


@pytest.mark.parametrize("size", list(ADM_DECODERS))
def test_parameter_counts_match_the_paper(size):
    with torch.device("meta"):
        epsvae = build_tokenizer(tokenizer_config(f"epsvae_sd_{size}"))
        vae = build_tokenizer(tokenizer_config(f"vae_sd_{size}"))
    assert millions(epsvae.decoder) == pytest.approx(ADM_DECODERS[size], rel=0.05)
    assert millions(vae.decoder) == pytest.approx(VAE_DECODERS[size], rel=0.05)
    assert millions(epsvae.encoder) == pytest.approx(SD_ENCODER, rel=0.01)
    assert millions(vae.encoder) == millions(epsvae.encoder)


def test_lite_and_dgae_configs():
    with torch.device("meta"):
        lite = build_tokenizer(tokenizer_config("epsvae_lite"))
        dgae = build_tokenizer(tokenizer_config("dgae"))
        sd = build_tokenizer(tokenizer_config("epsvae_sd_b"))
    assert millions(lite.encoder) == pytest.approx(LITE_ENCODER, rel=0.1)
    assert (lite.downsample, lite.latent_channels) == (16, 8)
    assert (dgae.downsample, 2 * dgae.latent_channels) == (sd.downsample, sd.latent_channels)
    assert build_discriminator(tokenizer_config("dgae")) is None


def test_bad_configs_name_the_key():
    def broken(edit):
        cfg = OmegaConf.to_container(tokenizer_config("epsvae_tiny"))
        edit(cfg)
        return cfg

    with pytest.raises(ConfigError, match="tokenizer.encoder.channel_mult"):
        build_tokenizer(broken(lambda cfg: cfg.update(downsample=8)))
    with pytest.raises(ConfigError, match="tokenizer.decoder.*num_blocks"):
        build_tokenizer(broken(lambda cfg: cfg["decoder"].update(num_blocks=2)))
    with pytest.raises(ConfigError, match="tokenizer.decoder.arch"):
        build_tokenizer(broken(lambda cfg: cfg["decoder"].update(arch="conv")))
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        build_tokenizer(broken(lambda cfg: cfg.update(kind="vqgan")))


def test_load_tokenizer_prefers_ema(tmp_path):
    torch.manual_seed(0)
    cfg = tokenizer_config("vae_tiny")
    trained, averaged = build_tokenizer(cfg), build_tokenizer(cfg)
    path = tmp_path / "latest.pt"
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "models": {"tokenizer": trained.state_dict()},
                "ema": {"tokenizer": averaged.state_dict()}}, path)
    z = torch.randn(1, cfg.latent_channels, 8, 8)
    with torch.no_grad():
        loaded = load_tokenizer(path, "cpu")
        assert not loaded.training
        torch.testing.assert_close(loaded.decode(z), averaged.decode(z))
        torch.testing.assert_close(load_tokenizer(path, "cpu", use_ema=False).decode(z), trained.decode(z))


def save_tokenizer_checkpoint(path, config: dict, tokenizer) -> None:
    torch.save({"config": config, "models": {"tokenizer": tokenizer.state_dict()}}, path)


def test_a_checkpoint_from_before_flow_process_loads_as_a_rectified_flow(tmp_path):
    config = OmegaConf.to_container(tokenizer_config("epsvae_tiny"), resolve=True)
    tokenizer = build_tokenizer(config)
    del config["flow"]["process"]  # stored by the toolkit before the ablation's DDPM decoder existed
    save_tokenizer_checkpoint(tmp_path / "old.pt", config, tokenizer)
    assert type(load_tokenizer(tmp_path / "old.pt", "cpu", use_ema=False)) is EpsVAE


def test_a_checkpoint_whose_config_lacks_a_key_is_a_one_line_error(tmp_path):
    config = OmegaConf.to_container(tokenizer_config("epsvae_tiny"), resolve=True)
    tokenizer = build_tokenizer(config)
    del config["flow"]["gamma"]
    save_tokenizer_checkpoint(tmp_path / "broken.pt", config, tokenizer)
    with pytest.raises(DataError, match=r"broken.pt stores a tokenizer config .*tokenizer.flow lacks gamma") as error:
        load_tokenizer(tmp_path / "broken.pt", "cpu", use_ema=False)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_describe_prints_one_json_line():
    result = run_cli("stage=describe", "tokenizer=epsvae_sd_b", "wandb.mode=disabled")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    description = json.loads(lines[0])
    assert description["tokenizer"] == "epsvae_sd_b"
    assert description["encoder_params"] / 1e6 == pytest.approx(SD_ENCODER, rel=0.01)
    assert description["decoder_params"] / 1e6 == pytest.approx(ADM_DECODERS["b"], rel=0.05)
    assert description["discriminator_params"] > 0


def test_describe_counts_the_dit():
    description = describe_ldm(load_config(["ldm=dit_xl2"]).ldm, "dit_xl2")
    assert description["ldm"] == "dit_xl2"
    assert description["params"] / 1e6 == pytest.approx(675, rel=0.01)  # DiT-XL/2 (Peebles & Xie, Table 1)
