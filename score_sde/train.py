"""Training loop (placeholder until the training issue lands)."""


def train_and_evaluate(config, workdir: str) -> None:
  print(f'score_sde train: the training loop is not implemented yet; nothing was written to '
        f'{workdir}. Config: {config.data.dataset} / {config.model.name}.')
