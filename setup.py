"""flowtok_jax: FlowTok (text <-> image flow matching over 1D tokens) in JAX/Flax.

Versions are pinned to the set the test suite was run with (see README, "Tested versions").
"""
import setuptools

JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    # tfds 4.9.10 imports it when preparing a builder but does not declare it.
    "importlib_resources==7.1.0",
    "array_record==0.8.6",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "einops==0.8.2",
    "etils==1.15.0",
    "scipy==1.17.1",  # Connected components and sqrtm in evaluation/.
    "flatbuffers==25.12.19",  # jax.export serialisation of the bundle programs.
]

EXTRAS = {
    # jax[tpu] brings libtpu so that the TPU-topology compile test (tests/tools/test_aot.py) runs
    # on CPU CI; tests force JAX_PLATFORMS=cpu.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "chex==0.1.92", f"jax[tpu]=={JAX_VERSION}",
             "tokenizers==0.23.3"],
    # OpenAI CLIP's BPE (a tokenizer.json) for the imported CLIP text tower of the paper configs.
    "clip": ["tokenizers==0.23.3"],
    # libtpu: lets `flowtok aot` compile for TPU topologies on a CPU-only machine.
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    # Reading the released PyTorch checkpoints (flowtok convert) and parity checks.
    "torch": ["torch==2.13.0"],
}

setuptools.setup(
    name="flowtok_jax",
    version="0.1.0",
    description="FlowTok in JAX/Flax: flow matching between 1D text and image tokens, both directions.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["flowtok_jax", "flowtok_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["flowtok=flowtok_jax.cli:entry"]},
)
