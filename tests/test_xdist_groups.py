"""`make test`'s `--dist loadgroup` keeps each `xdist_group` on one worker.

The Flower tests rely on it (two Ray simulations at once on this machine can lose actors), and
the grouping can break without an error: with pytest 9.2 and pytest-xdist 3.8 the marks were
ignored and the Flower tests ran on both workers at once (pytest-xdist#1386).
"""

import pytest


@pytest.mark.xdist_group("flower")
def test_a_grouped_test_carries_its_group_to_the_scheduler(request: pytest.FixtureRequest) -> None:
    # xdist's worker sets `loadgroup` under `--dist loadgroup` and then names each marked test
    # `<nodeid>@<group>`, which is what its scheduler groups on.
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under `pytest -n N --dist loadgroup` (as `make test` does)")
    assert request.node.nodeid.endswith("@flower"), (
        f"{request.node.nodeid}: xdist_group was ignored, so grouped tests are spread over "
        "workers; pin pytest to a version pytest-xdist supports (see pyproject.toml)"
    )
