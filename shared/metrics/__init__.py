"""Image metrics with offline weights.

- `inception`: TF-Inception 2015-12-05 pool (and sFID) features; `load_inception(device)`.
- `fid`: `frechet_distance`, `feature_statistics`, `StatisticsAccumulator`, `InceptionStatistics`,
  `save_statistics` / `load_statistics` (.npz, ADM evaluator layout), `precision_recall`.
- `lpips`: `LPIPS(net="alex"|"vgg")`, a frozen, differentiable perceptual distance; `load_lpips(net, device)` (once
  per process), `secondary_net(net)` (the other backbone).
- `image_quality`: `psnr`, `ssim` per image.
- `noise_sensitivity`: `noise_std`, `seed_mean_psnr` of K decodes with independent noise (stage=reconstruct).
- `colour_noise`: `chroma_hf`, the high-frequency chroma energy of images (stage=reconstruct).
- `paired`: `PairedMetrics`, per-image PSNR / SSIM / LPIPS (both backbones) of image pairs and the Inception
  features of both sides with their FID and its spread (stage=reconstruct, stage=metrics); `fid_spread`,
  `flat_metrics`, `mean_entry`.
- `compare`: `stage=metrics`, `compare_images`. `evaluate`: `stage=evaluate`, `reference_statistics`,
  `evaluate_samples`.
"""
