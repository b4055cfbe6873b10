"""XLA:CPU measures, used only when JAX runs on the CPU.

  xla_flags.py    process-wide XLA:CPU flags (applied by the launcher and the
                  test conftest, never on import) and the train step's
                  per-program compiler options
  flat_params.py  parameter trees as one flat vector (the CPU train step's form)
  hugepages.py    the launcher's restart with glibc's huge-page tunable

On GPU and TPU none of them is used: the train step runs on the plain
parameter tree.
"""
