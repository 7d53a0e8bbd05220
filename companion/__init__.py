"""Companion package of the book *Large Models, Computed and Checked*.

Small, flat reference implementations in PyTorch, one module per topic, each
checked against an established oracle (PyTorch, scikit-learn, Captum, Opacus) by the
unit tests in ``tests/``. Import the module you need, e.g.
``from companion import scale`` or ``from companion.device import get_device``.
"""

__version__ = "0.1.0"
