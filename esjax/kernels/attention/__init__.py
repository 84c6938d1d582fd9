"""Attention kernels with one contract (`reference`): plain XLA, chunked online softmax with
a recomputing custom VJP (`chunked`, also the ring CP block kernel), cuDNN flash (`cudnn`),
and the entry point that picks one by name (`ops.attend`)."""
