"""Build fusedattn: setuptools drives CMake (CMakeLists.txt) to build the extension fusedattn._C.

    pip install -e . --no-build-isolation        # development install (uses the torch you have)
    pip wheel . --no-build-isolation -w dist      # a wheel

Environment:
    MAX_JOBS=N                 parallel compile jobs (default: number of CPUs)
    FUSEDATTN_SANITIZE=1       build the CPU kernels with -fsanitize=address,undefined
    FUSEDATTN_BUILD_TYPE=...   CMake build type (default Release)
    FUSEDATTN_CMAKE_ARGS=...   extra CMake arguments, split on spaces (tools/build_wheels.sh passes the CUDA root)
    TORCH_CUDA_ARCH_LIST       CUDA archs when torch has CUDA (default "8.0;9.0a")
    FUSEDATTN_LOCAL_VERSION    the version's local tag; default: the torch the binary is built for, as flash-attn
                               does (0.1.0+torch2.13cpu, 0.1.0+torch2.11cu130); "" for none. An sdist has none.

Wheels (one per torch major.minor and CUDA version): tools/build_wheels.sh; README.md "Wheels".
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def base_version() -> str:
    """fusedattn.__version__, read from the source (the one place the version is written)."""
    with open(os.path.join(ROOT, "fusedattn", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def local_version_tag() -> str:
    """What a binary of fusedattn is built for: torch major.minor and its accelerator (cpu, cuXYZ, rocmX.Y).

    The compiled extension only works with the torch (major.minor) it was compiled against (fusedattn/_ops.py
    refuses any other at import), so the wheel says which one in its local version, e.g. 0.1.0+torch2.13cpu."""
    if "FUSEDATTN_LOCAL_VERSION" in os.environ:
        return os.environ["FUSEDATTN_LOCAL_VERSION"]
    if "sdist" in sys.argv:  # sources: for any torch
        return ""
    try:
        import torch
    except ImportError:  # metadata-only invocations without torch (the build itself needs it)
        return ""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if torch.version.cuda:
        accel = "cu" + torch.version.cuda.replace(".", "")  # 13.0 -> cu130, 12.8 -> cu128
    elif getattr(torch.version, "hip", None):
        accel = "rocm" + ".".join(torch.version.hip.split(".")[:2])
    else:
        accel = "cpu"
    return f"torch{major_minor}{accel}"


def version() -> str:
    tag = local_version_tag()
    return f"{base_version()}+{tag}" if tag else base_version()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(ext_path)
        # One CMake tree per torch build: a cache configured against another torch would be reused otherwise.
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake-" + (local_version_tag() or "default")))
        os.makedirs(build_dir, exist_ok=True)
        cfg = os.environ.get("FUSEDATTN_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFUSEDATTN_OUTPUT_DIR={out_dir}",
            f"-DFUSEDATTN_SANITIZE={'ON' if os.environ.get('FUSEDATTN_SANITIZE') == '1' else 'OFF'}",
        ]
        args += os.environ.get("FUSEDATTN_CMAKE_ARGS", "").split()
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, *args], check=True)
        subprocess.run(["cmake", "--build", build_dir, "--config", cfg, "-j", jobs], check=True)
        if not os.path.exists(ext_path):
            raise RuntimeError(f"CMake did not produce {ext_path}")
        # Read by fusedattn/_ops.py before it loads the binary, to refuse a mismatched torch.
        with open(os.path.join(out_dir, "_build_torch.py"), "w") as f:
            f.write(
                f"# written by setup.py at build time\nTORCH_VERSION = {torch.__version__!r}\n"
                f"TORCH_CUDA = {torch.version.cuda!r}\nBUILD_VERSION = {version()!r}\n"
            )


setup(
    version=version(),
    packages=["fusedattn", "fusedattn.bench", "fusedattn.kernels", "fusedattn.transformer"],
    package_dir={
        "fusedattn": "fusedattn",
        "fusedattn.bench": "fusedattn/bench",
        "fusedattn.kernels": "kernels",
        "fusedattn.transformer": "transformer",
    },
    ext_modules=[CMakeExtension("fusedattn._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
