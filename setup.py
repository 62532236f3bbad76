"""fedjax_llm: a JAX/Flax NNX simulator for federated fine-tuning of LLMs."""
from setuptools import find_packages, setup

setup(
    name="fedjax_llm",
    version="0.1.0",
    description="One compiled federated round over one shared frozen LLM: LoRA and PEFT methods for FL research.",
    packages=find_packages(include=["fedjax_llm", "fedjax_llm.*", "kernels", "kernels.*"]),
    python_requires=">=3.11",
    # Exact pins live in requirements.lock (what `make setup` installs); these are the ranges the code supports.
    install_requires=[
        "jax>=0.10", "flax>=0.12", "optax>=0.2.5", "orbax-checkpoint>=0.11", "chex>=0.1.90",
        "tensorboardX>=2.6", "tokenizers>=0.21", "transformers>=4.50", "datasets>=3.0",
        "ml-collections>=1.0", "gguf>=0.17", "safetensors>=0.5", "tqdm>=4.66", "matplotlib>=3.9", "numpy>=1.26",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.6"]},
)
