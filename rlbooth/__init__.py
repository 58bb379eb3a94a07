"""rlbooth: personalize a text-to-image diffusion model to one subject, then align it with RL.

Importing the package is cheap on purpose: torch, diffusers and friends are imported by the
modules that need them, so `rlbooth --help` answers at once.
"""

__version__ = "0.1.0"


def _drop_torchvision_fallback_notes() -> None:
    """Silence transformers' note that an image processor falls back to PIL without torchvision.

    rlbooth leaves torchvision out on purpose (README, dependencies) and wants the PIL processors; transformers 5
    printed the note on every command that loads a pipeline. Only that note is dropped; its other warnings stay.
    """
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed); falling back" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Filter())


_drop_torchvision_fallback_notes()
