"""Training the three networks with Ray Train: one loop (`loop.fit`, `loop.train_loop_per_worker`),
what differs per network (`tasks`: targets and losses), augmentation (`augment`) and held-out
evaluation (`evaluate`). Takes Ray Datasets; imports nothing from `psa_ray.pipeline`.
"""
