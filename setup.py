"""Builds medhe's own C++ extensions; everything else is in pyproject.toml.

Each folder ``src/medhe/he/ckks/csrc/<name>/`` (its ``*.cpp`` files) becomes the module ``medhe.he.ckks._<name>``;
``csrc/common/`` holds headers they share. The extensions are optional: on a machine without a C++ compiler the
install still succeeds and medhe runs on seal-python alone (and says so once).

A wheel build (``make wheel``, ``pip wheel .``) compiles into ``build/`` and, like every setuptools build, skips an
extension whose ``build/lib.*`` module is newer than its sources and headers. It also reuses the module that an
editable install (``make install``) compiled into ``src/`` when that one is newer than every source and header, so
a wheel after ``make install`` takes seconds instead of ~2 minutes of C++ (same compiler, flags and Python ABI:
the file name carries the ABI tag). ``make clean`` (removes ``build/`` and the in-place modules) compiles from
scratch.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("src/medhe/he/ckks/csrc")
FLAGS = ["-O3", "-std=c++17", "-pthread", "-fvisibility=hidden"]


def native_extensions() -> list[Extension]:
    try:
        import pybind11
    except ImportError:  # pragma: no cover - build isolation provides it
        return []
    include = [pybind11.get_include(), str(CSRC / "common")]
    common = sorted(str(p) for p in (CSRC / "common").glob("*.h"))
    exts = []
    for folder in sorted(p for p in CSRC.iterdir() if p.is_dir() and p.name != "common") if CSRC.is_dir() else []:
        sources = sorted(str(p) for p in folder.glob("*.cpp"))
        if sources:
            # depends: a header edit rebuilds the module (setuptools' up-to-date check reads sources + depends)
            exts.append(Extension(f"medhe.he.ckks._{folder.name}", sources, include_dirs=include, language="c++",
                                  depends=sorted(str(p) for p in folder.glob("*.h")) + common,
                                  extra_compile_args=FLAGS, extra_link_args=["-pthread"], optional=True))
    return exts


class BuildExtReusingInplace(build_ext):
    """``build_ext`` that copies an up-to-date in-place module (from an editable install) instead of compiling."""

    def build_extension(self, ext: Extension) -> None:
        if not self.inplace and not self.force:
            target = Path(self.get_ext_fullpath(ext.name))
            inplace = Path("src") / self.get_ext_filename(ext.name)
            newest_input = max(Path(p).stat().st_mtime for p in [*ext.sources, *ext.depends])
            target_fresh = target.is_file() and target.stat().st_mtime > newest_input
            if not target_fresh and inplace.is_file() and inplace.stat().st_mtime > newest_input:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(inplace, target)
                print(f"reusing {inplace} (newer than its sources) for {ext.name}")
                return
        super().build_extension(ext)


setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildExtReusingInplace})
