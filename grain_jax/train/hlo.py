"""Collectives of a compiled (per-device, SPMD-partitioned) HLO module's text: where they run and what they move.

Used by the tests and benchmarks that check where gradient reductions land (``tests/test_grad_cache.py``,
``benchmarks/grad_cache_fsdp.py``).
"""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE = re.compile(r"= (.*) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_FLOAT_ARRAY = re.compile(r"\b(bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str        # "all-reduce", "reduce-scatter", ...
    result: str    # the result type, e.g. "f32[128,512]{1,0}"
    in_loop: bool  # inside a while loop's body (or a computation it calls)

    @property
    def bytes(self) -> int:
        """Bytes of floating-point data in the result, per device."""
        return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in _FLOAT_ARRAY.findall(self.result))


def float_collectives(hlo: str) -> list[Collective]:
    """The collectives of a compiled HLO module's text that move floating-point data (not, e.g., the pred[]
    "is any row still looping" reductions of vmapped while loops)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)

    def called(lines):
        return {c for line in lines for c in re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line)}

    in_loops = {c for lines in computations.values() for line in lines for c in re.findall(r"body=%?([\w.\-]+)", line)}
    pending = list(in_loops)
    while pending:  # and everything the loop bodies call
        for c in called(computations.get(pending.pop(), [])) - in_loops:
            in_loops.add(c)
            pending.append(c)
    return [Collective(m.group(2), m.group(1), c in in_loops)
            for c, lines in computations.items() for line in lines
            if (m := COLLECTIVE.search(line)) and _FLOAT_ARRAY.search(m.group(1))]
