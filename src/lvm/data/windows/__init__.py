"""Visual sentences of a source -> fixed-length training windows, deterministic and directly addressable.

- `source`: the windows of one source (a folder of shards) in either packing mode, and their shuffle (`SourceWindows`);
- `order`: the seeded permutations and the keyed read order it draws on (`feistel`);
- `binpack`: best-fit decreasing packing by counts of sentences per length (`--packing sentence`);
- `batch`: a micro-batch of windows as the model takes it (`Batch`) and the loss of a forward over it.

Weighted mixtures of sources and the rank-sharded loader over them are `lvm.data.mixture`.
"""
