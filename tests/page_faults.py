"""Run by test_runtime.py in a process of its own (glibc's defaults in force at its start): the page
faults of 4 blocks of 64 MB, each written and freed in turn as a training step's activations are,
with glibc's defaults and then after runtime.reuse_freed_memory(). Prints: default applied reused."""

import resource

import torch

from reprovision.core.runtime import reuse_freed_memory


def faults() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(64 << 20, dtype=torch.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


default = faults()
applied = reuse_freed_memory()
faults(), faults()  # the heap grows to hold them: a round or two
print(default, applied, faults())
