"""Reading and writing models: the tensor index, the shard writer, atomic publishing, loading, the skeleton."""
