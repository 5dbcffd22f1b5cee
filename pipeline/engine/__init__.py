"""The layer-wise engine: one generic driver over any decoder stack, knowing no algorithm.

- :mod:`pipeline.engine.inputs`: capture what every decoder layer receives per batch;
- :mod:`pipeline.engine.groups`: which linears read the same input (statistics sharing);
- :mod:`pipeline.engine.prune`: :func:`prune_layerwise`, calibrate/prune/propagate per layer;
- :mod:`pipeline.engine.walk`: :func:`layerwise_forward`, the same walk without pruning;


"""

from pipeline.engine.groups import InputGroup, discover_input_groups, input_hooks
from pipeline.engine.inputs import LayerInput, capture_layer_inputs, check_windows, run_layer
from pipeline.engine.prune import PruneResult, prune_layerwise
from pipeline.engine.walk import LayerStep, layerwise_forward

__all__ = [
    "InputGroup",
    "LayerInput",
    "LayerStep",
    "PruneResult",
    "capture_layer_inputs",
    "check_windows",
    "discover_input_groups",
    "input_hooks",
    "layerwise_forward",
    "prune_layerwise",
    "run_layer",
]
