"""Image metrics with offline weights.

- `inception`: TF-Inception 2015-12-05 pool (and sFID) features; `load_inception(device)`.
- `fid`: `frechet_distance`, `feature_statistics`, `StatisticsAccumulator`, `InceptionStatistics`,
  `save_statistics` / `load_statistics` (.npz, ADM evaluator layout), `precision_recall`.
- `lpips`: `LPIPS(net="alex"|"vgg")`, a frozen, differentiable perceptual distance.
- `image_quality`: `psnr`, `ssim` per image.
- `paired`: `PairedMetrics`, per-image PSNR / SSIM / LPIPS of image pairs and the Inception features of both
  sides with their FID and its spread (stage=reconstruct, stage=metrics); `fid_spread`, `flat_metrics`.
- `compare`: `stage=metrics`, `compare_images`. `evaluate`: `stage=evaluate`, `reference_statistics`,
  `evaluate_samples`.
"""
