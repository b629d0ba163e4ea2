"""The context-manager protocol for objects that own a resource from construction on.

Such an object opens what it holds in ``__init__`` and releases it in an idempotent ``close()``;
``with obj:`` only has to give the object back and call ``close()`` on the way out, whatever
ended the block. Classes whose ``__enter__`` does work (starting a guest, creating a namespace)
write their own pair.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Mixin: ``with obj:`` yields ``obj`` and calls ``obj.close()`` on leaving."""

    def close(self) -> None:
        """Release what the object holds; idempotent. Every subclass defines its own."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
