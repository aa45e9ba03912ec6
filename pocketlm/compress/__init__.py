"""Compression: number formats, quantized layers on PyTorch's low-precision CPU kernels, quantized model
folders, quantization-aware training and the compression table.

Modules: `formats` (the arithmetic), `modules` (quantized layers), `convert` (swap layers in a model),
`folder` (the on-disk format), `api` (`quantize`, the library call behind `pocketlm quantize`), `qat`
(fake quantization for fine-tuning), `table` (one folder per format plus a table of what each cost).
Nothing is imported here, so `pocketlm.io.folders` can reach `compress.folder` without loading the rest.
"""
