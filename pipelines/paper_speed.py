"""The paper's throughput claim at the paper's scale (Table 4 of SPEC.md): images per 1000 s of the whole chain,
DiT-XL/2 sampling with 250 DDPM steps and no guidance, then decoding, at 256 px:

    python pipelines/run.py stage=paper_speed [paper_speed.out=benchmarks/paper_speed_cpu]

Every latent grid the paper times (f8, f16, f32 with 4 channels, DiT patch 2) against every decoder it times (the
SD-VAE decoder; the ε-VAE-SD (M) and (H) decoders at NFE 1, 2, 3), with random weights: speed does not depend on
them. The chain is composed from its parts, each timed per call at the preset's batch (the fastest of
`paper_speed.repeats` calls after a warm-up):

    seconds per image = (DiT step seconds × steps + decoder pass seconds × NFE) / batch

which is what the chain costs when, as here, nothing else overlaps (one process, synchronised calls); running 250
DiT-XL/2 steps for every cell would take hours on a CPU. FLOPs are counted per image with torch's FlopCounterMode
(a multiply-add is 2 FLOPs). Writes <run dir>/paper_speed.{md,json}, and <paper_speed.out>.{md,json}.

Every figure comes with its range over the timed calls: a throughput composed from the slowest calls of its parts
to one composed from their fastest, a ratio from its numerator's slowest over its denominator's fastest to the
reverse (the envelope: the parts are timed separately, so no call of one is paired with a call of another).

`measured_chains` gives the same table measured end to end instead, chain by chain, where the whole chain is cheap
enough to run for every cell: on a GPU (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from pipelines.bench.report import machine, write_report
from pipelines.bench.sd_vae import sd_vae_config
from pipelines.bench.settings import LATENT_CHANNELS, NUM_CLASSES
from pipelines.bench.timing import call_seconds, count_flops
from pipelines.configs import ROOT, command_line, group_config
from shared.data.latents import LatentStats
from shared.metrics.intervals import format_interval
from shared.runtime import Runtime, setup
from stage1_tokenizer.tokenizer import Tokenizer, build_tokenizer
from stage2_ldm.dit import DiT, build_dit
from stage2_ldm.sample import SampleDrawer


def timed_part(call: Callable[[], object], runtime: Runtime, warmup: int, repeats: int) -> dict:
    """{"seconds": the fastest call's, "seconds_range": [fastest, slowest]}, in inference mode under the run's
    precision."""
    with torch.inference_mode(), runtime.autocast():
        seconds = call_seconds(call, runtime.device, warmup, repeats)
    return {"seconds": min(seconds), "seconds_range": [min(seconds), max(seconds)]}


def flops_per_image(make_call: Callable[[int], Callable[[], object]], runtime: Runtime) -> int:
    """FLOPs of one call at batch 1."""
    with torch.inference_mode(), runtime.autocast():
        return count_flops(make_call(1))


def random_dit(ldm_cfg: DictConfig, latent_size: int, runtime: Runtime) -> DiT:
    """The DiT of `ldm_cfg` on the paper's 4-channel latents of `latent_size`² and 1000 classes, with random weights,
    on the device, in eval mode."""
    return build_dit(ldm_cfg, LATENT_CHANNELS, latent_size, NUM_CLASSES).to(runtime.device).eval()


def dit_step(ldm_cfg: DictConfig, latent_size: int,
             runtime: Runtime) -> tuple[Callable[[int], Callable[[], object]], int]:
    """(batch -> one DiT forward at that batch, the DiT's parameter count): a DDPM step without guidance costs one
    forward."""
    model = random_dit(ldm_cfg, latent_size, runtime)

    def make_call(batch: int) -> Callable[[], object]:
        x = torch.randn(batch, LATENT_CHANNELS, latent_size, latent_size, device=runtime.device)
        t = torch.randint(0, 1000, (batch,), device=runtime.device)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=runtime.device)
        return lambda: model(x, t, y)

    return make_call, sum(p.numel() for p in model.parameters())


def decoder_config(decoder: DictConfig, downsample: int) -> dict:
    """The tokenizer config of a decoder column at compression f = downsample: the SD-VAE shape gains one 512-channel
    level per halving (as SD-VAE f16/f32 do); ε-VAE keeps its decoder, whose encoder gains levels of its last width."""
    levels = downsample.bit_length() - 1  # log2 f
    if decoder.tokenizer == "sd_vae":
        channels = list(decoder.channels)
        return sd_vae_config(channels + [channels[-1]] * (levels + 1 - len(channels)))
    config = group_config("tokenizer", decoder.tokenizer)
    mult = list(config["encoder"]["channel_mult"])
    config["encoder"]["channel_mult"] = mult + [mult[-1]] * (levels + 1 - len(mult))
    config.update(downsample=downsample, latent_channels=LATENT_CHANNELS)
    return config


def random_decoder(config: dict, runtime: Runtime) -> Tokenizer:
    """The tokenizer of a decoder column's config with random weights, on the device, channels-last (NHWC), in eval
    mode."""
    return build_tokenizer(config).to(runtime.device, memory_format=torch.channels_last).eval()


def decoder_pass(config: dict, image_size: int, runtime: Runtime) -> Callable[[int], Callable[[], object]]:
    """batch -> one decoder network pass at that batch (a one-pass decoder's whole decode; ε-VAE at NFE 1)."""
    tokenizer = random_decoder(config, runtime)
    latent_size = image_size // config["downsample"]

    def make_call(batch: int) -> Callable[[], object]:
        z = torch.randn(batch, LATENT_CHANNELS, latent_size, latent_size, device=runtime.device)
        if config["kind"] == "vae":
            return lambda: tokenizer.decode(z)
        noise = torch.randn(batch, 3, image_size, image_size, device=runtime.device)
        return lambda: tokenizer.decode(z, nfe=1, noise=noise)

    return make_call


def compose(dit_seconds: float, pass_seconds: float, steps: int, nfe: int, batch: int) -> float:
    """Images per 1000 s of the chain: `steps` DiT calls, then `nfe` decoder passes, for `batch` images."""
    return 1000 * batch / (dit_seconds * steps + pass_seconds * nfe)


def throughput_table(parts: dict, settings: DictConfig) -> list[dict]:
    """One row per (f, decoder, NFE): images per 1000 s of the composed chain with its range over the timed calls
    (slowest parts to fastest; the estimate is the fastest end), and GFLOPs per image."""
    steps, batch = settings.steps, settings.batch_size
    rows = []
    for f in settings.compressions:
        dit = parts["dit"][str(f)]
        dit_fastest, dit_slowest = dit["seconds_range"]
        for decoder in settings.decoders:
            part = parts["decoders"][decoder.label][str(f)]
            pass_fastest, pass_slowest = part["seconds_range"]
            for nfe in decoder.nfe:
                fastest = compose(dit_fastest, pass_fastest, steps, nfe, batch)
                rows.append({"f": f, "decoder": decoder.label, "nfe": nfe, "images_per_1000s": fastest,
                             "images_per_1000s_range": [compose(dit_slowest, pass_slowest, steps, nfe, batch),
                                                        fastest],
                             "gflops_per_image": (dit["flops"] * steps + part["flops"] * nfe) / 1e9})
    return rows


def ratios(rows: list[dict], settings: DictConfig) -> list[dict]:
    """The paper's two ratios, ours (with its range, the envelope of its two throughputs' ranges) beside theirs, for
    every NFE of the decoder in question."""
    cell = {(row["f"], row["decoder"], row["nfe"]): row for row in rows}
    claims = []
    for claim in settings.claims:
        for nfe in claim.nfe:
            baseline_nfe = claim.baseline.nfe if claim.baseline.nfe is not None else nfe  # null: the same NFE
            ours = cell[(claim.ours.f, claim.ours.decoder, nfe)]
            baseline = cell[(claim.baseline.f, claim.baseline.decoder, baseline_nfe)]
            (ours_low, ours_high), (baseline_low, baseline_high) = (ours["images_per_1000s_range"],
                                                                    baseline["images_per_1000s_range"])
            claims.append({"claim": claim.label, "nfe": nfe,
                           "ours": ours["images_per_1000s"] / baseline["images_per_1000s"],
                           "range": [ours_low / baseline_high, ours_high / baseline_low],
                           "paper": claim.paper.ours / claim.paper.baseline})
    return claims


def measure_parts(settings: DictConfig, runtime: Runtime, ldm_cfg: DictConfig) -> dict:
    """{"dit": {f: {seconds, seconds_range, flops, params}}, "decoders": {label: {f: {seconds, seconds_range,
    flops}}}}: seconds per call at the batch (the fastest; the fastest and slowest), FLOPs per image, the DiT's
    parameters."""
    batch, warmup, repeats = settings.batch_size, settings.warmup, settings.repeats
    parts = {"dit": {}, "decoders": {decoder.label: {} for decoder in settings.decoders}}
    for f in settings.compressions:
        make_call, params = dit_step(ldm_cfg, settings.image_size // f, runtime)
        parts["dit"][str(f)] = {**timed_part(make_call(batch), runtime, warmup, repeats),
                                "flops": flops_per_image(make_call, runtime), "params": params}
        runtime.log.info("DiT f%d: %.3f s per step at batch %d", f, parts["dit"][str(f)]["seconds"], batch)
        for decoder in settings.decoders:
            make_call = decoder_pass(decoder_config(decoder, f), settings.image_size, runtime)
            parts["decoders"][decoder.label][str(f)] = {**timed_part(make_call(batch), runtime, warmup, repeats),
                                                        "flops": flops_per_image(make_call, runtime)}
            runtime.log.info("%s f%d: %.3f s per pass at batch %d", decoder.label, f,
                             parts["decoders"][decoder.label][str(f)]["seconds"], batch)
    return parts


def measured_chains(settings: DictConfig, runtime: Runtime, ldm_cfg: DictConfig) -> Iterator[dict]:
    """The table measured end to end instead of composed: for every cell, whole chains of `batch_size` images as
    stage=sample draws them (noise, `steps` DDPM steps of the DiT without guidance, the decoder at the cell's NFE,
    uint8 images on the host: stage2_ldm/sample.py's SampleDrawer), the fastest of `repeats` calls after `warmup`.

    Yields rows in the layout of throughput_table's (without FLOPs: they are those of the composed table) one at a
    time, so that a caller under a time limit keeps the finished ones. Decoder by decoder: the cells of the paper's
    ratios (SD-VAE, ε-VAE (M)) come before those of the largest decoder. Only the first NFE of a decoder at a grid
    is warmed up: its other NFEs run the same kernels on the same shapes."""
    batch = settings.batch_size
    labels = torch.arange(batch) % NUM_CLASSES
    unit_stats = LatentStats(torch.zeros(LATENT_CHANNELS, dtype=torch.float64),
                             torch.ones(LATENT_CHANNELS, dtype=torch.float64)).to_dict()
    dits = {f: random_dit(ldm_cfg, settings.image_size // f, runtime) for f in settings.compressions}
    for decoder in settings.decoders:
        for f in settings.compressions:
            model_config = {**OmegaConf.to_container(ldm_cfg, resolve=True), "in_channels": LATENT_CHANNELS,
                            "input_size": settings.image_size // f, "num_classes": NUM_CLASSES,
                            "latent_stats": unit_stats}
            tokenizer = random_decoder(decoder_config(decoder, f), runtime)
            for position, nfe in enumerate(decoder.nfe):
                drawer = SampleDrawer(dits[f], model_config, tokenizer,
                                      sampling={"cfg_scale": 1.0, "steps": settings.steps}, nfe=nfe,
                                      device=runtime.device, autocast=runtime.autocast)
                seconds = call_seconds(lambda: drawer.draw(labels, seed=0), runtime.device,
                                       settings.warmup if position == 0 else 0, settings.repeats)
                yield {"f": f, "decoder": decoder.label, "nfe": nfe, "images_per_1000s": 1000 * batch / min(seconds),
                       "images_per_1000s_range": [1000 * batch / max(seconds), 1000 * batch / min(seconds)]}


def markdown(report: dict) -> str:
    settings, m = report["settings"], report["machine"]
    rows = report["rows"]
    columns = [(decoder["label"], nfe) for decoder in settings["decoders"] for nfe in decoder["nfe"]]
    cell = {(row["f"], row["decoder"], row["nfe"]): row for row in rows}
    lines = [
        "# The paper's throughput claim at 256 px (Table 4 layout)", "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; {report['seconds'] / 60:.1f} min in one process",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, device "
        f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, precision {m['precision']}; load average "
        f"{m['load_average_1min']:.1f} at the end",
        f"- {report['ldm']} ({report['dit_params'] / 1e6:.1f}M parameters), {settings['steps']} DDPM steps, no "
        f"guidance, random weights, batch {settings['batch_size']}; each part timed per call (fastest of "
        f"{settings['repeats']} after {settings['warmup']} warm-up), the chain **composed**: seconds per image = "
        f"(DiT step × {settings['steps']} + decoder pass × NFE) / batch. Not a run of the whole chain.",
        f"- In square brackets, every figure's range over the {settings['repeats']} timed calls of each part: from "
        "the slowest calls to the fastest; a ratio's range is the envelope of its two throughputs' ranges.",
        "", "Images per 1000 s [range] (GFLOPs per image in round brackets):", "",
        "| f | " + " | ".join(f"{label} NFE {nfe}" for label, nfe in columns) + " |",
        "|---|" + "---:|" * len(columns)]
    def throughput(row: dict) -> str:
        return (f"{format_interval(row['images_per_1000s'], row['images_per_1000s_range'], '.3g')} "
                f"({row['gflops_per_image']:,.0f})")

    for f in settings["compressions"]:
        lines.append(f"| {f} | " + " | ".join(throughput(cell[(f, label, nfe)]) for label, nfe in columns) + " |")
    lines += ["", "The paper (one H100, bf16): f8 SD-VAE 522, ε-VAE (M) 491, (H) 477; f16 1220, 1192, 1180; f32 3991, "
              "3865, 3870.", "", "| claim | NFE | ours (×) [range] | paper (×) |", "|---|---:|---:|---:|"]
    for claim in report["ratios"]:
        lines.append(f"| {claim['claim']} | {claim['nfe']} | {format_interval(claim['ours'], claim['range'], '.2f')} | "
                     f"{claim['paper']:.2f} |")
    lines += ["", "Parts, per call at the batch above and per image:", "",
              "| part | f | seconds per call [fastest, slowest] | GFLOPs per image per call |", "|---|---:|---:|---:|"]
    parts = [(f"{report['ldm']} step", f, part) for f, part in report["parts"]["dit"].items()]
    parts += [(f"{label} pass", f, part) for label, by_f in report["parts"]["decoders"].items()
              for f, part in by_f.items()]
    for name, f, part in parts:
        lines.append(f"| {name} | {f} | {format_interval(part['seconds'], part['seconds_range'], '.3f')} | "
                     f"{part['flops'] / 1e9:,.1f} |")
    return "\n".join(lines) + "\n"


def main(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    with setup(cfg) as runtime:
        settings = cfg.paper_speed
        torch.manual_seed(cfg.seed)
        ldm_cfg = OmegaConf.create(group_config("ldm", settings.ldm))
        parts = measure_parts(settings, runtime, ldm_cfg)
        rows = throughput_table(parts, settings)
        report = {"command": command_line(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "machine": machine(runtime), "settings": OmegaConf.to_container(settings, resolve=True),
                  "ldm": settings.ldm, "dit_params": parts["dit"][str(settings.compressions[0])]["params"],
                  "parts": parts,
                  "rows": rows, "ratios": ratios(rows, settings), "seconds": time.perf_counter() - started}
        write_report(report, runtime.run_dir / "paper_speed", markdown)
        if settings.out:
            write_report(report, ROOT / settings.out, markdown)
        print(markdown(report))
        return runtime.finish(report)
