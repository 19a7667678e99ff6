"""The one compiled part: copyfree._scan, the fused Hamming scan (src/copyfree/_scan.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler
the install still succeeds and copyfree.hamming falls back to its numpy scans.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "copyfree._scan",
            ["src/copyfree/_scan.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
