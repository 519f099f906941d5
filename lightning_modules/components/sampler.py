"""Guided inpainting sampler (placeholder, being written)."""


def inpaint(*args, **kwargs):
    raise NotImplementedError
