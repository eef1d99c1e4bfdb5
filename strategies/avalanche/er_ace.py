"""``MemoryER_ACE``: Avalanche's ER-ACE replaying a storage policy of the caller's choice.

ER-ACE (Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online
Continual Learning", ICLR 2022) trains on each minibatch of the experience with a
cross-entropy restricted to the classes present in it, and on a minibatch of the memory
with the full cross-entropy, so new classes do not push the logits of old ones down.
Avalanche's ``ER_ACE`` hard-wires a ``ClassBalancedBuffer`` of real images; this class keeps
its training loop and loss as they are and replays any storage policy instead -- one of our
byte-bounded memories, or another Avalanche buffer::

    strategy = MemoryER_ACE(storage_policy=PixelBuffer(2_458_000, SPECS["cifar10"]), model=model,
                            optimizer=optimizer, batch_size_mem=32, train_mb_size=32)

As in ``ER_ACE``, the memory takes the experience *before* training on it (so its
minibatches already hold the new classes) and replays only once it holds
``batch_size_mem`` samples.
"""

from __future__ import annotations

from typing import Any

from avalanche.training.storage_policy import ExemplarsBuffer
from avalanche.training.supervised import ER_ACE

from .buffers import MemoryBuffer

__all__ = ["MemoryER_ACE"]


class MemoryER_ACE(ER_ACE):  # the name follows Avalanche's ER_ACE
    """``ER_ACE`` over ``storage_policy`` (see the module docstring).

    :param storage_policy: the memory replayed: a
        :class:`~fedcl_dd.strategies.avalanche.buffers.MemoryBuffer` (which refuses an
        experience it could not take before anything is trained on it) or any Avalanche
        ``ExemplarsBuffer``.
    :param kwargs: ``ER_ACE``'s keyword arguments (``model``, ``optimizer``,
        ``batch_size_mem``, ...); its ``mem_size`` is the policy's ``max_size``.
    """

    def __init__(self, *, storage_policy: ExemplarsBuffer, **kwargs: Any) -> None:
        if not isinstance(storage_policy, ExemplarsBuffer):
            raise TypeError(
                "storage_policy must be an Avalanche ExemplarsBuffer (e.g. PixelBuffer), "
                f"got {type(storage_policy).__name__}"
            )
        if "mem_size" in kwargs:
            raise TypeError("mem_size is the storage policy's max_size: do not pass it")
        super().__init__(mem_size=storage_policy.max_size, **kwargs)
        self.storage_policy = storage_policy

    def _before_training_exp(self, **kwargs: Any) -> None:
        if isinstance(self.storage_policy, MemoryBuffer):
            self.storage_policy.check_experience(self.experience)
        super()._before_training_exp(**kwargs)
