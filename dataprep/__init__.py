"""dataprep: data in. Sub-packages by job, lower ones never importing higher ones:

    inputs   what a build reads: sources and their listings, the guarded fetch, tars, image formats,
             photo decoding and filters
    studio   multi-view captures: the capture format, camera geometry, spatial anchors, synthetic
             captures
    samples  the sample format (members of a shard sample), photo and studio samples, detection,
             previews
    store    the versioned dataset store: refs, tags and records (core), parts and ledger replay,
             shards (writing, reading), gc
    build    the Ray build job: listing, partition jobs, the commit, maintenance versions
    loader   versions -> training batches of the SPEC quantities (no camera vectors: the model
             side makes them)

Shared by all: build_config (the build's config types), names (user-chosen names), errors.
dataprep never imports pippo_model (tests/unit/test_import_graph.py).
"""
