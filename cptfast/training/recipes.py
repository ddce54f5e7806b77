"""Continued-pretraining recipes that are pure functions of the config: mixture phases,
sequence-length stages, the replay plan (how many tokens of each source a run consumes, and
how many epochs that is) and the long-context RoPE settings."""

from __future__ import annotations

from cptfast.training.config import Config


def phase_boundaries(config: Config) -> list[tuple[int, dict[str, float]]]:
    """(first step, weights) of every mixture phase, the base mixture first."""
    base = {name: source.weight for name, source in config.data.sources.items()}
    phases = [(0, base)]
    for phase in config.data.phases:
        weights = {name: phase.weights.get(name, 0.0) for name in base}
        phases.append((round(phase.at * config.train.steps), weights))
    return phases


def weights_at(config: Config, step: int) -> dict[str, float]:
    """The mixture weights in effect for optimizer step ``step`` (0-based)."""
    return [weights for start, weights in phase_boundaries(config) if start <= step][-1]


def phase_starting_at(config: Config, step: int) -> dict[str, float] | None:
    """The weights of the phase that starts at ``step`` (after the first), else None."""
    for start, weights in phase_boundaries(config)[1:]:
        if start == step:
            return weights
    return None


def mixture_plan(config: Config, source_tokens: dict[str, int], tokens_per_step: int
                 ) -> list[dict]:
    """Per source: the tokens the whole run takes from it and the epochs that makes."""
    phases = phase_boundaries(config)
    ends = [start for start, _ in phases[1:]] + [config.train.steps]
    taken = dict.fromkeys(source_tokens, 0.0)
    for (start, weights), end in zip(phases, ends):
        total = sum(weights.values())
        for name, weight in weights.items():
            taken[name] += max(0, end - start) * tokens_per_step * weight / total
    run_total = sum(taken.values()) or 1.0
    return [{"source": name, "tokens": int(taken[name]), "share": taken[name] / run_total,
             "epochs": taken[name] / source_tokens[name] if source_tokens[name] else 0.0}
            for name in source_tokens]


def format_plan(plan: list[dict]) -> str:
    lines = ["source              tokens taken   share   epochs"]
    for row in plan:
        warning = "  (repeats: more than 4 epochs)" if row["epochs"] > 4 else ""
        lines.append(f"{row['source']:<16} {row['tokens']:>13,} {row['share']:>7.1%} "
                     f"{row['epochs']:>8.2f}{warning}")
    return "\n".join(lines)


def plan_from_manifests(config: Config, world_size: int = 1) -> list[dict]:
    """The replay plan before the model is loaded: source sizes from the shard manifests (of
    foreign shards, from their readers, which validate their structure)."""
    from cptfast.data.shards import open_source

    sizes = {name: open_source(source.spec(), name=name, check_tokens=False).num_tokens
             for name, source in config.data.sources.items()}
    tokens_per_step = config.optim.global_batch_tokens or (
        config.data.seq_len * config.data.batch_size * world_size)
    return mixture_plan(config, sizes, tokens_per_step)


def stages(config: Config) -> list[tuple[int, int, int]]:
    """(first step, seq_len, batch_size) of every sequence-length stage, the base first."""
    found = [(0, config.data.seq_len, config.data.batch_size)]
    for stage in config.data.stages:
        found.append((round(stage.at * config.train.steps), stage.seq_len,
                      stage.batch_size or found[-1][2]))
    return found


def stage_at(config: Config, step: int) -> tuple[int, int, int]:
    """(stage index, seq_len, batch_size) in effect for optimizer step ``step``."""
    found = stages(config)
    index = max(i for i, (start, _, _) in enumerate(found) if start <= step)
    _, seq_len, batch_size = found[index]
    return index, seq_len, batch_size


def stage_starts_at(config: Config, step: int) -> bool:
    return step > 0 and any(start == step for start, _, _ in stages(config)[1:])


def apply_rope_settings(model_config, *, rope_theta: float, rope_scaling: dict,
                        max_position_embeddings: int) -> None:
    """Long-context continued pretraining: a new RoPE base and/or scaling (merged into the
    transformers config's rope parameters, per attention type where the model has several)
    and a new maximum position."""
    if rope_theta or rope_scaling:
        parameters = model_config.rope_parameters
        nested = all(isinstance(v, dict) for v in parameters.values())
        for table in (parameters.values() if nested else [parameters]):
            if rope_theta:
                table["rope_theta"] = float(rope_theta)
            table.update(rope_scaling)
    if max_position_embeddings:
        model_config.max_position_embeddings = max_position_embeddings
