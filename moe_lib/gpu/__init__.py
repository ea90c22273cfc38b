"""The GPU path of the MoE layer: bf16 grouped GEMMs with the routing kept on the device.

- `grouped`: expert-sorted dispatch without host synchronisation (`dispatch_device`, chosen by
  `moe_lib.dispatch.dispatch_grouped` for CUDA tensors), forward and backward.
- `graphs`: the whole layer's forward without host synchronisation (`moe_forward`), optionally with
  the shared expert on a side stream, and its capture as a CUDA graph for decoding (`GraphedMoE`).
- `syncs`: find the operations that make the host wait for the device (`host_syncs`), on any device.
- `reference`: a float32 oracle for bf16 layers of any size, one expert at a time (output, input
  gradient, chosen weight gradients), for the benchmark's and the tests' checks.
- `roofline`: the performance model: FLOPs, bytes of the experts actually hit, the time bound and the
  crossover between bandwidth-bound and compute-bound.

Every function here also runs on CPU tensors (torch's grouped_mm has a CPU kernel), which is how the
test suite checks them; only the CUDA-graph capture and the side stream need a GPU.
"""
