"""The Ray floor: Ray Data and Ray Train wired to the library's plain functions.

The labeling job (`labeling.run`) is five stages over one output location; each reads what the
one before wrote, so a rerun does only what is missing:

| stage | what | function |
| --- | --- | --- |
| 0 | validate the manifest into rows/ and errors/; the training sample | `corpus.prepare_corpus` |
| A | train the CAM network (not on the held-out share); its tag AP | `stages.train_stage`, `labeling.held_out_ap` |
| B | CAMs -> CRF at two alphas -> seeds/ | `stages.seed_stage` |
| C | train AffinityNet on the seeds | `stages.train_stage("affinity", ...)` |
| D | CAMs -> AffinityNet -> random walk -> CRF -> labels/, shards/ (with the quality score) | `stages.label_stage` |
| E | train DeepLab on the labels (optional) | `stages.train_stage("deeplab", ...)` |

Around them: `layout` (every path under the output), `corpus` (stage 0 and the rows each stage
reads), `datasources` (a manifest read as checked rows, whole Parquet files), `staging` (stage 0's
files: `CorpusSink`, VOC folders), `builtin` (the built-in corpora as an input), `readers` (rows ->
decoded images), `actors` (the thin adapters over `psa_ray.ops.pseudo_labels`, no Ray import),
`row_errors` (how rows fail, the error-rate guard), `writers` (idempotent sinks, the shard schema),
`training` (one network alone), `predict` (a trained DeepLab on new images), `report` and `scoring`
(pictures and IoU), `tables`, `quality` and `quality_rules` (statistics, warnings, the review list;
`quality_rules` without Ray), `progress` (what a job prints while it runs), `cluster` (connecting to
Ray), `ray_compat` (workarounds for the pinned Ray) and `ray_types` (typed adapters for Ray's APIs).
"""
