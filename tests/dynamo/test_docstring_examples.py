"""The examples in dynamo's docstrings are true (run as doctests)."""
import asyncio
import doctest
import random

import pytest

from dynamo import gossip, hints, membership, merkle, node, quorum, ring, vclock, versions
from dynamo.vclock import VClock
from engines import open_engine


@pytest.mark.parametrize("module", [vclock, versions, ring, quorum, membership, hints, node, merkle, gossip], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    extra = {"open_engine": open_engine, "asyncio": asyncio, "random": random, "VClock": VClock}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
