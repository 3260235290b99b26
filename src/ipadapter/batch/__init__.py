"""Generation at scale: a JSONL manifest of jobs, batched UNet calls, resumable output, sharded over processes.

`jobs` reads and checks the manifest, `shards` splits the work over the processes of `accelerate launch`, `run`
generates and writes. docs/scale.md describes the commands, the layout of the output folder and how resume works.
"""
