"""hjserve: the Open Inference Protocol (KServe V2) REST server for hjmodel artifacts.

The service only moves tensors: every number it returns is computed by the model's ONNX graph or
torch module (``hjmodel.serving`` is the contract).
"""

from service.settings import Settings

__all__ = ["Settings", "__version__"]

__version__ = "0.1.0"
