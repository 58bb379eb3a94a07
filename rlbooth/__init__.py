"""rlbooth: personalize a text-to-image diffusion model to one subject, then align it with RL.

Importing the package is cheap on purpose: torch, diffusers and friends are imported by the
modules that need them, so `rlbooth --help` answers at once.
"""

__version__ = "0.1.0"

from rlbooth.quiet import drop_unactionable_notes  # noqa: E402  (logging only: cheap)

drop_unactionable_notes()
