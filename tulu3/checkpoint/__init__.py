"""Checkpoints: the training checkpoint (:mod:`.training`), the tulu3 directory format
(:mod:`.format`, :mod:`.dcp_io`), HF files (:mod:`.hf_io`, :mod:`.hf_config`), loading into a
model (:mod:`.load`), export (:mod:`.export`, :mod:`.to_hf`), import (:mod:`.from_hf`) and
resharding (:mod:`.reshard`). ``checkpoints_tools`` is the command line on top of this package."""
