"""Storage (local and s3://), input manifests and VOC folders, image decoding, palette PNGs.

No Ray here: these functions run on the driver and inside Ray tasks/actors alike.
"""
