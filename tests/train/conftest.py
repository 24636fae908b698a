"""Train-loop tests: a persistent XLA compilation cache shared by tests and their subprocesses.

Every `train_and_evaluate` call traces fresh closures, so without a cache each run recompiles
the same init and train-step programs (seconds each on a busy 2-core CPU, mostly threefry).
The cache only skips compilation; programs and results are unchanged.
"""
import os
import tempfile

import jax

CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "flowtok_jax_test_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
os.environ.update({k: os.environ.get(k, v) for k, v in CACHE_ENV.items()})  # for subprocesses
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
