"""Data side: manifest -> visual sentences -> Arrow shards -> packed windows -> loader."""
