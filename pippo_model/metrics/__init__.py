"""Evaluation metrics: reprojection error (3D consistency), PSNR, SSIM, FID."""
