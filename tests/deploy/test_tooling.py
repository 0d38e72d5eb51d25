"""Missing tools skip a local run and fail a CI run."""

from __future__ import annotations

import pytest

from tests.deploy.tooling import in_ci, require_module, require_tool


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("", False),
                                                 ("false", False), ("0", False)])
def test_in_ci(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_missing_tool_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-package"):
        require_tool("gpuflops-no-such-tool", "apt-package")
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        require_module("gpuflops_no_such_module", "pip-package")


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-package"):
        require_tool("gpuflops-no-such-tool", "apt-package")
    with pytest.raises(pytest.fail.Exception, match="pip-package"):
        require_module("gpuflops_no_such_module", "pip-package")


def test_present_tool_is_found() -> None:
    assert require_tool("sh", "dash").endswith("/sh")
