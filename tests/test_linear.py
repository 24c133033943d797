"""compiler.linear: a layer's mean input patch equals the mean of its im2col patches, padding included."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from compiler.linear import LinearLayer


@pytest.mark.parametrize("kernel, strides, dilations, pads, groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1),
    ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 4),      # depthwise-like, stride 2
    ((5, 5), (2, 2), (1, 1), (2, 2, 2, 2), 1),
    ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1),
    ((3, 3), (1, 1), (2, 2), (2, 2, 2, 2), 1),      # dilated
    ((3, 2), (2, 1), (1, 1), (0, 1, 2, 0), 1),      # asymmetric kernel and pads
    ((3, 3), (3, 3), (1, 1), (1, 0, 0, 1), 1),      # stride 3: some taps never read the trailing rows
    ((7, 7), (1, 1), (1, 1), (3, 3, 3, 3), 1),      # kernel wider than half the input
])
def test_patch_mean_is_the_mean_of_the_patches(kernel, strides, dilations, pads, groups):
    rng = np.random.default_rng(0)
    channels = 8
    weight = gs.Constant("w", rng.normal(size=(4, channels // groups) + kernel).astype(np.float32))
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations), "pads": list(pads),
             "group": groups}
    layer = LinearLayer(gs.Node("Conv", inputs=[gs.Variable("x"), weight], outputs=[gs.Variable("y")], attrs=attrs), groups)
    x = rng.normal(size=(2, channels, 11, 13)).astype(np.float32)
    np.testing.assert_allclose(layer.patch_mean(x), layer.patches(x).astype(np.float64).mean(axis=0), rtol=0, atol=1e-12)
