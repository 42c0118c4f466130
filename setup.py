"""Packaging beside pyproject.toml for one thing pyproject cannot say: the repository's export/ and runtime_py/
folders install under a single import name, as pocketllm.export and pocketllm.runtime_py (pocketllm is a namespace
package). Nothing named `export` lands in site-packages."""

from setuptools import find_packages, setup

ROOTS = ("export", "runtime_py")
packages = [f"pocketllm.{p}" for p in find_packages(include=[f"{r}*" for r in ROOTS])]
setup(packages=packages, package_dir={f"pocketllm.{r}": r for r in ROOTS},
      package_data={"pocketllm.export": ["**/*.json"]}, include_package_data=False)
