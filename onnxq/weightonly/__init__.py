"""Weight-only quantization (int4/int8 MatMul weights): grids, RTN, GPTQ, AWQ and the packed formats.

The algorithms are plain numpy on one weight at a time (``W`` is the MatMul's ``[K, N]`` initializer);
``passes/weight_only.py`` drives them over a graph and ``segments`` feeds them calibration activations.
"""
