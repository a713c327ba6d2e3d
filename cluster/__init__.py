"""cluster: where it runs — Ray cluster manifests and job submission."""
