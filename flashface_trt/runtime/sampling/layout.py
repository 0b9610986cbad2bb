"""The rows of one UNet call for a request: which sample, which prompt, which rows see references.

The official sampler calls its model with a 2-way batch `[cond; uncond]` before the launch and a
3-way batch `[cond+ref; cond; uncond]` after it, each block one row per sample. Every backend,
the static loops, the exported graphs' shapes and the benchmarks build their batches from this
one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

COND, UNCOND = 0, 1  # rows of the text table [positive; negative] that `text_rows` index


@dataclass(frozen=True)
class BatchLayout:
    """A k-way batch of `samples` images (k = 3 after the launch with face guidance, else 2).

    Rows are blocks of `samples` rows: 3-way `[cond+ref, cond, uncond]`, 2-way `[cond, uncond]`.
    The first `ref_rows` rows attend to the reference K/V (the `cond+ref` block, or the whole 2-way
    batch, which the official code runs with references at λ_before).
    """

    samples: int
    three_way: bool

    @property
    def k(self) -> int:
        """Blocks of the batch (3 or 2)."""
        return 3 if self.three_way else 2

    @property
    def rows(self) -> int:
        return self.k * self.samples

    @property
    def ref_rows(self) -> int:
        """B_ref: how many leading rows attend to the references."""
        return self.samples if self.three_way else 2 * self.samples

    @property
    def sample_rows(self) -> list[int]:
        """Per batch row, the sample whose latent it carries (x repeated k times)."""
        return list(range(self.samples)) * self.k

    @property
    def text_blocks(self) -> tuple[int, ...]:
        """Per block of `samples` rows, COND or UNCOND: the prompt that block is conditioned on."""
        return (COND, COND, UNCOND) if self.three_way else (COND, UNCOND)

    @property
    def text_rows(self) -> list[int]:
        """Per batch row, COND or UNCOND."""
        return [b for b in self.text_blocks for _ in range(self.samples)]
