"""Silence library chatter that says nothing to a kdforge user.

One place for it, because each fresh interpreter needs it again: the CLI, the eval speed workers
(``python -m kdforge.eval.speed``) and library calls that import torchao.
"""

from __future__ import annotations

import logging


def quiet_torchao() -> None:
    """torchao 0.18 logs a warning for each optional native library it cannot load (CUDA-only or
    built for another Python) and torch warns about its enum registrations; neither matters on CPU.
    transformers and lm_eval import torchao whenever it is installed."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def quiet_transformers() -> None:
    """The above, plus transformers' progress bars and warnings (stages print their own progress)."""
    from transformers.utils import logging as hf_logging

    quiet_torchao()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
