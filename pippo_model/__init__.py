"""pippo_model: the multi-view DiT, its conditioning, diffusion, sampler and metrics (torch + einops only).

    config        ModelConfig (one dataclass; presets test / tiny / full; `for_stage`)
    model         Pippo = generator + stage's conditioning + learned CFG nulls; the `cond` contract;
                  build_model, load_stage_weights (pretrain -> mid -> post), load_weights
    dit           MultiViewDiT, DiTBlock, FinalLayer
    conditioning  ReferenceEncoder, CameraMLP (+ camera_vectors), ControlMLP (SIREN, zero blocks)
    attention     SDPA joint attention, attention biasing (attention_scale)
    diffusion     CosineSchedule, training_loss (the training-batch contract)
    sampler       ddim_sample (eta, CFG over chosen conditions, rescale, gamma, clip)
    autoencoder   AutoencoderKL (diffusers format, own module), PixelSpace, load_autoencoder
    flops         parameter_counts, forward_flops, training_flops_per_sample
    metrics       reprojection (RE), image (PSNR, SSIM), fid (Fréchet distance)

It never imports dataprep or pipelines: a batch of tensors is the only meeting point.
"""
