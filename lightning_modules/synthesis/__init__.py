"""The synthesis half of the method: mask generator, sources, copy-paste control, guided sampler."""
