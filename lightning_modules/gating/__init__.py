"""The gating half of the method: latent gate, quality filter, fidelity features, mask erosion."""
