"""Image metrics with offline weights.

- `inception`: TF-Inception 2015-12-05 pool (and sFID) features; `load_inception(device)`, `quantize_to_uint8`.
- `fid`: `frechet_distance`, `feature_statistics`, `StatisticsAccumulator`, `InceptionStatistics`,
  `save_statistics` / `load_statistics` (.npz, ADM evaluator layout), `precision_recall`.
- `lpips`: `LPIPS(net="alex"|"vgg")`, a frozen, differentiable perceptual distance.
- `image_quality`: `psnr`, `ssim` per image.
- `image_io`: `open_images` (folders, ADM .npz), `NpzWriter` / `write_npz`, `save_images`, `save_image_grid`.
- `compare`: `stage=metrics`, `compare_images`. `evaluate`: `stage=evaluate`, `reference_statistics`,
  `evaluate_samples`.
"""
