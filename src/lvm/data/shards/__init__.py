"""Arrow shards of visual sentences: the on-disk format shared by make_shards, training and evaluation.

- `format`: the shard file (row layout, sentence kinds, counts recorded in its schema), written and read whole;
- `index`: `index.json` (every shard with its counts) and the same entries as columns, `index.feather`;
- `shard`: one shard memory-mapped, its tokens read at random places (a window's sentences);
- `shard_set`: a folder of shards opened for training and evaluation (`open_shards`, `load_sentences`).

make_shards writes them (`lvm.data.offline`); training cuts them into windows (`lvm.data.windows`).
"""
