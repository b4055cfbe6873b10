"""Readers and parameter maps for checkpoint formats of the original code bases.

  original.py        OriginalCheckpoint (plain arrays), format detection, the
                     comparison with the tree a config builds (mismatch messages)
  flax_msgpack.py    yang-song/score_sde: flax msgpack checkpoint_<k> files
  torch_pickle.py    a .pth reader that runs no code from the file
  torch_state.py     score_sde_pytorch: state dicts of the all_modules networks
  torch_refinenet.py score_sde_pytorch: NCSN / NCSNv2 state dicts

Writing a workdir from them is `score_sde/jobs/import_checkpoint.py`.
"""
