"""Workflows: a DAG of steps (synth -> dataprep -> pretrain -> mid -> post -> eval, or any part)
declared in YAML, each step cached by a hash of code, config and input artifact ids, run on Ray and
tracked as MLflow child runs of one parent run per invocation.

    config  PipelineConfig, StepConfig (the typed YAML; `${steps.NAME}` references are the edges)
    dag     Workflow: keys, records, resume, the run loop
    steps   what each kind of step does
"""
