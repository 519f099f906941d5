"""Plain nn.Modules and functions used by the Lightning modules (masks, metrics, samplers, ...)."""
