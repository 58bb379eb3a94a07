"""Third-party log notes that a user of rlbooth cannot act on, dropped; every other message of those loggers stays.

Imported by `rlbooth/__init__.py` (so it must stay cheap: logging only). Each note is matched by a fragment of
its text on the logger that emits it, so a library's other warnings, and the same logger's, still print.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _DropNote(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def drop_note(logger_name: str, fragment: str) -> None:
    """Drop, for the whole process, the messages of `logger_name` that contain `fragment`."""
    logging.getLogger(logger_name).addFilter(_DropNote(fragment))


@contextmanager
def without_note(logger_names: tuple[str, ...], fragment: str) -> Iterator[None]:
    """Drop the messages containing `fragment` only inside the block (where rlbooth knows they mean nothing)."""
    note = _DropNote(fragment)
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(note)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(note)


NO_TEXT_ENCODER_LORA = ("diffusers.loaders.lora_base", "diffusers.loaders.peft"), "No LoRA keys associated to"
"""diffusers' note that a LoRA file has no weights for a component: rlbooth's stage files carry exactly the
components that were trained (stage two never trains a text encoder), so while rlbooth loads its own files
the note says nothing."""


def drop_unactionable_notes() -> None:
    # rlbooth leaves torchvision out on purpose (README, dependencies) and wants transformers' PIL processors;
    # transformers 5 printed this note on every command that loads a pipeline.
    drop_note("transformers.utils.import_utils", "requires torchvision (not installed); falling back")
    # diffusers warns on `.to(dtype)` of every model, also when no module needs float32 (the list is empty).
    drop_note("diffusers.models.modeling_utils", "that should be kept in float32: []")
