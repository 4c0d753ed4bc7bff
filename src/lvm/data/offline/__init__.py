"""The offline stage (`make shards`): inputs -> units of work -> visual codes -> Arrow shards + index.

`pipeline.py` tells the stage in order; `units.py` plans the units, `sources/` reads each kind of input,
`decode.py` turns sources into frames, `fit.py` fits the embedded tokenizer, `encode.py` turns frames into
codes, `writer.py` writes a unit's shards, its part mark and the index. The training side reads the result
(`lvm.data.shards`) and never imports this package.
"""
