"""Build the Cython queue core and the gRPC stubs.

``python setup.py build_ext --inplace`` (what ``make build`` runs) compiles
``native/*.pyx`` into the ``router`` package and generates ``router/v1/*_pb2*.py``
from ``proto/router/v1/*.proto``.  Set ``TANDEM_DEBUG_BUILD=1`` for a build with
bounds checks and line tracing (slower, for debugging the core).
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("TANDEM_DEBUG_BUILD") == "1"


def generate_protos() -> None:
    """Run protoc on every proto/router/v1/*.proto; output lands in router/v1/."""
    from grpc_tools import protoc  # build requirement (pyproject.toml)
    import grpc_tools

    protos = sorted(glob.glob(os.path.join(HERE, "proto", "router", "v1", "*.proto")))
    if not protos:
        return
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{os.path.join(HERE, 'proto')}",
        f"-I{well_known}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))


class build_ext(_build_ext):
    def run(self) -> None:
        generate_protos()
        super().run()


class build_py(_build_py):
    def run(self) -> None:
        generate_protos()
        super().run()
        self.copy_example_sites()

    def copy_example_sites(self) -> None:
        """Ship the example cluster (the top-level ``sites/``, its source, with the partners'
        contracts of ``sites/partners/``) as package data
        in ``router/sim/sites``, so ``tandem demo`` and ``tandem up`` work from any
        directory (``router.sim.demo.example_sites_dir``)."""
        files = sorted(glob.glob(os.path.join(HERE, "sites", "*.yaml")))
        files += glob.glob(os.path.join(HERE, "sites", "overflow-policy.json"))
        target = os.path.join(self.build_lib, "router", "sim", "sites")
        self.mkpath(target)
        for f in files:
            self.copy_file(f, os.path.join(target, os.path.basename(f)))
        # the BPO partners on the partner API: their contracts
        partners = sorted(glob.glob(os.path.join(HERE, "sites", "partners", "*.yaml")))
        if partners:
            self.mkpath(os.path.join(target, "partners"))
        for f in partners:
            self.copy_file(f, os.path.join(target, "partners", os.path.basename(f)))


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    directives = {
        "language_level": "3",
        "boundscheck": DEBUG,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": DEBUG,
        "linetrace": DEBUG,
    }
    exts = [
        Extension(
            "router._queue_core",
            ["native/queue_core.pyx"],
            extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
            define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
        )
    ]
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext, "build_py": build_py})
