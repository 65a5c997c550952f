"""Post-hoc diagnostic of the DDPM rung (not part of the preset; no verdict uses it): why its 1,000 ancestral
steps returned saturated images (PSNR 4.8 dB in table.md). On 8 of the ladder's validation images (the same
class-stratified draw, seed 0), with the rung's 600-step tokenizer (raw weights, as the preset decodes):

1. the one-step estimate x̂0 from x_t at several t: where along the chain the network has learned;
2. the reconstruction by 1,000 ancestral steps without clipping x̂0 (as table.md measured it), with x̂0 clipped
   to [-1, 1] at every step (Ho et al.'s sampler, this repository's since commit 13e9ce9), and by 100 respaced
   steps without clipping (ladder32's DDPM setting).

    PYTHONPATH=. .venv/bin/python results/ladder32_fair/diagnostic_ddpm_sampler.py \
        /work/runs/outputs/pipeline/reproduce_ladder32_fair_ddpm > results/ladder32_fair/diagnostic_ddpm_sampler.json
"""
import json
import sys

import torch
from omegaconf import OmegaConf

from shared.data.images import make_image_loader
from shared.data.subsets import evaluation_subset
from stage1_tokenizer.tokenizer import load_tokenizer

IMAGES = 8


def psnr(estimate: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1]."""
    mse = ((estimate.clamp(-1, 1) - images) / 2).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


@torch.no_grad()
def main(run: str) -> dict:
    cfg = OmegaConf.load(f"{run}/reconstruct/config.yaml")
    tokenizer = load_tokenizer(f"{run}/tokenizer/checkpoints/step_000000600.pt", "cpu", use_ema=False).eval()
    subset = evaluation_subset(cfg.data, "val", IMAGES, cfg.evaluate.subset_seed)
    loader = make_image_loader(cfg.data, "val", IMAGES, train=False, indices=subset.indices)
    images = next(iter(loader))["image"]
    condition = tokenizer.condition(tokenizer.encode(images).mode())
    chain, steps = tokenizer.chain, tokenizer.chain.num_timesteps
    torch.manual_seed(0)
    one_step = {}
    for step in (100, 300, 500, 700, 900, 999):
        t = torch.full((IMAGES,), step, dtype=torch.long)
        noise = torch.randn_like(images)
        x_t = chain.q_sample(images, t, noise)
        eps, _ = chain.split_output(tokenizer.decoder(x_t, t.float() / steps, condition))
        one_step[step] = {"x0_psnr": psnr(chain.predict_x0(x_t, t, eps), images),
                          "eps_mse": (eps - noise).pow(2).mean().item()}
    sampled = {}
    for label, nfe, clip in (("1000 steps, x0 not clipped (table.md)", 1000, False),
                             ("1000 steps, x0 clipped", 1000, True), ("100 respaced steps, x0 not clipped", 100, False)):
        torch.manual_seed(0)
        respaced = chain.respace(nfe)
        decoded = respaced.sample(lambda x_t, model_time: tokenizer.decoder(x_t, model_time / steps, condition),
                                  torch.randn_like(images), clip_x0=clip)
        sampled[label] = {"psnr": psnr(decoded, images), "mean_abs": decoded.clamp(-1, 1).abs().mean().item()}
    return {"run": run, "images": IMAGES, "one_step_estimate": one_step, "sampled": sampled}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), indent=2))
