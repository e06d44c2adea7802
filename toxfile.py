"""tox inline plugin: the project's tox environments share one installation.

`tox -e py` (tests), `tox -e smoke` (the main job), `eval`, `demo` and `bench` need the same packages
(torch first, then the project with its test extra). tox 4 keeps one virtualenv per environment name
and recreates a shared `env_dir` whenever the name differs from the last user's, so alternating
`tox -e py` and `tox -e smoke` would reinstall torch every time. The `shared-virtualenv` runner is
tox's own virtualenv runner with one change: the environment's identity in tox's cache is the shared
folder, not the environment name. Everything else tox compares (Python, dependencies, the package)
still triggers a recreate when it really differs, so the settings of these environments must stay
identical (they are: they inherit `[testenv]` and differ only in their commands).
"""

from __future__ import annotations

from typing import Any

from tox.plugin import impl
from tox.tox_env.info import Info
from tox.tox_env.python.virtual_env.runner import VirtualEnvRunner
from tox.tox_env.register import ToxEnvRegister


class _SharedInfo(Info):
    """tox's environment cache, with the environment's name replaced by the shared folder's name."""

    def __init__(self, path: Any) -> None:
        super().__init__(path)
        self._shared_name = path.name

    def compare(self, value: Any, section: str, sub_section: str | None = None):
        if section == "ToxEnv" and isinstance(value, dict):
            value = {**value, "name": self._shared_name}
        return super().compare(value, section, sub_section)


class SharedVirtualEnvRunner(VirtualEnvRunner):
    """A virtualenv runner whose environment several environment names may use in turn."""

    @staticmethod
    def id() -> str:
        return "shared-virtualenv"

    @property
    def cache(self) -> Info:
        return _SharedInfo(self.env_dir)


@impl
def tox_register_tox_env(register: ToxEnvRegister) -> None:
    register.add_run_env(SharedVirtualEnvRunner)
