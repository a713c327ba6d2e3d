"""Training stages (pretrain, mid, post): typed stage config, the per-worker DeepSpeed loop,
checkpoints in object storage, EMA, and the Ray Train launcher (MLflow tracking:
pipelines.tracking; the model/weights loader: pipelines.weights).

    config      StageConfig (the typed job config of `pippo train`)
    worker      train_worker(config dict): the per-worker loop, a plain function (no Ray needed)
    checkpoint  CheckpointStore: DeepSpeed's sharded save on any fsspec URL, marker, `latest`
    ema         ShardedEMA: EMA of the weights, partitioned like ZeRO-3 (correct under every stage)
    launcher    run_stage: Ray Train TorchTrainer over train_worker (or in-process)
"""
