"""Declares the C extension only; all metadata lives in setup.cfg."""

from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
# The data plane is every C file directly under c_ext/; preload/ holds code that is
# loaded into QEMU, not into Python, and is built separately.
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "c_ext").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "cuju_libvirt._cuju",
            sources=SOURCES,
            include_dirs=["c_ext"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            extra_link_args=["-pthread"],
            libraries=["crypto"],  # OpenSSL libcrypto: AES-256-GCM of the FT link (aead.c)
        )
    ],
)
