"""dataprep: data in — sources, camera geometry, filters, the Ray build job, shard writer, versioned store."""
