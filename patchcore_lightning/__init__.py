"""PatchCore (Roth et al. 2021) as a plain torch model, and as a PyTorch Lightning test loop.

``PatchCore`` (model.py) and ``evaluate`` (metrics.py) work without Lightning; the CLI
(``lightning_cli.py``, ``patchcore_lightning.cli``) runs them in Lightning's loops. Importing the
package runs nothing and changes no global state.
"""

from .metrics import Evaluation, evaluate
from .model import PatchCore

__all__ = ["Evaluation", "PatchCore", "evaluate"]
