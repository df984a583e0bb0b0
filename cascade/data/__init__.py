"""Data: making shards and reading them.

Writing: image sources (`sources`, the procedural images of `synthetic`) → the bad-input policy
(`bad_input`) → each sample's resolution pyramid (`pyramid`) → webdataset tar shards + dataset.json
(`shards`). Reading: a shard folder's dataset.json and shard urls (`shard_folder`) → decoded samples and
batches (`decoding`), spread over ranks and worker processes (`workers`) by the stage loader (`loader`);
`settings` holds `DataConfig`, the validated `data` settings of a run; `splits` reads a split whole.
"""
