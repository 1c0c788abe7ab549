"""Storage (local and s3://, retries) and credential redaction, the inputs (manifests, VOC folders,
image folders), image decoding, label and seed PNGs.

No Ray here: these functions run on the driver and inside Ray tasks/actors alike.
"""
