"""XLA:CPU measures, used only when JAX runs on the CPU.

  xla_flags.py    process-wide XLA:CPU flags (applied by the launcher and the
                  test conftest, never on import) and the train step's
                  per-program compiler options
  flat_params.py  parameter trees as one flat vector
  flat_state.py   the train state on flat vectors (the CPU train step's form)
  hugepages.py    the launcher's restart with glibc's huge-page tunable
  process.py      prepare(): the flags and the restart, first thing in an entry point

On GPU and TPU none of them is used: the train step runs on the plain
parameter tree (train.py, config.training.param_layout).
"""
