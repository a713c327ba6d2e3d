"""pippo_model: the multi-view DiT, its conditioning, diffusion, sampler and metrics (torch + einops only)."""
