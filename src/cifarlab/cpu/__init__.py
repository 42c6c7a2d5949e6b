"""CPU-only speed choices, entered here and nowhere else: freed memory kept in the process.

Why it pays, and on which machine, is in docs/performance.md. Nothing here changes a result or runs on CUDA.
"""

from cifarlab.cpu.memory import freed_memory_retained, retain_freed_memory, retained_memory

__all__ = ["freed_memory_retained", "retain_freed_memory", "retained_memory"]
