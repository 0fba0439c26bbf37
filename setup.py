from setuptools import find_packages, setup

setup(
    name="ls_kernels",
    version="0.1.0",
    description="Fused Triton forward and backward kernels for long-short attention (Transformer-LS)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ls_kernels", "ls_kernels.*", "reference"]),  # reference: the dense oracle
    install_requires=["torch>=2.4,<2.15", "triton>=3.0,<4"],
    extras_require={
        "test": ["pytest>=7", "numpy"],
        "bench": ["pandas>=2", "matplotlib>=3.7", "tqdm>=4.60"],
    },
)
