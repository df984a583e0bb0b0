"""Data: image sources (`sources`), the webdataset shard writer (`shards`) and the stage loader (`loader`)."""
