"""`pippo model info CONFIG [k=v ...]`: parameters per module and training FLOPs per sample."""
from __future__ import annotations

import json

from pipelines.cli.args import add_command, add_group, json_flag


def register(top) -> None:
    msub = add_group(top, "model", "model inspection", "Model commands.", "model_command")
    p = add_command(msub, "info", model_info,
                    "parameters per module and training FLOPs per sample")
    p.add_argument("config", help="model config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    json_flag(p)


def model_info(args) -> int:
    from pipelines.weights import load_model_config
    from pippo_model.flops import parameter_counts, training_flops_per_sample

    cfg = load_model_config(args.config, args.overrides)
    params = parameter_counts(cfg)
    flops = training_flops_per_sample(cfg)
    if args.json:
        print(json.dumps({"params": params, "flops_per_sample": flops}))
        return 0
    print(f"model {cfg.name}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, {cfg.space} space, "
          f"{cfg.resolution} px, {cfg.views} views ({cfg.tokens_per_view} tokens per view)")
    for name, n in params.items():
        print(f"  {name:<18} {n:>15,d}  ({n / 1e6:,.1f} M)")
    print(f"  training FLOPs per sample: {flops:.4g} ({flops / 1e12:.3f} TFLOP)")
    return 0
