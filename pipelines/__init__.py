"""pipelines: orchestration — training stages, workflow DAG, compare, sample and the `pippo` CLI."""
