"""streamssl: streaming self-supervised representation learning.

The code lives in four packages, `streamssl.pipeline` (the trainer and the CLI), `streamssl.streams`,
`streamssl.models` (all a consumer of published encoders needs) and `streamssl.monitoring`. In the source
tree this file is pipeline/namespace/__init__.py (pyproject's package-dir maps `streamssl` here, so the top of
the tree keeps its four code folders); `__path__` takes in every `streamssl` portion on sys.path, and an
editable install finds the four packages through its own finder.
"""

from importlib.metadata import PackageNotFoundError, version
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

try:
    __version__ = version("streamssl")  # one source of truth: pyproject.toml, as installed
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
