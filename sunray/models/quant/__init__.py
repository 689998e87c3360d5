"""Weight-only quantization of a decode module (QSUN): int8 per output channel, int4 group-wise with AWQ.

Schemes (the name goes into the fingerprint's `quantization` field, so that KV is accepted only by the decode module
it was trained against):
- `int8`: symmetric, one scale per output channel (W8A16).
- `int4-g<G>` (default G = 128): asymmetric 4-bit with a scale and an integer zero point per group of G input
  channels of each output row (W4A16), after AWQ (Lin et al., 2023). When the input width is not a multiple of G
  (SmolLM2's 576 with G = 128) the last group is shorter.

The pieces, lowest first (each imports only those above it in this list):
- `formats`: `QuantSpec`, quantize / dequantize / fake-quantize (pure tensor functions).
- `linear`: the layers and their dispatch. `QuantLinear` holds the integer weights and has a reference torch path
  (dequantize, then matmul), cached per dtype and device, so that any engine (and training, which sends gradients
  through the module into its inputs) runs it. int4 on CUDA with bf16 activations takes the fast path instead
  (`sunray.models.int4`: tinygemm for small batches, a Triton GEMM for larger ones, over one packed copy of the
  weights: 4.25 bits a weight with group 128), packed on the first such forward or by `prepare_for_inference`
  (which `Decoder.fuse_weights` calls, packing q/k/v and gate/up as one weight each), with no dequantized copy.
  Shapes it cannot take (a group size other than 32, 64, 128, 256; in_features not a multiple of the group) keep
  the reference path, said once in the log.
- `awq`: the activation-aware scale search and clipping, and `quantize_model` (AWQ, then `replace_linears`).
- `checkpoint`: a quantized decode module directory, saved and loaded (`sunray.models.loader.load_model` loads it).

Import the piece you need (`from sunray.models.quant.linear import QuantLinear`); this package re-exports nothing,
so that the decoder, which needs only `linear`, does not pull in calibration or file handling.
"""
