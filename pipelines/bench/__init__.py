"""`stage=bench`: our networks and loaders side by side with what users would pick instead, in one process.

    python pipelines/run.py stage=bench [bench.quick=true] [bench.out=benchmarks/bench_cpu] [bench.compile=true]

| ours | theirs |
|---|---|
| DiT (stage2_ldm/dit.py): train step, CFG sampling step, whole sampling | diffusers `DiTTransformer2DModel`, same shape |
| VAE baseline with the SD-VAE encoder/decoder: encode, decode | diffusers `AutoencoderKL` (SD-VAE config) |
| ε-VAE decode at NFE 1, 2, 3 | the VAE baseline decoder of the same size class |
| cached-latent loader (shared/data/latents.py) | image loader (shared/data/images.py) |
| FID features (shared/metrics/inception.py) | torch-fidelity `FeatureExtractorInceptionV3`, same weights |

Timing: `warmup` untimed calls, then `repeats` timed calls of ours and theirs alternately (a shared machine's
load hits both alike), fastest call of each; CUDA is synchronised around each call. The fastest call, as timeit
advises: noise from other processes only ever adds time, so the minimum is the estimate of a call's own cost
(the median of 9 calls still swung ±12% between runs on this shared 2-core machine). Ratios are ours / theirs
in throughput: ≥ 1 means we are at least as fast; each comes with its range over the rounds (call i of ours against
call i of theirs, back to back). Each model's FLOPs per call are counted once with
FlopCounterMode and divided by its time, and reported as a fraction of the machine's measured limit: the
better of a large square matmul and a large 3×3 convolution (fp32 on the CPU, bf16 on CUDA), timed in the same
run. Both are needed: on some CPUs oneDNN's convolution kernels run at twice MKL's sgemm rate, and a matmul-only
limit would credit convolutional networks with more than 100% of the machine.

The Markdown table and the JSON go to the run folder and, with `bench.out=PATH`, to PATH.md / PATH.json too.

The package, one job a module:

| module | what |
|---|---|
| `stage.py` | `main`, the stage: the sections in order, the report |
| `settings.py` | `cfg.bench` with the DiT shape of `cfg.ldm`, the `bench.quick` sizes, shapes and targets |
| `timing.py` | the timing harness: synchronised calls, fastest of alternating calls, FLOP counts, the measured limit, loader rates |
| `compare.py` | `Row` (one comparison) and `Context` (times ours against theirs into a `Row`) |
| `diffusers_dit.py` | diffusers' DiT behind our DiT's call |
| `sd_vae.py` | SD-VAE's shape: our VAE baseline's config and diffusers' `AutoencoderKL` |
| `fidelity_inception.py` | torch-fidelity's InceptionV3 with our offline Inception weights |
| `suites/` | one module a section: `dit.py`, `tokenizers.py`, `loaders.py`, `fid_features.py` |
| `report.py` | machine, command line, Markdown, `write_report` (also `stage=paper_speed`'s) |
| `data_loader.py` | the image folder against webdataset shards: `python pipelines/bench/data_loader.py` |
"""
from pipelines.bench.stage import main

__all__ = ["main"]
