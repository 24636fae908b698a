"""flowtok_jax: FlowTok (flow matching between 1D text and image tokens) in JAX/Flax."""

__version__ = "0.1.0"
