"""Training stages (pretrain, mid, post): typed stage config, the per-worker DeepSpeed loop,
checkpoints in object storage, EMA, MLflow tracking, and the Ray Train launcher.

    config      StageConfig (the typed job config of `pippo train`)
    worker      train_worker(config dict): the per-worker loop, a plain function (no Ray needed)
    checkpoint  CheckpointStore: DeepSpeed's sharded save on any fsspec URL, marker, `latest`
    ema         ShardedEMA: EMA of the weights, partitioned like ZeRO-3 (correct under every stage)
    tracking    RunTracker: MLflow runs, async metrics, datasets, registered models
    launcher    run_stage: Ray Train TorchTrainer over train_worker (or in-process)
"""
