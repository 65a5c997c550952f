"""Our DiT against diffusers' DiTTransformer2DModel of the same shape: a training step, a guided sampling step and
a whole flow sampling run."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipelines.bench.compare import Context, Row
from pipelines.bench.diffusers_dit import DiffusersDiT
from pipelines.bench.settings import LATENT_CHANNELS, NUM_CLASSES, TARGETS
from pipelines.describe import count_parameters


def dit_pair(ctx: Context) -> tuple[nn.Module, nn.Module]:
    from stage2_ldm.dit import DiT

    shape = dict(ctx.bench.dit)
    ours = DiT(input_size=ctx.bench.latent_size, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES,
               learn_sigma=False, **shape)
    theirs = DiffusersDiT(LATENT_CHANNELS, ctx.bench.latent_size, NUM_CLASSES, **shape)
    return ours, theirs


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, objective, latents: torch.Tensor,
               labels: torch.Tensor) -> Callable[[], None]:
    def step():
        loss, _ = objective.loss(model, latents, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_dit(ctx: Context) -> tuple[list[Row], dict]:
    from shared.train.backends import OptimConfig, build_optimizer
    from stage2_ldm.objective import FlowObjective

    ours, theirs = dit_pair(ctx)
    params = {"ours": count_parameters(ours), "theirs": count_parameters(theirs)}
    ours, theirs = ctx.prepare(ours), ctx.prepare(theirs)
    objective = FlowObjective()
    batch, size = ctx.bench.dit_batch_size, ctx.bench.latent_size
    latents = torch.randn(batch, LATENT_CHANNELS, size, size, device=ctx.device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=ctx.device)
    optim = OptimConfig(lr=1e-4)  # the stage-2 loop's AdamW (multi-tensor on the CPU, fused on CUDA) for both
    steps = [train_step(model.train(), build_optimizer(model.parameters(), optim, ctx.device), objective, latents,
                        labels) for model in (ours, theirs)]
    rows = [ctx.side_by_side("DiT train step (fwd + bwd + AdamW)", "images/s", batch, *steps,
                             target=TARGETS["dit_train_step"])]

    ours.eval()
    theirs.eval()
    n, scale = ctx.bench.sample_images, ctx.bench.cfg_scale
    noise = torch.randn(n, LATENT_CHANNELS, size, size, device=ctx.device)
    classes = torch.randint(0, NUM_CLASSES, (n,), device=ctx.device)
    t = torch.full((n,), 500.0, device=ctx.device)
    guided_steps = [lambda m=m: m.forward_with_cfg(noise, t, classes, scale) for m in (ours, theirs)]
    whole_sampling = [lambda m=m: objective.sample(m, noise, classes, cfg_scale=scale, sampler="euler",
                                                   steps=ctx.bench.sample_steps) for m in (ours, theirs)]
    with torch.inference_mode():
        rows.append(ctx.side_by_side(f"DiT sampling step (CFG {scale}: one forward of 2×{n})", "images/s", n,
                                     *guided_steps))
        # Every Euler step is one guided forward, so the FLOPs of the whole are those of a step times the steps;
        # the network is warm from the steps above, and one call is sample_steps of them.
        step_flops = rows[-1].ours_flops, rows[-1].theirs_flops
        rows.append(ctx.side_by_side(
            f"DiT sampling of {n} images: flow, Euler {ctx.bench.sample_steps} steps, CFG {scale}", "images/s", n,
            *whole_sampling, flops=tuple(ctx.bench.sample_steps * f for f in step_flops), warmup=0,
            repeats=ctx.bench.sampling_repeats))
    return rows, params
