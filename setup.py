"""Packaging for bitfusion-net: the network library and its GPU executors."""

from pathlib import Path

from setuptools import find_packages, setup

# The sources of the libcuda.so.1 stand-in (docs/AGENT.md). They are installed as data, not
# built here: `bitfusion-net run` builds the library on first use into a cache directory, with
# the CUDA headers of the machine it runs on (a wheel built elsewhere would carry another
# toolkit's entry points), and a build failure there costs only the agent, never the install.
AGENT_SOURCES = sorted(
    str(path)
    for path in Path(__file__).parent.joinpath("native", "libcuda").glob("*")
    if path.is_file() and (path.suffix in {".c", ".h", ".py"} or path.name == "Makefile")
)

setup(
    name="bitfusion-net",
    version="0.1.0",
    description="Share GPUs over the network, whole or in fractions down to 1/20",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(
        include=["bitfusion_net", "bitfusion_net.*", "executors", "executors.*"]
    ),
    # The CUDA C twins of the built-in kernels, compiled by nvcc on the GPU host at first use.
    package_data={
        "executors": ["cuda/*.cu"],
        "bitfusion_net.manage": ["static/*"],
        # ``pycuda`` as bitfusion-net run shows it to programs (not a package of its own)
        "bitfusion_net.pycuda_compat": ["shim/pycuda/*.py"],
    },
    data_files=[
        (
            "share/bitfusion-net/native/libcuda",
            [str(Path(p).relative_to(Path(__file__).parent)) for p in AGENT_SOURCES],
        )
    ],
    # PyYAML reads Bitfusion's servers.conf (YAML) unchanged; h11 and prometheus-client serve
    # the management endpoint (docs/OBSERVABILITY.md).
    install_requires=[
        "numpy>=1.24",
        "pyyaml>=6",
        "uvloop>=0.17; sys_platform != 'win32'",
        "h11>=0.14",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff==0.17.6",
            "mypy==2.4.1",
            # coverage-guided fuzzing of the protocol and the server (fuzz/); Linux wheels only
            "atheris>=2.3; platform_system == 'Linux'",
            # NVIDIA's driver-API bindings, which tests/native runs through the agent
            "cuda-bindings>=13; platform_system == 'Linux'",
        ],
        "bench": ["pyzmq>=25", "grpcio>=1.60", "matplotlib>=3.7", "tqdm>=4.66"],
        "gpu": ["pycuda>=2024.1"],
        "rdma": ["pyverbs>=50"],
    },
    entry_points={
        "console_scripts": [
            "bitfusion-net = bitfusion_net.cli:main",
            "bitfusion-server = bitfusion_net.server.__main__:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: AsyncIO",
        "Topic :: System :: Distributed Computing",
    ],
)
