"""Builds medhe's own C++ extensions; everything else is in pyproject.toml.

Each folder ``src/medhe/he/ckks/csrc/<name>/`` (its ``*.cpp`` files) becomes the module ``medhe.he.ckks._<name>``;
``csrc/common/`` holds headers they share. The extensions are optional: on a machine without a C++ compiler the
install still succeeds and medhe runs on seal-python alone (and says so once).
"""

from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("src/medhe/he/ckks/csrc")


def native_extensions() -> list[Extension]:
    try:
        import pybind11
    except ImportError:  # pragma: no cover - build isolation provides it
        return []
    include = [pybind11.get_include(), str(CSRC / "common")]
    exts = []
    for folder in sorted(p for p in CSRC.iterdir() if p.is_dir() and p.name != "common") if CSRC.is_dir() else []:
        sources = sorted(str(p) for p in folder.glob("*.cpp"))
        if sources:
            exts.append(Extension(f"medhe.he.ckks._{folder.name}", sources, include_dirs=include, language="c++",
                                  extra_compile_args=["-O3", "-std=c++17", "-pthread", "-fvisibility=hidden"],
                                  extra_link_args=["-pthread"], optional=True))
    return exts


setup(ext_modules=native_extensions())
